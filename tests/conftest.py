"""Shared fixtures: one real local OCI server per test process, real SDK clients; and the
session's own directory, which holds the shared end-to-end stack (tests/e2e/conftest.py), and
the check at the session's end that the run left nothing behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import oci
import pytest

from deployments import local_stack
from diskimport.keys import SshKeyPair as KeyPair
from localoci import process
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent

# Every stack the suite starts has its Prefect worker ask for runs every 2 s, not every 0.25 s: at
# 0.25 s each stack's server spent about 12% of a core on the asking alone, and the suite's stacks
# together a whole core of the two. Runs start up to 2 s later; nothing the tests check depends on it.
os.environ.setdefault("LOCAL_STACK_POLL_SECONDS", "2")
# Three flow runs at a time on a test stack, not six: the end-to-end modules share one stack, and
# with six runs at once (each with its worker VM, qemu-img and checks) the run queue of the two
# cores stood at 16 while the suite ran.
os.environ.setdefault("LOCAL_STACK_POOL_CONCURRENCY", "3")


@pytest.fixture(scope="session")
def localoci(tmp_path_factory: pytest.TempPathFactory) -> Iterator[process.RunningLocalOCI]:
    server = process.start(tmp_path_factory.mktemp("localoci"), regions=["local-1", "local-2"])
    yield server
    server.stop()


@pytest.fixture(scope="session")
def oci_config(localoci: process.RunningLocalOCI) -> dict[str, Any]:
    return oci.config.from_file(localoci.oci_config_file, localoci.oci_profile)


@pytest.fixture(scope="session")
def compartment_id(localoci: process.RunningLocalOCI) -> str:
    return localoci.tenancy_id


@pytest.fixture(scope="session")
def object_storage(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.object_storage.ObjectStorageClient:
    return oci.object_storage.ObjectStorageClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def compute(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.core.ComputeClient:
    return oci.core.ComputeClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def blockstorage(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.core.BlockstorageClient:
    return oci.core.BlockstorageClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def network(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.core.VirtualNetworkClient:
    return oci.core.VirtualNetworkClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def identity(oci_config: dict[str, Any], localoci: process.RunningLocalOCI) -> oci.identity.IdentityClient:
    return oci.identity.IdentityClient(oci_config, service_endpoint=localoci.endpoint)


@pytest.fixture(scope="session")
def availability_domains(identity: oci.identity.IdentityClient, compartment_id: str) -> list[str]:
    return [ad.name for ad in identity.list_availability_domains(compartment_id).data]


@pytest.fixture(scope="session")
def subnet_id(network: oci.core.VirtualNetworkClient, compartment_id: str) -> str:
    models = oci.core.models
    vcn = network.create_vcn(models.CreateVcnDetails(compartment_id=compartment_id, cidr_block="10.0.0.0/16")).data
    return network.create_subnet(
        models.CreateSubnetDetails(compartment_id=compartment_id, vcn_id=vcn.id, cidr_block="10.0.0.0/24")
    ).data.id


def empty_bucket(client: oci.object_storage.ObjectStorageClient, namespace: str, bucket: str) -> None:
    """Delete every object and open multipart upload: test images take gigabytes of the disk."""
    try:
        client.get_bucket(namespace, bucket)
    except oci.exceptions.ServiceError as e:
        if e.status == 404:  # the test removed it itself
            return
        raise
    for upload in oci.pagination.list_call_get_all_results(client.list_multipart_uploads, namespace, bucket).data:
        client.abort_multipart_upload(namespace, bucket, upload.object, upload.upload_id)
    for summary in oci.pagination.list_call_get_all_results(client.list_objects, namespace, bucket).data.objects:
        client.delete_object(namespace, bucket, summary.name)


@pytest.fixture
def bucket(object_storage: oci.object_storage.ObjectStorageClient, localoci: process.RunningLocalOCI,
           compartment_id: str) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:12]}"
    object_storage.create_bucket(
        localoci.namespace,
        oci.object_storage.models.CreateBucketDetails(name=name, compartment_id=compartment_id, object_events_enabled=True),
    )
    yield name
    empty_bucket(object_storage, localoci.namespace, name)


@pytest.fixture(scope="session")
def client_key() -> KeyPair:
    return KeyPair.generate()


# The modules that take minutes go first, longest first: with --dist loadfile
# --no-loadscope-reorder, xdist hands out modules in collection order, and a long module handed out
# last would run alone at the end while the other workers sit idle. (Without
# --no-loadscope-reorder xdist hands out the modules with the most tests first: the fleet and
# make-up modules, one test each, started 18 minutes into a run.)
SLOW_FIRST = ("tests/e2e/test_bootable_machines.py", "tests/e2e/test_end_to_end.py", "tests/e2e/test_guest_disks.py",
              "tests/e2e/test_untrusted_images.py", "tests/e2e/test_machines.py", "tests/e2e/test_fleet.py",
              "tests/test_local_stack.py", "tests/e2e/", "tests/trigger/",
              # then the minute-long modules of the rest, so the last to start are short ones: test_window
              # (in file order, among the last) once started at 524 s and ended the run at 595 s
              "tests/diskimport/test_export.py", "tests/diskimport/test_window.py",
              "tests/diskimport/test_importer.py", "tests/diskimport/test_streaming_packed.py",
              "tests/diskimport/test_vmdk_stream.py", "tests/diskimport/test_guest_adaptation.py")

# The six longest modules (two to five minutes each) in three pairs, each pair one unit of work
# for one worker, so the three workers start with a pair each. xdist hands a worker its next
# module when the one it runs has two tests left, and those two may take three minutes: left to
# it, one worker ran three of the six in a row (machines, fleet, bootable machines: 529 s) while
# another had none, and the session took 619 s instead of 550. The bootable machines (with the
# Debian machines' boots, the longest: 445 s of a 790 s run when it came second in its pair) go
# first, with the shortest of the six after them.
PAIRED = {"tests/e2e/test_untrusted_images.py": "tests/e2e/test_bootable_machines.py",
          "tests/e2e/test_machines.py": "tests/e2e/test_end_to_end.py",
          "tests/e2e/test_fleet.py": "tests/e2e/test_guest_disks.py"}


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with the pairs of :data:`PAIRED`: each pair a single unit of work."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class PairedModules(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return PAIRED.get(module, module)

    return PairedModules(config, log)


# What ``make test-fast`` leaves out (``-m "not stack"``): the tests that start a Prefect server.
NEEDS_PREFECT_SERVER = ("tests/e2e/", "tests/test_local_stack.py", "tests/trigger/")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(NEEDS_PREFECT_SERVER):
            item.add_marker(pytest.mark.stack)
    def rank(item: pytest.Item) -> int:
        return next((n for n, prefix in enumerate(SLOW_FIRST) if item.nodeid.startswith(prefix)), len(SLOW_FIRST))
    items.sort(key=rank)  # stable: file order kept within


# -- the session: its directory, its shared stack, and what it must not leave behind ---------------

# The session's directory, in the environment of every process the session starts (test workers,
# stacks, PostgreSQL, worker VMs): that is how the end finds any of them still running.
SESSION_DIR = "OCI_IMPORT_TEST_SESSION"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_stack: the module gets a stack of its own (tests/e2e/conftest.py)")
    config.addinivalue_line("markers", "stack: the test starts a Prefect server (left out by make test-fast)")
    config.addinivalue_line("markers", "heavy: a core test that moves gigabytes, copies between regions or boots a "
                                       "machine, several seconds each (left out by make test-fast)")
    if hasattr(config, "workerinput"):  # an xdist worker: the controller made the session's directory
        return
    session_dir = Path(tempfile.mkdtemp(prefix="oci-import-tests-"))
    os.chmod(session_dir, 0o755)  # a PostgreSQL cluster inside runs as the postgres user
    os.environ[SESSION_DIR] = str(session_dir)
    config.stash[_BEFORE] = _host_state()


_BEFORE = pytest.StashKey[dict[str, set[str]]]()


def _host_state() -> dict[str, set[str]]:
    """Loop devices and mounts of the host, by a line each."""
    loops = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
                           capture_output=True, text=True).stdout
    mounts = Path("/proc/self/mounts").read_text()
    return {"loop device": {line.strip() for line in loops.splitlines() if line.strip()},
            "mount": {line.split()[1] for line in mounts.splitlines()}}


def _session_processes(session_dir: str) -> list[str]:
    """Processes that carry the session in their environment, but for this one and its xdist workers."""
    needle = f"{SESSION_DIR}={session_dir}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == me or stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        kind = "PostgreSQL cluster" if "postgres" in command.split(" ", 1)[0] else "process"
        found.append(f"{kind}: pid {entry}: {command.strip()[:200]}")
    return found


def _left_behind(config: pytest.Config, session_dir: Path) -> list[str]:
    """What the session leaves: processes, loop devices, mounts, files in its directory."""
    before = config.stash[_BEFORE]
    left: list[str] = []

    def settled() -> bool:
        left[:] = _session_processes(str(session_dir))
        now = _host_state()
        left.extend(f"{kind}: {line}" for kind, lines in now.items() for line in sorted(lines - before[kind])
                    if str(session_dir) in line or "/pytest-of-" in line or "(deleted)" in line)
        return not left
    try:  # processes being stopped take a moment to go
        wait_for(settled, 60, "the session's processes, loop devices and mounts gone", interval=0.5)
    except AssertionError:
        pass
    left.extend(f"file: {path}" for path in sorted(session_dir.iterdir()))
    return left


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the shared stack, then fail the run naming whatever it left behind."""
    if hasattr(session.config, "workerinput") or _BEFORE not in session.config.stash:
        return
    session_dir = Path(os.environ[SESSION_DIR])
    stack_dir = session_dir / "stack"
    if stack_dir.exists():
        os.environ["LOCAL_DIR"] = str(stack_dir)
        try:
            local_stack.down(purge=True)
        finally:
            os.environ.pop("LOCAL_DIR", None)
        shutil.rmtree(stack_dir, ignore_errors=True)
    left = _left_behind(session.config, session_dir)
    shutil.rmtree(session_dir, ignore_errors=True)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("=", "the run left these behind", red=True)
            for line in left:
                reporter.write_line(line)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
