"""Fault injection, injected latency, bandwidth caps, read metrics and instance crashes, seen through the real SDK."""

from __future__ import annotations

import http.client
import math
import os
import socket
import threading
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import oci
import pytest

from localoci.process import RunningLocalOCI
from tests.localoci.test_objectstorage import par_details
from tests.waiting import wait_for

NO_RETRY = oci.retry.NoneRetryStrategy()  # this SDK has no oci.retry.NO_RETRY_STRATEGY
MiB = 1024 * 1024
WORKER_IMAGE = "ocid1.image.oc1..localoci-worker"
PER_CONNECTION = "objectReadBytesPerSecondPerConnection"
PER_OCPU = "workerBytesPerSecondPerOcpu"
NO_CAPS = {PER_CONNECTION: None, PER_OCPU: None}


def caps(localoci: RunningLocalOCI) -> dict[str, float | None]:
    """The caps ``GET /_localoci/bandwidth`` shows (without what went through them)."""
    shown = localoci.admin("GET", "bandwidth")
    return {key: shown[key] for key in (PER_CONNECTION, PER_OCPU)}


def reset_server(localoci: RunningLocalOCI) -> None:
    localoci.admin("DELETE", "faults")
    localoci.admin("DELETE", "latency")
    localoci.admin("POST", "bandwidth", NO_CAPS)


@pytest.fixture(autouse=True)
def clean_server(localoci: RunningLocalOCI) -> Iterator[None]:
    """The server is shared by the session: leave no fault, latency or bandwidth cap behind."""
    reset_server(localoci)
    yield
    reset_server(localoci)
    assert localoci.admin("GET", "faults") == []
    assert localoci.admin("GET", "latency") == {}
    assert caps(localoci) == NO_CAPS


def admin_error(localoci: RunningLocalOCI, method: str, path: str, body: Any = None) -> urllib.error.HTTPError:
    with pytest.raises(urllib.error.HTTPError) as err:
        localoci.admin(method, path, body)
    return err.value


def wait_state(get: Callable[[], Any], state: str, timeout: float = 60.0) -> Any:
    return wait_for(lambda: (resource := get()).lifecycle_state == state and resource, timeout, f"the resource {state}")


@pytest.fixture
def volumes(localoci: RunningLocalOCI, blockstorage: oci.core.BlockstorageClient, compartment_id: str,
            availability_domains: list[str]) -> Iterator[Callable[..., Any]]:
    """Create volumes (retry-free); every one is deleted at the end of the test."""
    created: list[str] = []

    def create(**kwargs: Any) -> Any:
        details = oci.core.models.CreateVolumeDetails(
            compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=50, **kwargs)
        volume = blockstorage.create_volume(details, retry_strategy=NO_RETRY).data
        created.append(volume.id)
        return volume

    yield create
    reset_server(localoci)  # an armed fault must not fail the clean-up
    for volume_id in created:
        wait_state(lambda: blockstorage.get_volume(volume_id).data, "AVAILABLE", timeout=30)
        blockstorage.delete_volume(volume_id)
        wait_state(lambda: blockstorage.get_volume(volume_id).data, "TERMINATED", timeout=30)


@pytest.fixture
def instances(localoci: RunningLocalOCI, compute: oci.core.ComputeClient, compartment_id: str, subnet_id: str,
              client_key: Any) -> Iterator[Callable[[str], Any]]:
    """Launch worker instances (retry-free); every one is terminated (and awaited) at the end of the test."""
    launched: list[str] = []

    def launch(availability_domain: str, ocpus: float = 1) -> Any:
        models = oci.core.models
        details = models.LaunchInstanceDetails(
            compartment_id=compartment_id,
            availability_domain=availability_domain,
            shape="VM.Standard.E4.Flex",
            shape_config=models.LaunchInstanceShapeConfigDetails(ocpus=ocpus, memory_in_gbs=16),
            source_details=models.InstanceSourceViaImageDetails(image_id=WORKER_IMAGE),
            create_vnic_details=models.CreateVnicDetails(subnet_id=subnet_id),
            metadata={"ssh_authorized_keys": client_key.public_openssh},
        )
        instance = compute.launch_instance(details, retry_strategy=NO_RETRY).data
        launched.append(instance.id)
        return instance

    yield launch
    reset_server(localoci)  # an armed fault must not fail the clean-up
    for instance_id in launched:
        compute.terminate_instance(instance_id)
    for instance_id in launched:
        wait_state(lambda: compute.get_instance(instance_id).data, "TERMINATED")


