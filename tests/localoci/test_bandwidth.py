"""Token buckets on their own: shared fairly by threads, combined by the longest wait; and a worker
VM's object writes held to its network, apart from its reads, seen through a live local OCI."""

from __future__ import annotations

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


def drain(buckets: list[TokenBucket], threads: int, each: int) -> tuple[float, list[float]]:
    """``threads`` threads each pass ``each`` bytes through ``buckets``: the total time and each one's finish."""
    finished: list[float] = []
    start = 0.0

    def begin() -> None:
        """Once every thread waits: spend the burst (it would all go to whichever thread starts first)
        and start the clock. Spent any earlier, a busy machine's slow thread starts refill it."""
        nonlocal start
        for bucket in buckets:
            bucket.take(int(bucket.capacity))
        start = time.monotonic()

    ready = threading.Barrier(threads + 1, action=begin)

    def run() -> None:
        ready.wait()
        for _ in range(each // STEP):
            take_all(buckets, STEP)
        finished.append(time.monotonic() - start)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    for worker in workers:
        worker.join()
    return time.monotonic() - start, finished


def test_four_threads_sharing_a_bucket_get_its_rate_together_and_fairly():
    rate = 8 * MiB  # twice a 4 MiB/s per-OCPU rate
    bucket = TokenBucket(rate)
    elapsed, finished = drain([bucket], threads=4, each=2 * MiB)
    expected = 8 * MiB / rate
    assert expected * 0.9 <= elapsed <= expected * 1.3
    # A favoured thread would finish near a quarter of the time. The scheduler of a machine busy with
    # the rest of the suite moved a fair thread's finish to 0.63 of it (seen): 0.5 tells the two apart.
    assert min(finished) >= elapsed * 0.5, f"a thread was starved or favoured: {finished}"


def test_buckets_combined_wait_for_the_slowest_not_all_in_turn():
    slow, fast = TokenBucket(4 * MiB), TokenBucket(8 * MiB)
    elapsed, _ = drain([slow, fast], threads=1, each=2 * MiB)
    expected = 2 * MiB / slow.rate
    assert expected * 0.9 <= elapsed <= expected * 1.3  # not 1.5 times as long, as waiting on both would be


def test_take_waits_for_the_rate():
    bucket = TokenBucket(1 * MiB)
    start = time.monotonic()
    bucket.take(int(bucket.capacity))  # the burst passes at once
    assert time.monotonic() - start < 0.05
    bucket.take(256 * 1024)
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

    # 4 parts, 8 MiB in all, through one 4 MiB/s cap: about 2 s, and every connection gets its share.
    elapsed, finished = upload_parts(localoci, address, access_uri, parts)
    assert 8 / 4 * 0.8 <= elapsed < 8 / 4 * 1.5
    assert min(finished) >= elapsed * 0.7, f"a connection was starved or favoured: {finished}"
    assert call("POST", localoci.endpoint + access_uri).status == 200
    assert object_storage.get_object(localoci.namespace, bucket, par.object_name).data.content == b"".join(parts)


def test_uploads_from_an_address_no_instance_has_are_not_held(
        localoci, object_storage, bucket, compute, instances, availability_domains, worker_cap):
    running_worker(localoci, compute, instances, availability_domains, ocpus=1)
    worker_cap(1 * MiB)  # the live instance could send 2 MiB in 2 s; 127.0.0.1 is no instance's
    access_uri = create(localoci, make_par(object_storage, localoci, bucket)).json()["accessUri"]
    elapsed, _ = upload_parts(localoci, "127.0.0.1", access_uri, [os.urandom(2 * MiB) for _ in range(4)])
    assert elapsed < 0.5


def test_an_instances_reads_and_writes_do_not_share_a_bucket(
        localoci, object_storage, bucket, compute, instances, availability_domains, worker_cap):
    _, address = running_worker(localoci, compute, instances, availability_domains, ocpus=1)
    payload, read_path = shared_object(localoci, object_storage, bucket, 2 * MiB)
    write_path = make_par(object_storage, localoci, bucket, name="up.bin").access_uri
    worker_cap(4 * MiB)

    # 4 MiB each way at 4 MiB/s, at once: about 1 s; one bucket for both would take about 2 s.
    elapsed, _, results = at_once(
        [lambda ready: read_from(localoci, address, read_path, connected=ready)] * 2
        + [lambda ready: put_from(localoci, address, write_path, payload, ready)] * 2)
    assert results == [(200, payload)] * 2 + [200] * 2
    assert 4 / 4 * 0.8 <= elapsed < 4 / 4 * 1.4
