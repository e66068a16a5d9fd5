"""Faults at each step: each run succeeds after retry or fails naming the cause, and leaves
no worker (and, when it fails, no volume) behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

from deployments import demo, local_stack
from tests.e2e.conftest import Disk, admin, image_of, live_inventory, run_import


@pytest.fixture
def clean_faults(stack: dict[str, str]) -> Iterator[None]:
    admin(stack, "DELETE", "faults")
    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": None})
    yield
    admin(stack, "DELETE", "faults")
    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": None})


@pytest.fixture(scope="module")
def qcow2(disks: dict[str, Disk], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_of(disks["gpt"], "qcow2", tmp_path_factory.mktemp("faults") / "disk.qcow2")


def resources_of(stack: dict[str, str], etag: str) -> dict[str, list[dict[str, Any]]]:
    inventory = live_inventory(stack)
    return {kind: [r for r in inventory[kind] if r["freeformTags"].get("import-etag") == etag]
            for kind in ("instances", "volumes")}


def wait_for_task(stack: dict[str, str], flow_run_id: Any, task_name: str, timeout: float = 300) -> None:
    """Wait until a task whose name starts with ``task_name`` runs in the flow run."""
    deadline = time.monotonic() + timeout
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=task_name)))
            if any(r.state and r.state.is_running() for r in runs):
                return
            time.sleep(0.2)
    raise TimeoutError(f"task {task_name} never ran in flow run {flow_run_id}")


def test_throttled_volume_creation_succeeds_after_retry(stack, qcow2, clean_faults):
    admin(stack, "POST", "faults", {"operation": "CreateVolume", "count": 2, "status": 429,
                                    "code": "TooManyRequests", "message": "Too many requests for the tenancy."})
    etag, run = run_import(stack, qcow2, "faults/throttled.qcow2")
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    assert admin(stack, "GET", "faults") == []
    left = resources_of(stack, etag)
    assert left["instances"] == [] and len(left["volumes"]) == 1


def test_out_of_host_capacity_moves_to_the_next_availability_domain(stack, qcow2, clean_faults):
    admin(stack, "POST", "faults", {"operation": "LaunchInstance", "count": 10, "status": 500,
                                    "code": "InternalError", "message": "Out of host capacity.",
                                    "match": {"availabilityDomain": "local:LOCAL-AD-1"}})
    etag, run = run_import(stack, qcow2, "faults/capacity.qcow2")
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    summary = demo.run_result(stack, final)
    assert summary["availability_domain"] == "local:LOCAL-AD-2"
    left = resources_of(stack, etag)
    assert left["instances"] == []
    assert [v["availabilityDomain"] for v in left["volumes"]] == ["local:LOCAL-AD-2"]


def test_ssh_dropped_during_the_write_fails_naming_the_cause_and_cleans_up(stack, qcow2, clean_faults):
    # Slow the download so the worker is still writing when its SSH goes away.
    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": 1024 * 1024})
    etag, run = run_import(stack, qcow2, "faults/ssh-dropped.qcow2")
    wait_for_task(stack, run.id, "write-image")
    time.sleep(1)
    worker = resources_of(stack, etag)["instances"]
    assert len(worker) == 1
    admin(stack, "POST", f"instances/{worker[0]['id']}/crash")
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_failed()
    message = final.state.message or ""
    result = str(demo.run_result(stack, final))
    assert any(word in (message + result) for word in ("SSH", "ssh", "Connection", "connect", "Socket", "closed")), \
        message + result
    assert resources_of(stack, etag) == {"instances": [], "volumes": []}


def test_corrupted_filesystem_fails_the_import_with_the_checker_output(stack, disks, tmp_path, clean_faults):
    raw = tmp_path / "corrupt.raw"
    subprocess.run(["cp", "--sparse=always", str(disks["gpt"].raw), str(raw)], check=True)
    # Clear the ext4 root inode: the image is still a valid disk, its first filesystem is not.
    subprocess.run(["debugfs", "-w", "-R", "clri <2>", f"{raw}?offset={1024 * 1024}"], check=True,
                   capture_output=True)
    etag, run = run_import(stack, raw, "faults/corrupt.raw")
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_failed()
    text = (final.state.message or "") + str(demo.run_result(stack, final))
    assert "filesystem check failed" in text and "ext4" in text, text
    assert resources_of(stack, etag) == {"instances": [], "volumes": []}


def _flow_run_process(flow_run_id: Any) -> int | None:
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    return int(entry)
            except OSError:
                continue
    return None


def test_run_killed_mid_write_and_retried_finishes_with_exactly_one_volume(stack, qcow2, clean_faults):
    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": 1024 * 1024})
    etag, run = run_import(stack, qcow2, "faults/killed.qcow2")
    wait_for_task(stack, run.id, "write-image")
    pid = _flow_run_process(run.id)
    assert pid is not None, "flow run process not found"
    os.kill(pid, signal.SIGKILL)
    crashed = demo.wait_for_run(stack, run.id)
    assert crashed.state.is_crashed(), crashed.state
    # The process worker reaps the killed process a few seconds after the run is marked
    # crashed, runs the flow's on_crashed hook (which removes the run's worker and volume)
    # and reports the crash again; a retry scheduled before that report would be marked
    # crashed by it. An operator retries later; the test waits for that report.
    worker_log = Path(stack["PREFECT_HOME"]).parent / "prefect-worker.log"
    reported = f"Reported flow run '{run.id}' as crashed: Flow run infrastructure exited"
    deadline = time.monotonic() + 60
    while reported not in worker_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": None})

    env = local_stack.prefect_env(Path(stack["PREFECT_HOME"]).parent, stack["PREFECT_API_URL"])
    retried = subprocess.run([local_stack.PREFECT, "flow-run", "retry", str(run.id)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    summary = demo.run_result(stack, final)
    after = resources_of(stack, etag)
    assert after["instances"] == []
    assert [v["id"] for v in after["volumes"]] == [summary["volume_id"]]
