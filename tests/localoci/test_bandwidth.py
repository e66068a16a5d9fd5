"""Token buckets on their own, in simulated time: shared fairly by callers, combined by the longest
wait; and a worker VM's object writes held to its network, apart from its reads, seen through a
live local OCI by the bytes each bucket let through. No test here asserts how long anything takes
beyond a floor the caps guarantee: speed is the benchmark's (make bench)."""

from __future__ import annotations

import heapq
import http.client
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest

from localoci.bandwidth import ReadMetrics, TokenBucket, take_all
from localoci.process import RunningLocalOCI
from tests.localoci.test_faults import PER_OCPU, instances, read_from, reset_server, running_worker, shared_object
from tests.localoci.test_par_multipart import call, create, make_par

MiB = 1024 * 1024
STEP = 64 * 1024
_FIXTURES = (instances,)  # launches the worker VMs below (imported for pytest to find)


class SimulatedClock:
    """Time that moves only when the test moves it: the buckets' arithmetic, whatever else the
    machine is busy with."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drain(buckets: list[TokenBucket], clock: SimulatedClock, callers: int, each: int) -> tuple[float, list[float]]:
    """``callers`` callers each pass ``each`` bytes through ``buckets`` in STEP pieces, as threads
    do: each sleeps the wait ``take_all`` gives it and goes on when it wakes, the first due first.
    The time they took together, and each one's finish, in simulated time. The burst is spent first
    (it would all go to whichever caller starts first)."""
    for bucket in buckets:
        bucket.reserve(int(bucket.capacity))
    due = [(0.0, caller) for caller in range(callers)]
    left, finished = [each] * callers, [0.0] * callers
    while due:
        clock.now, caller = heapq.heappop(due)
        if left[caller] == 0:
            finished[caller] = clock.now
            continue
        slept: list[float] = []
        take_all(buckets, STEP, sleep=slept.append)
        left[caller] -= STEP
        heapq.heappush(due, (clock.now + sum(slept), caller))
    return max(finished), finished


def test_four_callers_sharing_a_bucket_get_its_rate_together_and_fairly():
    clock = SimulatedClock()
    rate = 8 * MiB  # twice a 4 MiB/s per-OCPU rate
    bucket = TokenBucket(rate, clock)
    elapsed, finished = drain([bucket], clock, callers=4, each=2 * MiB)
    assert elapsed == pytest.approx(8 * MiB / rate, abs=STEP / rate)
    # each in turn: all four finish within the last round, none a step's worth of rounds early
    assert max(finished) - min(finished) <= 4 * STEP / rate, f"a caller was starved or favoured: {finished}"
    assert bucket.passed == int(bucket.capacity) + 8 * MiB


def test_buckets_combined_wait_for_the_slowest_not_all_in_turn():
    clock = SimulatedClock()
    slow, fast = TokenBucket(4 * MiB, clock), TokenBucket(8 * MiB, clock)
    elapsed, _ = drain([slow, fast], clock, callers=1, each=2 * MiB)
    # 0.5 s at the slow rate; waiting on both in turn would take 0.75 s
    assert elapsed == pytest.approx(2 * MiB / slow.rate, abs=STEP / slow.rate)


def test_take_waits_for_the_rate():
    clock = SimulatedClock()
    bucket = TokenBucket(1 * MiB, clock)
    assert bucket.reserve(int(bucket.capacity)) == 0.0  # the burst passes at once
    assert bucket.reserve(256 * 1024) == pytest.approx(0.25, abs=1e-5)  # then a quarter second for 256 KiB at 1 MiB/s
    clock.now = 0.25
    assert bucket.reserve(0) == pytest.approx(0.0, abs=1e-5)  # paid off
    # and take() sleeps that wait for real (only ever longer, never shorter)
    real = TokenBucket(1 * MiB)
    real.take(int(real.capacity))
    start = time.monotonic()
    real.take(256 * 1024)
    assert time.monotonic() - start >= 0.2


def test_read_metrics_add_up_across_threads_and_reset():
    metrics = ReadMetrics()
    metrics.request("ns/b/empty")

    def read() -> None:
        metrics.request("ns/b/o")
        for _ in range(1000):
            metrics.sent("ns/b/o", 3)

    workers = [threading.Thread(target=read) for _ in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert metrics.snapshot() == {"objectBytesRead": {"ns/b/o": 24_000, "ns/b/empty": 0},
                                  "objectReadRequests": {"ns/b/o": 8, "ns/b/empty": 1}}
    metrics.reset()
    assert metrics.snapshot() == {"objectBytesRead": {}, "objectReadRequests": {}}


# -- a worker VM's uploads: held to its network, apart from its reads ------------------------


@pytest.fixture
def worker_cap(localoci: RunningLocalOCI) -> Iterator[Callable[[float], None]]:
    """Set the per-OCPU worker cap; lifted again at the end of the test."""
    yield lambda per_ocpu: localoci.admin("POST", "bandwidth", {PER_OCPU: per_ocpu})
    reset_server(localoci)


def networks(localoci: RunningLocalOCI) -> list[dict[str, Any]]:
    """The instance networks' buckets and the bytes each let through since the cap was set."""
    return localoci.admin("GET", "bandwidth")["instanceNetworks"]