# -- injected errors ------------------------------------------------------------------


def test_injected_429_on_create_volume_is_consumed(localoci, blockstorage, volumes, compartment_id, availability_domains):
    fault = localoci.admin("POST", "faults", {"operation": "CreateVolume", "count": 1, "status": 429,
                                              "code": "TooManyRequests", "message": "Slow down, please."})
    assert fault["operation"] == "CreateVolume" and fault["count"] == 1
    assert [f["id"] for f in localoci.admin("GET", "faults")] == [fault["id"]]

    before = {v.id for v in blockstorage.list_volumes(compartment_id=compartment_id).data}
    with pytest.raises(oci.exceptions.ServiceError) as err:
        volumes()
    assert err.value.status == 429
    assert err.value.code == "TooManyRequests"
    assert err.value.message == "Slow down, please."
    # The failed call created nothing, and the fault is spent.
    assert {v.id for v in blockstorage.list_volumes(compartment_id=compartment_id).data} == before
    assert localoci.admin("GET", "faults") == []

    volume = volumes()
    assert volume.lifecycle_state in ("PROVISIONING", "AVAILABLE")


def test_fault_count_fails_that_many_calls(localoci, volumes):
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "count": 2, "status": 503,
                                      "code": "ServiceUnavailable", "message": "Try later."})
    for left in (1, 0):
        with pytest.raises(oci.exceptions.ServiceError) as err:
            volumes()
        assert (err.value.status, err.value.code) == (503, "ServiceUnavailable")
        assert [f["count"] for f in localoci.admin("GET", "faults")] == ([left] if left else [])
    assert volumes().id


def test_fault_on_one_operation_leaves_others_alone(localoci, blockstorage, volumes, compartment_id):
    localoci.admin("POST", "faults", {"operation": "DeleteVolume", "status": 500, "code": "InternalError"})
    volume = volumes()  # CreateVolume is not affected
    assert blockstorage.get_volume(volume.id).data.id == volume.id
    assert len(localoci.admin("GET", "faults")) == 1


def test_fault_matching_an_object_name(localoci, object_storage, bucket):
    ns = localoci.namespace
    object_storage.put_object(ns, bucket, "bad.txt", b"bad")
    object_storage.put_object(ns, bucket, "good.txt", b"good")
    localoci.admin("POST", "faults", {"operation": "GetObject", "count": 1, "status": 503,
                                      "code": "ServiceUnavailable", "message": "Flaky.",
                                      "match": {"objectName": "bad.txt", "bucketName": bucket}})

    assert object_storage.get_object(ns, bucket, "good.txt", retry_strategy=NO_RETRY).data.content == b"good"
    with pytest.raises(oci.exceptions.ServiceError) as err:
        object_storage.get_object(ns, bucket, "bad.txt", retry_strategy=NO_RETRY)
    assert (err.value.status, err.value.code, err.value.message) == (503, "ServiceUnavailable", "Flaky.")
    assert object_storage.get_object(ns, bucket, "bad.txt", retry_strategy=NO_RETRY).data.content == b"bad"


def test_out_of_host_capacity_in_one_availability_domain(localoci, compute, instances, availability_domains):
    assert len(availability_domains) >= 2
    ad1, ad2 = availability_domains[:2]
    localoci.admin("POST", "faults", {"operation": "LaunchInstance", "count": 3, "status": 500, "code": "InternalError",
                                      "message": "Out of host capacity.", "match": {"availabilityDomain": ad1}})

    with pytest.raises(oci.exceptions.ServiceError) as err:
        instances(ad1)
    assert (err.value.status, err.value.code, err.value.message) == (500, "InternalError", "Out of host capacity.")

    instance = instances(ad2)
    assert instance.availability_domain == ad2
    assert wait_state(lambda: compute.get_instance(instance.id).data, "RUNNING").availability_domain == ad2

    # The launch in AD 2 did not consume the fault: AD 1 is still out of capacity.
    assert [f["count"] for f in localoci.admin("GET", "faults")] == [2]
    with pytest.raises(oci.exceptions.ServiceError) as err:
        instances(ad1)
    assert err.value.message == "Out of host capacity."
    live = {i["id"] for i in localoci.inventory()["instances"]}
    assert instance.id in live


