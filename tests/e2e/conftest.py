"""The local stack (local OCI, Prefect server, worker, deployments) for end-to-end tests.

One stack serves the whole test session (``shared_stack``), whichever test worker runs a module;
a module that breaks, restarts or sweeps a part of its stack has one of its own (``own_stack``).
``--dist loadfile`` runs each module on one worker, so the modules run side by side.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import oci
import pytest

from deployments import demo, local_stack
from diskimport.sample_disk import build_disk, convert
from tests import guest_disks
from tests.conftest import SESSION_DIR, empty_bucket

FILES = {"hello.txt": b"hello from the source disk\n", "random.bin": os.urandom(2 * 1024 * 1024)}


MANUAL_BUCKET = "manual-imports"
SUFFIX = {"qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vpc": "vhd", "vdi": "vdi", "raw": "raw"}


def _start_stack(base: Path, database: str | None = None) -> dict[str, str]:
    """``local_stack.up()`` in ``base``, plus a bucket that no Events rule watches, for imports
    started by hand (an upload to the import bucket starts its own run through the trigger)."""
    previous = os.environ.get("LOCAL_DIR")
    os.environ["LOCAL_DIR"] = str(base)
    try:
        env = local_stack.up(database)
        client, _ = demo.stack_clients(env)
        client.create_bucket(env["OCI_NAMESPACE"], oci.object_storage.models.CreateBucketDetails(
            name=MANUAL_BUCKET, compartment_id=env["COMPARTMENT_ID"]))
        return env
    finally:
        _restore_local_dir(previous)


def _restore_local_dir(previous: str | None) -> None:
    if previous is None:
        os.environ.pop("LOCAL_DIR", None)
    else:
        os.environ["LOCAL_DIR"] = previous


@pytest.fixture(scope="session")
def shared_stack() -> dict[str, str]:
    """The one stack of the test session, for every module that neither breaks nor restarts a part
    of it: the first test worker to ask starts it (under a file lock), the others read its
    settings, and the session's end stops it (tests/conftest.py). Modules keep apart by object
    names: each uploads under names of its own and removes only what it uploaded."""
    base = Path(os.environ[SESSION_DIR]) / "stack"
    base.mkdir(exist_ok=True)
    ready = base / "ready.env"
    with open(base / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready.exists():
            local_stack.write_env(ready, _start_stack(base))
        return local_stack.read_env(ready)


@pytest.fixture(scope="module")
def own_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A stack for one module alone (``pytestmark = pytest.mark.own_stack``): for tests that
    inject faults into the whole local OCI, restart its Prefect server, pause its watchers, sweep
    every managed resource or assert that nothing at all is left. ``own_stack(database="sqlite")``
    for a module that needs neither the reconciler nor the automations, which only a stack on
    PostgreSQL runs: no cluster to start, migrate and stop."""
    base = tmp_path_factory.mktemp("stack")
    previous = os.environ.get("LOCAL_DIR")
    marker = request.node.get_closest_marker("own_stack")
    try:
        env = _start_stack(base, marker.kwargs.get("database") if marker else None)
        # For the module's tests that find the stack's processes (local_stack.local_dir()).
        os.environ["LOCAL_DIR"] = str(base)
        yield env
        client, _ = demo.stack_clients(env)
        for name in (MANUAL_BUCKET, env["IMPORT_BUCKET"]):
            empty_bucket(client, env["OCI_NAMESPACE"], name)
    finally:
        os.environ["LOCAL_DIR"] = str(base)
        local_stack.down(purge=True)
        _restore_local_dir(previous)


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> dict[str, str]:
    """The module's stack: its own if the module is marked ``own_stack``, else the shared one."""
    own = request.node.get_closest_marker("own_stack") is not None
    return request.getfixturevalue("own_stack" if own else "shared_stack")