def put_from(localoci: RunningLocalOCI, address: str, path: str, body: bytes, connected: Callable[[], Any]) -> int:
    """PUT ``body`` to ``path`` from ``address``, as a worker's uploader would; the reply's status."""
    server = urlsplit(localoci.endpoint)
    conn = http.client.HTTPConnection(server.hostname, server.port, timeout=30, source_address=(address, 0))
    try:
        conn.connect()
        connected()
        conn.request("PUT", path, body=body, headers={"Content-Type": "application/octet-stream"})
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def at_once(calls: list[Callable[[Callable[[], Any]], Any]]) -> tuple[float, list[float], list[Any]]:
    """Each call on its own connection, all sent together once every one is connected (it calls the
    callable it is given when it is): the total time, each one's finish, and what each returned."""
    went: list[float] = []
    barrier = threading.Barrier(len(calls) + 1, action=lambda: went.append(time.monotonic()))

    def timed(call_: Callable[[Callable[[], Any]], Any]) -> tuple[float, Any]:
        result = call_(barrier.wait)
        return time.monotonic() - went[0], result

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(timed, c) for c in calls]
        barrier.wait(timeout=30)
        done = [f.result() for f in futures]
    return time.monotonic() - went[0], [t for t, _ in done], [r for _, r in done]


def upload_parts(localoci: RunningLocalOCI, address: str, access_uri: str, parts: list[bytes]) -> tuple[float, list[float]]:
    """Upload ``parts`` (part 1, 2, ...) from ``address`` on a connection each, at once."""
    elapsed, finished, statuses = at_once([
        lambda ready, n=n, data=data: put_from(localoci, address, f"{access_uri}{n}", data, ready)
        for n, data in enumerate(parts, 1)])
    assert statuses == [200] * len(parts)
    return elapsed, finished


def test_uploads_from_an_instance_are_held_to_its_rate_shared_by_its_connections(
        localoci, object_storage, bucket, compute, instances, availability_domains, worker_cap):
    _, address = running_worker(localoci, compute, instances, availability_domains, ocpus=2)
    worker_cap(2 * MiB)  # 2 OCPUs: 4 MiB/s for the instance
    par = make_par(object_storage, localoci, bucket)
    access_uri = create(localoci, par).json()["accessUri"]
    parts = [os.urandom(2 * MiB) for _ in range(4)]

    # 4 parts, 8 MiB in all, through the instance's one 4 MiB/s bucket for what it sends: no
    # quicker than 2 s (a busy machine only makes it slower; how the bucket shares out is above).
    elapsed, _ = upload_parts(localoci, address, access_uri, parts)
    assert elapsed >= 8 / 4 * 0.9
    assert networks(localoci) == [{"address": address, "direction": "send", "rate": 4 * MiB, "bytes": 8 * MiB}]
    assert call("POST", localoci.endpoint + access_uri).status == 200
    assert object_storage.get_object(localoci.namespace, bucket, par.object_name).data.content == b"".join(parts)


def test_uploads_from_an_address_no_instance_has_are_not_held(
        localoci, object_storage, bucket, compute, instances, availability_domains, worker_cap):
    running_worker(localoci, compute, instances, availability_domains, ocpus=1)
    worker_cap(1 * MiB)  # the live instance could send 2 MiB in 2 s; 127.0.0.1 is no instance's
    access_uri = create(localoci, make_par(object_storage, localoci, bucket)).json()["accessUri"]
    upload_parts(localoci, "127.0.0.1", access_uri, [os.urandom(2 * MiB) for _ in range(4)])
    assert networks(localoci) == []  # no bucket held them


def test_an_instances_reads_and_writes_do_not_share_a_bucket(
        localoci, object_storage, bucket, compute, instances, availability_domains, worker_cap):
    _, address = running_worker(localoci, compute, instances, availability_domains, ocpus=1)
    payload, read_path = shared_object(localoci, object_storage, bucket, 2 * MiB)
    write_path = make_par(object_storage, localoci, bucket, name="up.bin").access_uri
    worker_cap(4 * MiB)

    # 4 MiB each way at 4 MiB/s, at once: each way through a bucket of its own, no quicker than 1 s.
    elapsed, _, results = at_once(
        [lambda ready: read_from(localoci, address, read_path, connected=ready)] * 2
        + [lambda ready: put_from(localoci, address, write_path, payload, ready)] * 2)
    assert results == [(200, payload)] * 2 + [200] * 2
    assert elapsed >= 4 / 4 * 0.9
    assert networks(localoci) == [{"address": address, "direction": direction, "rate": 4 * MiB, "bytes": 4 * MiB}
                                  for direction in ("receive", "send")]
