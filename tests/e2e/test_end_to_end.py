"""End to end on the local stack (local OCI, Prefect server and worker, deployments).

Everything here shares one stack of its own and runs in one module, so that under
``--dist loadfile`` it runs on one test worker, one test after another (fault
injection is global to the stack, one test restarts its Prefect server, another pauses
its watchers), while the other modules run in parallel on the shared stack.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import oci
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
from prefect.client.schemas.objects import StateType

from deployments import demo, local_stack
from diskimport import naming
from flows.runs import IMPORT_SLOTS
from diskimport.keys import SshKeyPair, cloud_init_host_keys
from tests.e2e.conftest import (MANUAL_BUCKET, SUFFIX, Disk, admin, image_of, live_inventory, resources_of,
                               run_import)
from tests.waiting import wait_for, wait_until_past
from tests import waiting

pytestmark = pytest.mark.own_stack


# -- Every supported format and partition table imports and reads back as the source disk.

CASES = {
    # name: (format, qemu-img -o options, partition table)
    "qcow2-gpt": ("qcow2", None, "gpt"),
    "vmdk-monolithicsparse-dos": ("vmdk", "subformat=monolithicSparse", "dos"),
    "vmdk-streamoptimized-gpt": ("vmdk", "subformat=streamOptimized", "gpt"),
    "vhdx-dos": ("vhdx", None, "dos"),
    "vpc-gpt": ("vpc", None, "gpt"),
    "vpc-fixed-dos": ("vpc", "subformat=fixed", "dos"),  # Azure's VHD: the disk, then a footer
    "vdi-dos": ("vdi", None, "dos"),
    "raw-gpt": ("raw", None, "gpt"),
}


@pytest.fixture(scope="module")
def imports(stack: dict[str, str], disks: dict[str, Disk], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start every case at once through the one stack, then wait for all of them."""
    tmp = tmp_path_factory.mktemp("images")
    started = {}
    for case, (fmt, options, table) in CASES.items():
        image = image_of(disks[table], fmt, tmp / f"{case}.{SUFFIX[fmt]}", options)
        object_name = f"formats/{case}.{SUFFIX[fmt]}"
        etag, run = run_import(stack, image, object_name)
        started[case] = {"image": image, "etag": etag, "run": run, "object": object_name, "table": table}
    for case, item in started.items():
        run = demo.wait_for_run(stack, item["run"].id, timeout=900)
        item["final"] = run
        item["summary"] = demo.run_result(stack, run) if run.state.is_completed() else None
    return started


@pytest.mark.parametrize("case", list(CASES))
def test_image_imports_and_volume_holds_the_source_disk(case: str, imports: dict[str, Any], stack, disks) -> None:
    item = imports[case]
    run = item["final"]
    assert run.state.is_completed(), f"{case}: {run.state.name}: {run.state.message}"
    summary = item["summary"]
    assert summary["format"] == CASES[case][0]
    volume = next(v for v in live_inventory(stack)["volumes"] if v["id"] == summary["volume_id"])
    assert volume["freeformTags"]["import-state"] == "imported"
    assert volume["freeformTags"]["import-etag"] == item["etag"]
    assert volume["vpusPerGB"] == 10
    # The volume's bytes are the source disk's guest-visible bytes (and zeros beyond).
    source_raw: Path = disks[item["table"]].raw
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source_raw),
                               volume["backingFile"]], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    checks = {c["filesystem"]: c["status"] for c in summary["filesystems"]}
    assert checks == {"ext4": "clean", "xfs": "clean", "vfat": "clean"}


def test_no_worker_attachment_par_or_worker_slot_is_left(imports: dict[str, Any], stack) -> None:
    inventory = live_inventory(stack)
    assert inventory["instances"] == []
    assert inventory["attachments"] == []
    assert inventory["pars"] == []
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(IMPORT_SLOTS).active_slots == 0


def test_reimport_of_same_etag_returns_existing_volume(imports: dict[str, Any], stack) -> None:
    item = imports["qcow2-gpt"]
    volumes_before = {v["id"] for v in live_inventory(stack)["volumes"]}
    run = demo.start_import(stack, item["object"], bucket=MANUAL_BUCKET, etag=item["etag"])
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    result = demo.run_result(stack, final)
    assert result["reused"] is True and result["volume_id"] == item["summary"]["volume_id"]
    assert {v["id"] for v in live_inventory(stack)["volumes"]} == volumes_before