@pytest.fixture(scope="module", autouse=True)
def remove_uploads_after_module() -> Iterator[None]:
    """The objects a module uploaded go when it ends: their images would add up to gigabytes. Only
    what it uploaded: on the shared stack other modules' imports are reading theirs (a stack of a
    module's own is emptied as it stops)."""
    uploaded: list[tuple[dict[str, str], str, str]] = []
    upload = demo.upload

    def recorded(env: dict[str, str], path: Path, object_name: str, metadata: dict[str, str] | None = None,
                 bucket: str | None = None) -> str:
        uploaded.append((env, bucket or env["IMPORT_BUCKET"], object_name))
        return upload(env, path, object_name, metadata, bucket)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo, "upload", recorded)
        yield
    for env, bucket, name in uploaded:
        if local_stack.pid_alive(Path(env["PREFECT_HOME"]).parent / "localoci.pid") is None:
            continue  # a stack that has stopped (a module's own, the fleet's), its objects with it
        client, _ = demo.stack_clients(env)
        try:
            client.delete_object(env["OCI_NAMESPACE"], bucket, name)
        except oci.exceptions.ServiceError as exc:
            if exc.status != 404:  # the test removed it itself
                raise


@dataclass(frozen=True)
class Disk:
    raw: Path
    table: str


@pytest.fixture(scope="session")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Disk]:
    """A GPT and an MBR disk, each with ext4, xfs and vfat partitions holding FILES."""
    tmp = tmp_path_factory.mktemp("disks")
    made = {}
    for table in ("gpt", "dos"):
        raw = tmp / f"{table}.raw"
        build_disk(raw, FILES, table=table)
        made[table] = Disk(raw, table)
    return made


def image_of(disk: Disk, fmt: str, target: Path, options: str | None = None) -> Path:
    if fmt == "raw":
        subprocess.run(["cp", "--sparse=always", str(disk.raw), str(target)], check=True)
        return target
    return convert(disk.raw, target, fmt, options)


def run_import(stack: dict[str, str], path: Path, object_name: str, metadata: dict[str, str] | None = None,
               **parameters: Any) -> tuple[str, Any]:
    """Upload to the unwatched bucket and start the import by hand; return (etag, flow run)."""
    etag = demo.upload(stack, path, object_name, metadata, bucket=MANUAL_BUCKET)
    return etag, demo.start_import(stack, object_name, bucket=MANUAL_BUCKET, etag=etag, **parameters)


def live_inventory(stack: dict[str, str]) -> dict[str, Any]:
    return demo.inventory(stack)


def admin(stack: dict[str, str], method: str, path: str, body: Any = None) -> Any:
    reply = demo.local_http().request(method, f"{stack['LOCALOCI_ENDPOINT']}/_localoci/{path}", json=body)
    reply.raise_for_status()
    return reply.json() if reply.content else None


def resources_of(stack: dict[str, str], etag: str) -> dict[str, list[dict[str, Any]]]:
    inventory = live_inventory(stack)
    return {kind: [r for r in inventory[kind] if r["freeformTags"].get("import-etag") == etag]
            for kind in ("instances", "volumes")}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed end-to-end test shows the errors its stack's Prefect server and worker logged
    while it ran: CI keeps only the test output, and the stack is gone afterwards."""
    outcome = yield
    report = outcome.get_result()
    env = getattr(item, "funcargs", {}).get("stack")
    if not report.failed or not isinstance(env, dict) or "PREFECT_HOME" not in env:
        return
    base = Path(env["PREFECT_HOME"]).parent
    started = call.start
    for log in ("prefect-server.log", "prefect-worker.log"):
        path = base / log
        if path.exists():
            report.sections.append((f"{log}: errors during the test", _errors_since(path, started)))


def _errors_since(path: Path, since: float, limit: int = 60) -> str:
    """The ERROR lines (with their exception's last line) a stack log gained since ``since``."""
    import datetime

    first = datetime.datetime.fromtimestamp(since).strftime("%H:%M:%S")
    picked: list[str] = []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines):
        if line[:8] >= first and "| ERROR" in line:
            cause = next((later for later in lines[number + 1:number + 400]
                          if later and not later.startswith((" ", "Traceback", "The above", "During"))
                          and "| " not in later[:16]), "")
            picked.append(f"{line[:220]}\n    {cause[:220]}")
    return "\n".join(picked[-limit:]) or "(none)"


@pytest.fixture(scope="module")
def guests_built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any], guest_disks.GuestDisk]:
    """Each guest layout (tests/guest_disks.py) built once for the module."""
    tmp = tmp_path_factory.mktemp("guest-disks")
    built: dict[Any, guest_disks.GuestDisk] = {}

    def get(build: Any) -> guest_disks.GuestDisk:
        if build not in built:
            built[build] = build(tmp / f"guest{len(built)}.disk")
        return built[build]
    return get
