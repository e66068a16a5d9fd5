"""The local stack (local OCI, Prefect server, worker, deployments) for end-to-end tests.

One stack serves each test worker: ``--dist loadfile`` runs each end-to-end module on one
worker, so the modules run side by side, each on its own stack.
"""

from __future__ import annotations

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
from tests.conftest import empty_bucket

FILES = {"hello.txt": b"hello from the source disk\n", "random.bin": os.urandom(2 * 1024 * 1024)}


MANUAL_BUCKET = "manual-imports"
SUFFIX = {"qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vpc": "vhd", "vdi": "vdi", "raw": "raw"}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The stack, plus a bucket that no Events rule watches, for imports started by hand
    (an upload to the import bucket starts its own run through the trigger)."""
    base = tmp_path_factory.mktemp("stack")
    previous = os.environ.get("LOCAL_DIR")
    os.environ["LOCAL_DIR"] = str(base)
    try:
        env = local_stack.up()
        client, _ = demo.stack_clients(env)
        client.create_bucket(env["OCI_NAMESPACE"], oci.object_storage.models.CreateBucketDetails(
            name=MANUAL_BUCKET, compartment_id=env["COMPARTMENT_ID"]))
        yield env
    finally:
        local_stack.down(purge=True)
        if previous is None:
            os.environ.pop("LOCAL_DIR", None)
        else:
            os.environ["LOCAL_DIR"] = previous


@pytest.fixture(scope="module", autouse=True)
def empty_buckets_after_module(request: pytest.FixtureRequest) -> Iterator[None]:
    """The objects a module uploaded go when it ends: a worker's modules share its stack, and
    their images would add up to gigabytes."""
    yield
    if "stack" not in request.fixturenames:
        return
    env = request.getfixturevalue("stack")
    client, _ = demo.stack_clients(env)
    for name in (MANUAL_BUCKET, env["IMPORT_BUCKET"]):
        empty_bucket(client, env["OCI_NAMESPACE"], name)


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
    import httpx

    reply = httpx.request(method, f"{stack['LOCALOCI_ENDPOINT']}/_localoci/{path}", json=body, timeout=30)
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