# -- Faults at each step: each run succeeds after retry or fails naming the cause, and leaves
# no worker (and, when it fails, no volume) behind.

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


def wait_for_task(stack: dict[str, str], flow_run_id: Any, task_name: str, timeout: float = 300) -> None:
    """Wait until a task whose name starts with ``task_name`` runs in the flow run."""
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        wait_for(lambda: any(r.state and r.state.is_running() for r in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=task_name)))),
            timeout, f"task {task_name} running in flow run {flow_run_id}", interval=0.2)


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


def test_a_worker_vm_lost_mid_write_is_replaced_and_the_import_ends_with_one_volume(stack, qcow2, clean_faults):
    # Slow the download so the worker is still writing when its SSH goes away.
    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": 1024 * 1024})
    etag, run = run_import(stack, qcow2, "faults/ssh-dropped.qcow2")
    try:
        wait_for_task(stack, run.id, "write-image")
        # Barrier: the worker has read part of the image, so it is writing when it goes away.
        key = f"{stack['OCI_NAMESPACE']}/{MANUAL_BUCKET}/faults/ssh-dropped.qcow2"
        read = admin(stack, "GET", "metrics")["objectBytesRead"].get(key, 0)
        wait_for(lambda: admin(stack, "GET", "metrics")["objectBytesRead"].get(key, 0) > read,
                 what="the worker reading the image")
        worker = resources_of(stack, etag)["instances"]
        assert len(worker) == 1
        admin(stack, "POST", f"instances/{worker[0]['id']}/crash")
    finally:
        admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": None})
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    summary = demo.run_result(stack, final)
    after = resources_of(stack, etag)
    assert after["instances"] == [] and [v["id"] for v in after["volumes"]] == [summary["volume_id"]]
    ever = [i for i in admin(stack, "GET", "inventory?all=true")["instances"]
            if i["freeformTags"].get("import-etag") == etag]
    assert len(ever) == 2 and worker[0]["id"] in {i["id"] for i in ever}  # the lost one, and its replacement


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
    assert "FilesystemErrors: filesystem-errors: " in text and "ext4" in text, text
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


def killed_mid_task_finishes_by_itself(stack: dict[str, str], flow_run_id: Any, task_name: str,
                                       timeout: float = 900) -> Any:
    """SIGKILL the flow run's process once ``task_name`` runs and lift the read cap the caller set
    to slow it down; nobody retries it: the run must come back by itself (the crash hook cleans
    up and schedules it again) and end. Returns the ended run, having seen the crash."""
    try:
        wait_for_task(stack, flow_run_id, task_name)
        pid = _flow_run_process(flow_run_id)
        assert pid is not None, "flow run process not found"
        os.kill(pid, signal.SIGKILL)
    finally:
        admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": None})
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        # Crashed is a final state, but here only on the way to the next attempt
        run = wait_for(lambda: (r := client.read_flow_run(flow_run_id)).state is not None and r.state.is_final()
                       and not r.state.is_crashed() and r, timeout, f"flow run {flow_run_id} ended", interval=1)
        history = [state.type for state in client.read_flow_run_states(flow_run_id)]
    assert StateType.CRASHED in history, history
    assert run.run_count == 2, run.run_count  # the killed attempt and the one that finished
    return run


def test_run_killed_mid_write_finishes_by_itself_with_exactly_one_volume(stack, qcow2, clean_faults):
    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": 1024 * 1024})
    etag, run = run_import(stack, qcow2, "faults/killed.qcow2")
    final = killed_mid_task_finishes_by_itself(stack, run.id, "write-image")
    assert final.state.is_completed(), final.state.message
    summary = demo.run_result(stack, final)
    after = resources_of(stack, etag)
    assert after["instances"] == []
    assert [v["id"] for v in after["volumes"]] == [summary["volume_id"]]
    # The bound: a run that has already started retries + 1 times stays crashed.
    from prefect.states import Crashed

    from flows.runs import HOST_CRASH_REPORT, reschedule_crashed_run

    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Crashed(message=f"{HOST_CRASH_REPORT} (a third crash)"), force=True)
        assert reschedule_crashed_run(run.id, retries=1, wait=0) is False
        assert client.read_flow_run(run.id).state.is_crashed()