@pytest.mark.parametrize("spec", [
    {"count": 1, "status": 429, "code": "TooManyRequests"},                     # no operation
    {"operation": None, "status": 429},                                         # null operation
    {"operation": "", "status": 429},                                           # empty operation
    {"operation": "CreateVolume", "status": "often"},                           # status not a number
    {"operation": "CreateVolume", "status": 200},                               # not an error status
    {"operation": "CreateVolume", "count": 0},                                  # never fires
    {"operation": "CreateVolume", "match": "availabilityDomain"},              # match not an object
    ["CreateVolume"],                                                           # not an object at all
])
def test_bad_fault_spec_is_refused(localoci, spec):
    err = admin_error(localoci, "POST", "faults", spec)
    assert err.code == 400
    assert localoci.admin("GET", "faults") == []


# -- latency, bandwidth, crashes ----------------------------------------------------------


def test_injected_latency_keeps_volume_provisioning(localoci, blockstorage, volumes):
    assert localoci.admin("POST", "latency", {"transition": "volume:AVAILABLE", "seconds": 1.5}) == {"volume:AVAILABLE": 1.5}
    start = time.monotonic()
    volume = volumes()
    assert volume.lifecycle_state == "PROVISIONING"
    # Polled every 50 ms from here: first seen AVAILABLE 1.5 s on means PROVISIONING until then.
    wait_state(lambda: blockstorage.get_volume(volume.id).data, "AVAILABLE", timeout=15)
    assert time.monotonic() - start >= 1.5

    # Without the latency a volume is available at once.
    localoci.admin("DELETE", "latency")
    start = time.monotonic()
    quick = volumes()
    wait_state(lambda: blockstorage.get_volume(quick.id).data, "AVAILABLE", timeout=15)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("spec", [
    {"transition": "AVAILABLE", "seconds": 1},
    {"transition": "volume:AVAILABLE", "seconds": -1},
    {"transition": "volume:AVAILABLE", "seconds": "1"},
    {"transition": "volume:AVAILABLE", "seconds": True},
    {"transition": "volume:AVAILABLE"},
    ["volume:AVAILABLE", 1],
])
def test_bad_latency_is_refused(localoci, spec):
    assert admin_error(localoci, "POST", "latency", spec).code == 400
    assert localoci.admin("GET", "latency") == {}


def test_the_oci_profile_slows_every_transition_and_unknown_profiles_are_refused(localoci):
    from localoci.latency import PROFILES

    assert localoci.admin("POST", "latency/profile", {"profile": "oci"}) == PROFILES["oci"]
    assert localoci.admin("GET", "latency")["instance:RUNNING"] == 120.0
    err = admin_error(localoci, "POST", "latency/profile", {"profile": "fast"})
    assert err.code == 400 and b"unknown latency profile 'fast'; known: none, oci" in err.read()
    assert localoci.admin("GET", "latency") == PROFILES["oci"]  # a refusal changes nothing
    assert localoci.admin("POST", "latency/profile", {"profile": "none"}) == {}


def test_a_booting_instance_is_running_before_its_ssh_answers(localoci, compute, instances, availability_domains):
    """As in a tenancy: RUNNING first, the operating system's SSH some time later (``instance:BOOTED``)."""
    localoci.admin("POST", "latency", {"transition": "instance:BOOTED", "seconds": 2.0})
    instance = instances(availability_domains[0])
    wait_state(lambda: compute.get_instance(instance.id).data, "RUNNING")
    running = time.monotonic()
    [entry] = [i for i in localoci.inventory()["instances"] if i["id"] == instance.id]
    assert not _connects(entry["sshAddress"], entry["sshPort"])
    wait_for(lambda: _connects(entry["sshAddress"], entry["sshPort"]), what="the worker's SSH answering")
    assert time.monotonic() - running >= 1.5