# -- A run asking for its worker VM slot while the server stalls keeps asking.

class StallingProxy:
    """A TCP proxy in front of the Prefect server that leaves the first ``stalls`` requests for a
    worker VM slot unanswered: a server sitting on requests, as a SQLite-backed one does under load."""

    def __init__(self, target_port: int, stalls: int) -> None:
        self.target_port, self.stalls, self.stalled, self.held = target_port, stalls, 0, []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, a: Any, b: Any, from_client: bool) -> None:
        try:
            while data := a.recv(65536):
                if from_client and b"increment-with-lease" in data:
                    with self.lock:
                        stall = self.stalled < self.stalls
                        self.stalled += stall
                    if stall:
                        self.held.append((a, b))  # open and silent: the client times out
                        return
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(2)
            except OSError:
                pass


def test_a_worker_slot_asked_of_a_stalled_server_is_granted_once_it_answers(stack):
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_API_URL, temporary_settings

    from prefect.exceptions import ObjectNotFound

    from blocks.settings import ImportSettings
    from flows.runs import import_slot

    server = stack["PREFECT_API_URL"]
    with local_stack.prefect_api(server), get_client(sync_client=True) as client:
        try:  # as the imports before this test left it, else as the first import makes it
            limit = client.read_global_concurrency_limit_by_name(IMPORT_SLOTS).limit
        except ObjectNotFound:
            limit = ImportSettings.model_fields["worker_concurrency_limit"].default
    proxy = StallingProxy(int(server.rsplit(":", 1)[1].split("/")[0]), stalls=3)
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{proxy.port}/api",
                                     PREFECT_API_REQUEST_TIMEOUT: 1.0}):
        with import_slot(limit) as lease_id:
            with local_stack.prefect_api(server), get_client(sync_client=True) as client:
                client.renew_concurrency_lease(lease_id, 300)  # held: it can be renewed
    assert proxy.stalled == 3  # asked (and its hedge), timed out, asked again
    with local_stack.prefect_api(server), get_client(sync_client=True) as client:
        with pytest.raises(httpx.HTTPStatusError) as gone:
            client.renew_concurrency_lease(lease_id, 300)
    assert gone.value.response.status_code == 410  # given back


def test_a_worker_slot_lease_outlives_a_restart_of_the_prefect_server(stack):
    """A lease the server forgot on restart would keep its slot taken for good (the limit still
    counts it, and nothing expires it): every run after would wait for a worker VM forever."""
    from blocks.settings import ImportSettings
    from flows.runs import import_slot

    base = local_stack.local_dir()
    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        with import_slot(ImportSettings.model_fields["worker_concurrency_limit"].default) as lease_id:
            local_stack.process.stop_pid(local_stack.pid_alive(base / "prefect-server.pid"))
            local_stack.start_prefect_server(base, local_stack.read_env(base / "stack.env"))
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(lease_id, 300)  # still known, so it can expire or be given back
        with get_client(sync_client=True) as client, pytest.raises(httpx.HTTPStatusError) as gone:
            client.renew_concurrency_lease(lease_id, 300)
    assert gone.value.response.status_code == 410  # given back


# -- sweep-orphans removes what a dead run left, and never an imported volume.

def test_sweep_removes_workers_and_unfinished_volumes_of_dead_runs_only(stack):
    config = oci.config.from_file(stack["OCI_CONFIG_FILE"], stack["OCI_PROFILE"])
    compute = oci.core.ComputeClient(config, service_endpoint=stack["LOCALOCI_ENDPOINT"])
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=stack["LOCALOCI_ENDPOINT"])
    models = oci.core.models
    dead_run = str(uuid.uuid4())
    tags = {naming.TAG_MANAGED_BY: naming.MANAGED_BY, naming.TAG_FLOW_RUN: dead_run, naming.TAG_IMPORT_ID: "sweep"}
    ad = "local:LOCAL-AD-3"
    worker = compute.launch_instance(models.LaunchInstanceDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, shape="VM.Standard.E4.Flex",
        shape_config=models.LaunchInstanceShapeConfigDetails(ocpus=1, memory_in_gbs=16),
        source_details=models.InstanceSourceViaImageDetails(image_id=stack["IMAGE_ID"]),
        create_vnic_details=models.CreateVnicDetails(subnet_id=stack["SUBNET_ID"]),
        metadata={"ssh_authorized_keys": SshKeyPair.generate().public_openssh,
                  "user_data": cloud_init_host_keys(SshKeyPair.generate())},
        freeform_tags=tags)).data
    unfinished = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, size_in_gbs=50,
        freeform_tags={**tags, naming.TAG_STATE: naming.STATE_WRITING})).data
    imported = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, size_in_gbs=50,
        freeform_tags={**tags, naming.TAG_STATE: naming.STATE_IMPORTED})).data
    unmanaged = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=stack["COMPARTMENT_ID"], availability_domain=ad, size_in_gbs=50,
        freeform_tags={naming.TAG_FLOW_RUN: dead_run})).data
    waiting.wait_until(compute, compute.get_instance(worker.id), "lifecycle_state", "RUNNING", max_wait_seconds=60)
    for volume in (unfinished, imported, unmanaged):
        waiting.wait_until(blockstorage, blockstorage.get_volume(volume.id), "lifecycle_state", "AVAILABLE",
                       max_wait_seconds=60)

    from flows.sweep import sweep_orphans

    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        removed = sweep_orphans(min_age_minutes=0)

    assert worker.id in removed["instances"]
    assert unfinished.id in removed["volumes"]
    live = live_inventory(stack)
    live_volumes = {v["id"] for v in live["volumes"]}
    assert worker.id not in {i["id"] for i in live["instances"]}
    assert unfinished.id not in live_volumes
    assert {imported.id, unmanaged.id} <= live_volumes
    for volume in (imported, unmanaged):
        blockstorage.delete_volume(volume.id)


def test_the_sweeper_deployment_gets_its_scheduled_runs(stack):
    """The server's scheduler turns the hourly cron of ``sweep-orphans/hourly`` into scheduled
    runs (the sweeper is the last line against leaks only if it actually runs)."""
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterName, FlowRunFilterState,
                                                FlowRunFilterStateType)

    # the scheduler service looks every 60 s
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        scheduled = wait_for(lambda: client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["hourly"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))), limit=5),
            300, "the scheduler making runs of sweep-orphans/hourly", interval=3)
    assert {run.expected_start_time.minute for run in scheduled} == {17}


# -- An upload alone starts the import: Events rule -> function (FDK runner) -> Prefect run.

def test_object_put_leads_to_a_finished_import_without_any_manual_step(stack, disks, tmp_path):
    image = image_of(disks["dos"], "vdi", tmp_path / "uploaded.vdi")
    object_name = f"uploads/{uuid.uuid4().hex[:8]} by event.vdi"
    etag = demo.upload(stack, image, object_name, {"vpus": "20"})
    run = demo.run_started_by_upload(stack, object_name, etag)
    assert run.idempotency_key == f"{stack['OCI_NAMESPACE']}/{stack['IMPORT_BUCKET']}/{object_name}@{etag}"
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    summary = demo.run_result(stack, final)
    assert summary["format"] == "vdi" and summary["vpus_per_gb"] == 20
    assert admin(stack, "GET", "events")["pending"] == []


# -- An upload starts an import and an operator starts the same one by hand: two green runs,
# one volume.

def test_a_run_started_by_hand_beside_the_upload_run_waits_and_returns_its_volume(stack, disks, tmp_path):
    image = image_of(disks["gpt"], "qcow2", tmp_path / "twice.qcow2")
    object_name = f"uploads/{uuid.uuid4().hex[:8]}-twice.qcow2"
    etag = demo.upload(stack, image, object_name)
    by_upload = demo.run_started_by_upload(stack, object_name, etag)
    by_hand = demo.start_import(stack, object_name, etag=etag)
    finals = [demo.wait_for_run(stack, run.id) for run in (by_upload, by_hand)]
    assert all(final.state.is_completed() for final in finals), [f.state.message for f in finals]
    summaries = [demo.run_result(stack, final) for final in finals]
    assert {s["volume_id"] for s in summaries} == {summaries[0]["volume_id"]}
    assert sorted(s["reused"] for s in summaries) == [False, True]
    assert [v["id"] for v in resources_of(stack, etag)["volumes"]] == [summaries[0]["volume_id"]]
    assert resources_of(stack, etag)["instances"] == []
    names = {final.name for final in finals}
    assert names == {f"{object_name.rsplit('/', 1)[-1]}@{etag.strip(chr(34))[:8]}"}, names