def test_bandwidth_cap_slows_object_reads(localoci, object_storage, bucket):
    ns, payload = localoci.namespace, os.urandom(8 * MiB)
    object_storage.put_object(ns, bucket, "big.bin", payload)
    rate = 4 * MiB
    assert localoci.admin("POST", "bandwidth", {PER_CONNECTION: rate}) == {PER_CONNECTION: rate, PER_OCPU: None}

    start = time.monotonic()
    data = object_storage.get_object(ns, bucket, "big.bin", retry_strategy=NO_RETRY).data.content
    capped = time.monotonic() - start
    assert data == payload
    assert capped >= 1.5

    # Ranges are capped too, at the same rate.
    start = time.monotonic()
    part = object_storage.get_object(ns, bucket, "big.bin", range="bytes=0-4194303", retry_strategy=NO_RETRY).data.content
    assert part == payload[:4 * MiB]
    assert time.monotonic() - start >= 0.7

    localoci.admin("POST", "bandwidth", NO_CAPS)
    start = time.monotonic()
    assert object_storage.get_object(ns, bucket, "big.bin", retry_strategy=NO_RETRY).data.content == payload
    assert time.monotonic() - start < capped / 2


@pytest.mark.parametrize("body", [{key: rate} for key in (PER_CONNECTION, PER_OCPU) for rate in (0, -5, "fast", True, math.inf)]
                         + [[1024], {"workerBytesPerSecond": 1024},
                            {PER_CONNECTION: 1024, PER_OCPU: 0}])  # one bad value refuses the whole change
def test_bad_bandwidth_is_refused(localoci, body):
    assert admin_error(localoci, "POST", "bandwidth", body).code == 400
    assert caps(localoci) == NO_CAPS


def test_bandwidth_keys_are_set_independently(localoci):
    assert localoci.admin("POST", "bandwidth", {PER_OCPU: 1000}) == {PER_CONNECTION: None, PER_OCPU: 1000}
    assert localoci.admin("POST", "bandwidth", {PER_CONNECTION: 500.5}) == {PER_CONNECTION: 500.5, PER_OCPU: 1000}
    assert localoci.admin("POST", "bandwidth", {}) == {PER_CONNECTION: 500.5, PER_OCPU: 1000}
    assert localoci.admin("POST", "bandwidth", {PER_OCPU: None}) == {PER_CONNECTION: 500.5, PER_OCPU: None}
    assert caps(localoci) == {PER_CONNECTION: 500.5, PER_OCPU: None}


# -- a worker VM's network: one cap shared by all its connections --------------------------


def read_from(localoci: RunningLocalOCI, address: str, path: str, headers: dict[str, str] | None = None,
              connected: Callable[[], Any] | None = None) -> tuple[int, bytes]:
    """GET ``path`` over a connection whose client end is bound to ``address``, as a worker's would be
    (``connected`` is called once the connection is up, before the request goes out)."""
    server = urlsplit(localoci.endpoint)
    conn = http.client.HTTPConnection(server.hostname, server.port, timeout=30, source_address=(address, 0))
    try:
        if connected is not None:
            conn.connect()
            connected()
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def parallel_reads(localoci: RunningLocalOCI, address: str, path: str, count: int) -> tuple[float, list[float], list[bytes]]:
    """Read ``path`` on ``count`` connections at once: the total time, when each one finished, and what each got.

    The connections are all made first and the requests sent together, so what is measured is
    how the server shares its caps, not how quickly a busy machine starts threads and connects.
    """
    begun: list[float] = []
    ready = threading.Barrier(count + 1, action=lambda: begun.append(time.monotonic()))  # before anyone goes on

    def one(_: int) -> tuple[float, bytes]:
        status, data = read_from(localoci, address, path, connected=ready.wait)
        assert status == 200
        return time.monotonic() - begun[0], data

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        ready.wait(timeout=30)
        results = [f.result() for f in futures]
    start = begun[0]

    return time.monotonic() - start, [t for t, _ in results], [d for _, d in results]


def running_worker(localoci, compute, instances, availability_domains, ocpus: float) -> tuple[Any, str]:
    """A RUNNING instance and its loopback address."""
    instance = instances(availability_domains[0], ocpus=ocpus)
    wait_state(lambda: compute.get_instance(instance.id).data, "RUNNING")
    [entry] = [i for i in localoci.inventory()["instances"] if i["id"] == instance.id]
    return instance, entry["sshAddress"]