@pytest.fixture
def watchers_paused(stack) -> Iterator[None]:
    """The stack's own reconciler and host-death automations held still, so a test that drives
    :func:`deployments.reconciler.reconcile_once` itself is the only thing that moves its runs."""
    from deployments import automations

    pid = local_stack.pid_alive(Path(stack["PREFECT_HOME"]).parent / "reconciler.pid")
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        paused = [a.id for name in automations.NAMES for a in client.read_automations_by_name(name) if a.enabled]
        for automation_id in paused:
            client.pause_automation(automation_id)
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            if pid is not None:
                os.kill(pid, signal.SIGCONT)
            for automation_id in paused:
                client.resume_automation(automation_id)


def test_the_reconciler_recovers_import_runs_whose_events_were_lost(stack, watchers_paused):
    """Runs left Running without heartbeats, Pending by a dead host, or Crashed with nobody to
    retry them (their events lost in a server restart) are put right from their states alone.
    The runs belong to a deployment on a work pool no worker polls, so nothing else moves them."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.events import Event
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.states import Crashed, Pending, Running

    from deployments import reconciler as reconcile

    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        pool = f"nobody-polls-{uuid.uuid4().hex[:8]}"
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        deployment = client.create_deployment(flow_id=client.create_flow_from_name("import-virtual-disk"),
                                              name=pool, work_pool_name=pool,
                                              entrypoint="flows/import_disk.py:import_virtual_disk")
        runs = {role: client.create_flow_run_from_deployment(deployment).id
                for role in ("silent", "alive", "pending", "crashed", "spent")}
        for role in ("silent", "alive", "spent"):
            client.set_flow_run_state(runs[role], Pending())
            client.set_flow_run_state(runs[role], Running())
        client.set_flow_run_state(runs["pending"], Pending())
        client.set_flow_run_state(runs["crashed"], Pending())
        for role in ("crashed", "spent"):
            client.set_flow_run_state(runs[role], Crashed(message="Flow run infrastructure exited with code -9"))
        # every state older than the 3 s of silence (silence is a time: the clock must pass it)
        wait_until_past(max(client.read_flow_run(run_id).state.timestamp for run_id in runs.values())
                        + dt.timedelta(seconds=4))
        beat = Event(event=reconcile.HEARTBEAT, resource={"prefect.resource.id": f"prefect.flow-run.{runs['alive']}"})
        client._client.post("/events", json=[beat.model_dump(mode="json")]).raise_for_status()
        wait_for(lambda: client.read_events(EventFilter(event=EventNameFilter(name=[reconcile.HEARTBEAT]), resource=
                                                        EventResourceFilter(id=[beat.resource.id])), limit=1).events,
                 what="the heartbeat stored", interval=0.3)

        def states() -> dict[str, str]:
            return {role: client.read_flow_run(run_id).state.name for role, run_id in runs.items()}

        first = reconcile.reconcile_once(client, silence=3, retries=0, grace=2,
                                         now=beat.occurred + dt.timedelta(seconds=1), deployment_ids=[deployment])
        assert first.crashed_silent == [str(runs["silent"])]
        assert first.crashed_pending == [str(runs["pending"])]
        assert first.rescheduled == [str(runs["crashed"])]  # started 0 times, may start once
        assert first.left_crashed == [str(runs["spent"])]  # started once already
        assert states() == {"silent": "Crashed", "alive": "Running", "pending": "Crashed",
                            "crashed": "AwaitingRetry", "spent": "Crashed"}
        silence_message = client.read_flow_run(runs["silent"]).state.message
        assert silence_message.startswith(reconcile.SILENCE_MESSAGE), silence_message

        # The runs it crashed are scheduled again once their crash is older than the grace, within their bound.
        second = reconcile.reconcile_once(client, silence=3, retries=0, grace=2, judge_silence=False,
                                          now=beat.occurred + dt.timedelta(seconds=10), deployment_ids=[deployment])
        assert not second.crashed_silent and not second.crashed_pending
        assert second.rescheduled == [str(runs["pending"])]
        assert sorted(second.left_crashed) == sorted([str(runs["silent"]), str(runs["spent"])])
        assert states()["pending"] == "AwaitingRetry"