def shared_object(localoci, object_storage, bucket, size: int) -> tuple[bytes, str]:
    """An object of ``size`` random bytes and the path of a PAR that reads it."""
    payload = os.urandom(size)
    object_storage.put_object(localoci.namespace, bucket, "shared.bin", payload)
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("shared.bin")).data
    return payload, par.access_uri


def test_worker_cap_is_shared_by_all_connections_from_an_instance(localoci, object_storage, bucket, compute, instances,
                                                                  availability_domains):
    _, address = running_worker(localoci, compute, instances, availability_domains, ocpus=2)
    payload, path = shared_object(localoci, object_storage, bucket, 2 * MiB)
    per_ocpu = 2 * MiB  # 2 OCPUs: 4 MiB/s for the instance
    assert localoci.admin("POST", "bandwidth", {PER_OCPU: per_ocpu}) == {PER_CONNECTION: None, PER_OCPU: per_ocpu}

    # 4 connections, 8 MiB in all, through one 4 MiB/s cap: about 2 s, and every connection gets its share.
    elapsed, finished, data = parallel_reads(localoci, address, path, 4)
    assert data == [payload] * 4
    assert 8 * MiB / (2 * per_ocpu) * 0.8 <= elapsed < 8 * MiB / (2 * per_ocpu) * 1.5
    assert min(finished) >= elapsed * 0.7, f"a connection was starved or favoured: {finished}"

    # The same reads from an address that is no instance's are not slowed by the worker cap.
    elapsed, _, data = parallel_reads(localoci, "127.0.0.1", path, 4)
    assert data == [payload] * 4
    assert elapsed < 0.5


def test_per_connection_cap_still_applies_to_a_worker(localoci, object_storage, bucket, compute, instances,
                                                       availability_domains):
    instance, address = running_worker(localoci, compute, instances, availability_domains, ocpus=1)
    payload, path = shared_object(localoci, object_storage, bucket, 1 * MiB)
    localoci.admin("POST", "bandwidth", {PER_CONNECTION: 1 * MiB, PER_OCPU: 4 * MiB})

    # One connection: its own 1 MiB/s cap binds, not the instance's 4 MiB/s (nor the two added up).
    elapsed, _, data = parallel_reads(localoci, address, path, 1)
    assert data == [payload]
    assert 0.7 <= elapsed < 1.3

    # Six connections: each alone could do 1 MiB/s, together the instance's 4 MiB/s cap binds.
    elapsed, _, data = parallel_reads(localoci, address, path, 6)
    assert data == [payload] * 6
    assert 6 / 4 * 0.8 <= elapsed < 6 / 4 * 1.5

    # A terminated instance's address is capped no more than any other.
    compute.terminate_instance(instance.id)
    wait_state(lambda: compute.get_instance(instance.id).data, "TERMINATED")
    localoci.admin("POST", "bandwidth", {PER_CONNECTION: None})
    elapsed, _, data = parallel_reads(localoci, address, path, 6)
    assert data == [payload] * 6
    assert elapsed < 0.5


# -- object read metrics ---------------------------------------------------------------


def test_read_metrics_count_ranged_and_full_reads_exactly(localoci, object_storage, bucket):
    ns = localoci.namespace
    payload, path = shared_object(localoci, object_storage, bucket, 300_000)
    object_storage.put_object(ns, bucket, "other.bin", b"x" * 777)
    key, other = f"{ns}/{bucket}/shared.bin", f"{ns}/{bucket}/other.bin"

    for rng, expected in (("bytes=0-99", payload[:100]), ("bytes=1000-10999", payload[1000:11000]),
                          ("bytes=-2345", payload[-2345:])):
        status, data = read_from(localoci, "127.0.0.1", path, {"Range": rng})
        assert (status, data) == (206, expected)
    assert object_storage.get_object(ns, bucket, "shared.bin", retry_strategy=NO_RETRY).data.content == payload
    # Neither a HEAD, nor a refused or not-modified read, sends object bytes.
    object_storage.head_object(ns, bucket, "shared.bin")
    assert read_from(localoci, "127.0.0.1", path, {"If-Match": '"not-the-etag"'})[0] == 412
    etag = object_storage.head_object(ns, bucket, "shared.bin").headers["ETag"]
    assert read_from(localoci, "127.0.0.1", path, {"If-None-Match": etag})[0] == 304

    metrics = localoci.admin("GET", "metrics")
    assert metrics["objectBytesRead"][key] == 100 + 10_000 + 2345 + 300_000
    assert metrics["objectReadRequests"][key] == 4
    assert other not in metrics["objectBytesRead"] and other not in metrics["objectReadRequests"]

    # Capped reads go another way through the server; they are counted all the same.
    localoci.admin("POST", "bandwidth", {PER_CONNECTION: 64 * MiB})
    assert read_from(localoci, "127.0.0.1", path, {"Range": "bytes=5-9"}) == (206, payload[5:10])
    assert object_storage.get_object(ns, bucket, "other.bin", retry_strategy=NO_RETRY).data.content == b"x" * 777
    metrics = localoci.admin("GET", "metrics")
    assert metrics["objectBytesRead"][key] == 100 + 10_000 + 2345 + 300_000 + 5
    assert metrics["objectReadRequests"][key] == 5
    assert (metrics["objectBytesRead"][other], metrics["objectReadRequests"][other]) == (777, 1)

    assert localoci.admin("DELETE", "metrics") is None
    assert localoci.admin("GET", "metrics") == {"objectBytesRead": {}, "objectReadRequests": {}}


def test_read_metrics_count_only_what_was_sent_to_a_client_that_left(localoci, object_storage, bucket):
    _, path = shared_object(localoci, object_storage, bucket, 4 * MiB)
    key = f"{localoci.namespace}/{bucket}/shared.bin"
    localoci.admin("POST", "bandwidth", {PER_CONNECTION: 1 * MiB})
    server = urlsplit(localoci.endpoint)
    with socket.create_connection((server.hostname, server.port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {server.netloc}\r\n\r\n".encode())
        conn.recv(64 * 1024)
        wait_for(lambda: localoci.admin("GET", "metrics")["objectBytesRead"].get(key), what="bytes counted")
        client_port = conn.getsockname()[1]
    # The server finds out at its next write, and closes its end: from then on it counts nothing.
    wait_for(lambda: not _server_end_open(server.port, client_port), what="the server's end of the connection closed")
    metrics = localoci.admin("GET", "metrics")
    assert metrics["objectReadRequests"][key] == 1
    assert 0 < metrics["objectBytesRead"][key] < 2 * MiB


def _server_end_open(server_port: int, client_port: int) -> bool:
    """Whether a socket of the server (local ``server_port``) to ``client_port`` is still open."""
    TIME_WAIT = "06"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if (int(local.rsplit(":", 1)[1], 16) == server_port and int(remote.rsplit(":", 1)[1], 16) == client_port
                and state != TIME_WAIT):
            return True
    return False


def _connects(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except ConnectionRefusedError:
        return False


def test_crash_makes_ssh_port_refuse_connections(localoci, compute, instances, availability_domains):
    instance = instances(availability_domains[0])
    wait_state(lambda: compute.get_instance(instance.id).data, "RUNNING")
    [entry] = [i for i in localoci.inventory()["instances"] if i["id"] == instance.id]
    address, port = entry["sshAddress"], entry["sshPort"]
    assert entry["crashed"] is False
    assert address.startswith("127.") and port == localoci.ssh_port
    assert _connects(address, port)

    crashed = localoci.admin("POST", f"instances/{instance.id}/crash")
    assert crashed["id"] == instance.id

    assert not _connects(address, port)
    [entry] = [i for i in localoci.inventory()["instances"] if i["id"] == instance.id]
    assert entry["crashed"] is True
    # To the API the instance is still RUNNING: only its host died.
    assert compute.get_instance(instance.id).data.lifecycle_state == "RUNNING"

    # Crashing needs a RUNNING instance.
    compute.terminate_instance(instance.id)
    wait_state(lambda: compute.get_instance(instance.id).data, "TERMINATED")
    err = admin_error(localoci, "POST", f"instances/{instance.id}/crash")
    assert err.code == 409
    assert admin_error(localoci, "POST", "instances/ocid1.instance.oc1..nosuch/crash").code == 404
