"""``make fleet``: a burst of uploads imported through a schedule of faults, on a Prefect server
backed by PostgreSQL with two Prefect workers (two hosts), and what it left behind.

The stack (``LOCAL_DIR``, default ``.local/fleet``, started fresh) is the local stack on
Debian's PostgreSQL, plus a second "host": a warm runner and a Prefect worker of their own,
in their own working directory. The worker VMs' network and the object reads follow the
bench's model. Then N uploads go to the import bucket at once (default 60): mixed formats
and sizes, a few hostile images, a few objects whose upload events are delivered twice, and
a few names uploaded again with new content once their first import is done. Meanwhile the
fault schedule runs, each at a point of the burst:

- ``host``: the first host seen running a flow run dies mid-write (its worker, its warm runner
  and its flow runs killed) and comes back 20 s later; its runs are crashed by their silence
  and retried;
- ``throttle``: 429 on 20% of the Compute and Block Storage calls for a minute;
- ``lost``: the replies of some creates lost after they took effect (volumes, instances);
- ``vm``: a worker VM crashed mid-write;
- ``oci``: the local OCI restarted;
- ``prefect``: the Prefect server restarted.

When every run has ended it sweeps (as ``sweep-orphans/hourly`` does), counts what is left,
prints a table and, last, one JSON line; it exits 0 only with no lost upload (only the
hostile ones may fail), no duplicate volume and nothing left over.

    python -m deployments.fleet [--uploads 60] [--faults host,throttle,lost,vm,oci,prefect]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from deployments import bench_pool, demo, local_stack
from diskimport import contract, sample_disk

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
ALL_FAULTS = ("host", "throttle", "lost", "vm", "oci", "prefect")
CORE_OPERATIONS = ("CreateVolume", "GetVolume", "UpdateVolume", "ListVolumes", "LaunchInstance", "GetInstance",
                   "ListInstances", "AttachVolume", "GetVolumeAttachment", "DetachVolume", "ListVnicAttachments",
                   "GetVnic", "TerminateInstance")
# The bench's model of a tenancy: each object read connection and each worker VM OCPU's network.
READ_PER_CONNECTION = 100 * MiB
WORKER_PER_OCPU = 125 * MiB
WORKER_OCPUS = 2
WORKER_SLOTS = 4  # the settings block's worker_concurrency_limit: worker VMs at once


@dataclasses.dataclass
class Upload:
    name: str
    path: Path
    kind: str                 # "good", "hostile", "duplicate" (its event delivered twice) or "reupload"
    etag: str = ""
    run_id: Any = None
    final: Any = None
    replaces: str | None = None  # a reupload: the name it uploads again


def admin(env: dict[str, str], method: str, path: str, body: Any = None) -> Any:
    reply = demo.local_http().request(method, f"{env['LOCALOCI_ENDPOINT']}/_localoci/{path}", json=body, timeout=60)
    reply.raise_for_status()
    return reply.json() if reply.content else None


# -- the corpus --------------------------------------------------------------------------------

def build_corpus(work: Path, uploads: int, rng: random.Random) -> list[Upload]:
    """Disks of a few sizes in every format, some hostile; names for ``uploads`` uploads."""
    work.mkdir(parents=True, exist_ok=True)
    disks = []
    for i, data_mib in enumerate((8, 24, 48, 96) if uploads > 12 else (4, 8, 16)):
        raw = work / f"disk{i}.raw"
        sample_disk.build_disk(raw, {"data.bin": rng.randbytes(data_mib * MiB // 2), "notes.txt": b"fleet\n"},
                               filesystems=("ext4", "vfat"))
        disks.append(raw)
    images = []
    for i, raw in enumerate(disks):
        for fmt, suffix, options in (("qcow2", "qcow2", None), ("vmdk", "vmdk", "subformat=streamOptimized"),
                                     ("vhdx", "vhdx", None), ("vpc", "vhd", None)):
            images.append(sample_disk.convert(raw, work / f"disk{i}.{suffix}", fmt, options))
        images.append(raw)
        gz = work / f"disk{i}.raw.gz"
        with open(gz, "wb") as out:
            subprocess.run(["gzip", "-1", "-c", str(raw)], stdout=out, check=True)
        images.append(gz)
    hostile = work / "hostile.qcow2"
    # a backing file on the worker's own disk: refused from its header (backing_file)
    subprocess.run(["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(hostile),
                    "64M"], check=True)
    corpus = []
    n_hostile, n_duplicate, n_reupload = max(1, uploads // 20), max(1, uploads // 15), max(1, uploads // 20)
    for i in range(uploads - n_reupload):
        if i < n_hostile:
            corpus.append(Upload(f"fleet/hostile-{i}.qcow2", hostile, "hostile"))
            continue
        image = rng.choice(images)
        suffix = "".join(image.suffixes)
        kind = "duplicate" if i < n_hostile + n_duplicate else "good"
        corpus.append(Upload(f"fleet/{'dup' if kind == 'duplicate' else 'disk'}-{i}{suffix}", image, kind))
    goods = [u for u in corpus if u.kind == "good"]
    for i in range(n_reupload):
        first = goods[i]
        other = rng.choice([p for p in images if "".join(p.suffixes) == "".join(first.path.suffixes)
                            and p != first.path] or [first.path])
        corpus.append(Upload(first.name, other, "reupload", replaces=first.name))
    rng.shuffle(corpus)
    return corpus


# -- the second host ----------------------------------------------------------------------

def start_host(base: Path, api_url: str, name: str) -> dict[str, int]:
    """A warm runner and a Prefect worker in ``base / name``: a host of its own."""
    home = base / name
    home.mkdir(parents=True, exist_ok=True)
    env = {**local_stack.prefect_env(base, api_url), "PYTHONPATH": str(ROOT)}
    sock = home / "warm-runner.sock"
    sock.unlink(missing_ok=True)
    runner = local_stack.spawn([sys.executable, "-m", "deployments.warm_runner", str(sock)], env,
                                home / "warm-runner.log", base / f"{name}-warm-runner.pid", cwd=home)
    deadline = time.monotonic() + 120
    while not sock.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}'s warm runner did not start; see {home / 'warm-runner.log'}")
        time.sleep(0.1)
    worker = local_stack.spawn([local_stack.PREFECT, "worker", "start", "--pool", local_stack.WORK_POOL, "--type",
                                 "process", "--name", name], {**env, "IMPORT_WARM_RUNNER_SOCKET": str(sock)},
                                home / "prefect-worker.log", base / f"{name}-worker.pid", cwd=home)
    return {"runner": runner, "worker": worker}


def kill_processes(pids: list[int]) -> list[int]:
    """SIGKILL a host: its worker and warm runner (``pids``) and every process they started."""
    children = [pid for pid in _all_pids() if _parent(pid) in pids]
    killed = []
    for pid in pids + children:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _flow_run_id(pid: int) -> str | None:
    """The id of the flow run ``pid`` runs (from its environment), or None."""
    try:
        variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((v.split(b"=", 1)[1].decode() for v in variables if v.startswith(b"PREFECT__FLOW_RUN_ID=")), None)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# -- the fault schedule ---------------------------------------------------------------------

class Schedule:
    """The faults, each started once the burst has written some of its bytes (``at``: a share of
    the runs started writing), in a thread of its own; what each did is kept for the report."""

    def __init__(self, env: dict[str, str], base: Path, faults: list[str]) -> None:
        self.env, self.base, self.faults = env, base, faults
        self.done: dict[str, str] = {}
        self.threads: list[threading.Thread] = []
        self.writing = threading.Event()

    def start(self) -> None:
        actions: dict[str, Callable[[], str]] = {
            "host": self._host, "throttle": self._throttle, "lost": self._lost, "vm": self._vm,
            "oci": self._oci, "prefect": self._prefect}
        delays = {"lost": 0, "throttle": 5, "host": 10, "vm": 20, "oci": 40, "prefect": 60}
        for name in self.faults:
            thread = threading.Thread(target=self._run, args=(name, actions[name], delays[name]), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _run(self, name: str, action: Callable[[], str], delay: float) -> None:
        self.writing.wait(600)
        time.sleep(delay)
        try:
            self.done[name] = action()
        except Exception as exc:  # a fault that could not be made is reported, not fatal
            self.done[name] = f"not made: {exc!r}"

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=900)

    def _host(self) -> str:
        """Kill the first host seen running a flow run, with that run; start it again 20 s later."""
        hosts = {"host-1": ("prefect-worker.pid", "warm-runner.pid"),
                 "host-2": ("host-2-worker.pid", "host-2-warm-runner.pid")}
        for _ in range(600):
            # a flow run's command is a child of its worker (the run itself a child of the warm runner);
            # the host is killed once one of its runs is writing, so that run dies mid-write (a fixed
            # delay after the run started sometimes outlasted a short run, and then nothing died)
            busy = [name for name, (worker, _) in hosts.items()
                    if any(_parent(pid) == int((self.base / worker).read_text()) and self._writing(pid)
                           for pid in _all_pids())]
            if busy:
                break
            time.sleep(0.5)
        else:
            return "no host ran a flow run that wrote, to kill"
        name = busy[0]
        killed = kill_processes([int((self.base / f).read_text()) for f in hosts[name]])
        time.sleep(20)
        api_url = self.env["PREFECT_API_URL"]
        if name == "host-1":
            local_stack.start_warm_runner(self.base, api_url)
            local_stack.start_worker(self.base, api_url)
        else:
            start_host(self.base, api_url, name)
        return f"{name} killed ({len(killed)} processes) and started again 20 s later"

    def _writing(self, pid: int) -> bool:
        """Whether ``pid`` is a flow run's process whose run has a write task running."""
        run_id = _flow_run_id(pid)
        if run_id is None:
            return False
        try:
            reply = demo.local_http().post(self.env["PREFECT_API_URL"] + "/task_runs/filter", timeout=30, json={
                "flow_runs": {"id": {"any_": [run_id]}},
                "task_runs": {"name": {"like_": "write"}, "state": {"type": {"any_": ["RUNNING"]}}}})
        except httpx.HTTPError:
            return False
        return reply.is_success and bool(reply.json())

    def _throttle(self) -> str:
        for operation in CORE_OPERATIONS:
            admin(self.env, "POST", "faults", {"operation": operation, "status": 429, "code": "TooManyRequests",
                                               "message": "Too many requests for the tenancy.", "count": 1_000_000,
                                               "probability": 0.2, "seconds": 60})
        return f"429 on 20% of {len(CORE_OPERATIONS)} operations for 60 s"

    def _lost(self) -> str:
        admin(self.env, "POST", "faults", {"operation": "CreateVolume", "phase": "after", "drop": True, "count": 2})
        admin(self.env, "POST", "faults", {"operation": "LaunchInstance", "phase": "after", "status": 500,
                                           "count": 2})
        return "2 CreateVolume replies dropped, 2 LaunchInstance replies lost to a 500, after they took effect"

    def _vm(self) -> str:
        for _ in range(60):
            workers = [i for i in admin(self.env, "GET", "inventory")["instances"]
                       if i["lifecycleState"] == "RUNNING" and i["freeformTags"].get(contract.TAG_MANAGED_BY)]
            if workers:
                admin(self.env, "POST", f"instances/{workers[0]['id']}/crash")
                return f"worker VM {workers[0]['id'][-8:]} crashed"
            time.sleep(1)
        return "no worker VM was running"

    def _oci(self) -> str:
        pid = local_stack.pid_alive(self.base / "localoci.pid")
        if pid is not None:
            local_stack.process.stop_pid(pid)
        time.sleep(3)
        local_stack.start_localoci(self.base, local_stack.read_env(self.base / "stack.env"))
        return "local OCI stopped and started again 3 s later"

    def _prefect(self) -> str:
        pid = local_stack.pid_alive(self.base / "prefect-server.pid")
        if pid is not None:
            local_stack.process.stop_pid(pid)
        time.sleep(3)
        local_stack.start_prefect_server(self.base, local_stack.read_env(self.base / "stack.env"))
        return "Prefect server stopped and started again 3 s later"


# -- the run --------------------------------------------------------------------------------

def wait_all(env: dict[str, str], uploads: list[Upload], timeout: float, schedule: Schedule) -> None:
    """Until every upload's run has ended (a Crashed run on its way to a retry has not)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        while True:
            pending = [u for u in uploads if u.final is None]
            if not pending:
                return
            try:
                with get_client(sync_client=True) as client:
                    for upload in pending:
                        run = client.read_flow_run(upload.run_id)
                        if run.state is not None and (run.state.is_running() or run.state.is_pending()):
                            schedule.writing.set()
                        if run.state is not None and run.state.is_final() and not (
                                run.state.is_crashed() and run.run_count <= 2):
                            upload.final = run
            except Exception as exc:  # the server may be restarting
                print(f"  (waiting: {exc!r})", flush=True)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} runs had not ended after {timeout:.0f} s")
            time.sleep(3)


def start_uploads(env: dict[str, str], uploads: list[Upload]) -> None:
    for upload in uploads:
        upload.etag = demo.upload(env, upload.path, upload.name)
    for upload in uploads:
        upload.run_id = demo.run_started_by_upload(env, upload.name, upload.etag, timeout=600).id


def refusal_code(message: str | None) -> str:
    """The stable code in a failed run's state message (``...ImageRejected: <code>: ...``)."""
    found = re.search(r"\b[A-Z]\w+: ([a-z][a-z0-9_-]*): ", message or "")
    return found.group(1) if found else (message or "unknown")[:80]


def peak_memory(base: Path) -> dict[str, float]:
    """Each stack process's peak resident memory (VmHWM), in MB."""
    peaks = {}
    for pid_file in sorted(base.glob("*.pid")):
        pid = local_stack.pid_alive(pid_file)
        if pid is None:
            continue
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[pid_file.stem] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            continue
    return peaks


def leftovers(env: dict[str, str]) -> dict[str, int]:
    inventory = admin(env, "GET", "inventory")
    unfinished = [v for v in inventory["volumes"] if v["freeformTags"].get(contract.TAG_STATE) != contract.STATE_IMPORTED]
    return {"instances": len(inventory["instances"]), "volumes": len(unfinished),
            "attachments": len(inventory["attachments"]), "pars": len(inventory["pars"])}


def sweep(env: dict[str, str]) -> dict[str, list[str]]:
    """What ``sweep-orphans/hourly`` does, now: remove what no live run owns."""
    from blocks import ImportSettings, OCICredentials
    from diskimport import sweeper
    from flows.runs import run_is_active

    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        clients = OCICredentials.load(local_stack.BLOCKS["credentials"]).clients()
        settings = ImportSettings.load(local_stack.BLOCKS["settings"])
        import datetime as dt
        return sweeper.sweep(clients, env["COMPARTMENT_ID"], settings.compartment_id,
                             {contract.TAG_MANAGED_BY: contract.MANAGED_BY}, settings.keep_failed_volume,
                             sweeper.orphan_test(run_is_active, dt.timedelta(0)))


def scale_worker_vms(env: dict[str, str], worker_vms: int) -> None:
    """Allow ``worker_vms`` worker VMs at once (the settings block's limit), and that many flow
    runs plus two on the work pool: with a tenancy's provisioning times, a VM that boots holds a
    slot for minutes without using this machine."""
    from blocks import ImportSettings
    from deployments.local_stack import BLOCKS, WORK_POOL, prefect_api
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    with prefect_api(env["PREFECT_API_URL"]):
        settings = ImportSettings.load(BLOCKS["settings"])
        settings.worker_concurrency_limit = worker_vms
        settings.save(BLOCKS["settings"], overwrite=True)
        with get_client(sync_client=True) as client:
            client.update_work_pool(WORK_POOL, WorkPoolUpdate(concurrency_limit=worker_vms + 2))


def run(uploads: int = 60, faults: list[str] = list(ALL_FAULTS), seed: int = 1, timeout: float = 3600,
        base: Path | None = None, latency: str = "none", worker_vms: int = WORKER_SLOTS,
        pool: int = 0) -> dict[str, Any]:
    base = base or Path(os.environ.get("LOCAL_DIR") or ROOT / ".local" / "fleet")
    os.environ["LOCAL_DIR"] = str(base)
    local_stack.down(purge=True)
    shutil.rmtree(base, ignore_errors=True)
    rng = random.Random(seed)
    corpus = build_corpus(base / "corpus", uploads, rng)
    env = local_stack.up(database="postgres")
    local_stack.apply_latency(env, latency)
    if worker_vms != WORKER_SLOTS:
        scale_worker_vms(env, worker_vms)
    start_host(base, env["PREFECT_API_URL"], "host-2")
    admin(env, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": READ_PER_CONNECTION,
                                     "workerBytesPerSecondPerOcpu": WORKER_PER_OCPU})
    duplicates = {"displayName": "fleet-duplicate-events", "endpoint": env["FUNCTION_ENDPOINT"], "eventVersion": "1.0",
                  "condition": {"eventType": ["com.oraclecloud.objectstorage.createobject"],
                                "data": {"resourceName": "fleet/dup-*"}}}
    admin(env, "POST", "events/rules", duplicates)
    pool_since = time.time()
    if pool:  # filled ahead, as an operator's pool is before the uploads come
        bench_pool.set_pool_size(env, pool)
        bench_pool.wait_answering(env, bench_pool.tend(env)["launched"])
    schedule = Schedule(env, base, faults)
    first = [u for u in corpus if u.kind != "reupload"]
    again = [u for u in corpus if u.kind == "reupload"]
    started = time.monotonic()
    schedule.start()
    start_uploads(env, first)
    for upload in again:  # a name uploaded again once its first import has ended
        wait_all(env, [u for u in first if u.name == upload.replaces], timeout, schedule)
    start_uploads(env, again)
    wait_all(env, corpus, timeout, schedule)
    makespan = time.monotonic() - started
    schedule.join()
    pooled = pool_account(env, pool, pool_since)
    report = account(env, base, corpus, makespan, schedule.done, worker_vms)
    report["latency_profile"] = latency
    report["pool"] = pooled
    return report


def pool_account(env: dict[str, str], pool: int, since: float) -> dict[str, Any] | None:
    """The pool's VMs, how many imports took one, their idle minutes; then the pool emptied (so the
    sweep and the leftovers count only what the imports left)."""
    if not pool:
        return None
    vms = bench_pool.pooled(env, since)
    taken = sum(1 for i in vms if i["freeformTags"].get("import-pool-taken"))
    idle = bench_pool.idle_minutes(vms, time.time())
    bench_pool.set_pool_size(env, 0)
    bench_pool.tend(env)
    return {"size": pool, "vms": len(vms), "taken": taken, "idle_vm_minutes": round(idle, 1),
            "idle_vm_minutes_per_import": round(idle / max(taken, 1), 1)}


def account(env: dict[str, str], base: Path, corpus: list[Upload], makespan: float,
            faults: dict[str, str], worker_vms: int = WORKER_SLOTS) -> dict[str, Any]:
    swept = sweep(env)
    completed = [u for u in corpus if u.final.state.is_completed()]
    failed = [u for u in corpus if not u.final.state.is_completed()]
    codes = collections.Counter(refusal_code(u.final.state.message) for u in failed)
    lost = [u.name for u in failed if u.kind != "hostile"]
    volumes = [v for v in admin(env, "GET", "inventory")["volumes"]
               if v["freeformTags"].get(contract.TAG_STATE) == contract.STATE_IMPORTED]
    per_version = collections.Counter((v["freeformTags"].get(contract.TAG_OBJECT),
                                       v["freeformTags"].get(contract.TAG_ETAG)) for v in volumes)
    duplicate_volumes = sum(n - 1 for n in per_version.values() if n > 1)
    good_bytes = sum(u.path.stat().st_size for u in corpus if u.kind != "hostile")
    floor = good_bytes / (WORKER_PER_OCPU * WORKER_OCPUS * worker_vms)
    server_log = base / "prefect-server.log"
    errors = sum(1 for line in server_log.read_text(errors="replace").splitlines() if " ERROR " in line
                 or line.startswith("ERROR")) if server_log.exists() else 0
    left = leftovers(env)
    summaries_peak = []
    for upload in completed:
        result = demo.run_result(env, upload.final)
        if isinstance(result, dict) and result.get("peak_rss_mb"):
            summaries_peak.append(result["peak_rss_mb"])
    report = {
        "uploads": len(corpus), "runs": len({u.run_id for u in corpus}), "completed": len(completed),
        "failed": dict(codes), "failed_uploads": [u.name for u in failed], "lost_uploads": lost,
        "duplicate_volumes": duplicate_volumes, "left_after_sweep": left, "swept": {k: len(v) for k, v in swept.items()},
        "makespan_s": round(makespan, 1), "floor_s": round(floor, 1), "makespan_over_floor": round(makespan / floor, 2),
        "peak_memory_mb": {**peak_memory(base), "flow_run_max": max(summaries_peak, default=None)},
        "prefect_server_errors": errors, "faults": faults,
        "retried_runs": sum(1 for u in corpus if u.final.run_count > 1),
        "crashed_by_silence": crashed_by_silence(env, [u for u in corpus if u.final.run_count > 1]),
    }
    report["ok"] = not lost and duplicate_volumes == 0 and not any(left.values())
    return report


def crashed_by_silence(env: dict[str, str], uploads: list[Upload]) -> int:
    """How many of these runs the heartbeat automation found dead (their host died with them)."""
    from prefect.client.orchestration import get_client

    from deployments.automations import SILENCE_MESSAGE

    with local_stack.prefect_api(env["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        return sum(1 for u in uploads if any(s.is_crashed() and (s.message or "").startswith(SILENCE_MESSAGE)
                                             for s in client.read_flow_run_states(u.run_id)))


def print_report(report: dict[str, Any]) -> None:
    rows = [("uploads", report["uploads"]), ("runs", report["runs"]), ("completed", report["completed"]),
            ("failed", ", ".join(f"{k} x{v}" for k, v in report["failed"].items()) or "none"),
            ("lost uploads", len(report["lost_uploads"])),
            ("runs retried", f"{report['retried_runs']} ({report['crashed_by_silence']} crashed by their silence)"),
            ("duplicate volumes", report["duplicate_volumes"]),
            ("left after the sweep", ", ".join(f"{k} {v}" for k, v in report["left_after_sweep"].items())),
            ("makespan", f"{report['makespan_s']} s (floor {report['floor_s']} s, "
                         f"{report['makespan_over_floor']}x)"),
            ("peak memory MB", ", ".join(f"{k} {v}" for k, v in report["peak_memory_mb"].items())),
            ("Prefect server errors", report["prefect_server_errors"])]
    if report.get("pool"):
        p = report["pool"]
        rows.append(("worker pool", f"size {p['size']}: {p['vms']} pooled VMs, {p['taken']} taken by imports, "
                                    f"{p['idle_vm_minutes']} idle VM-minutes ({p['idle_vm_minutes_per_import']} per "
                                    "import that took one)"))
    rows += [(f"fault {name}", what) for name, what in report["faults"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(("PASS" if report["ok"] else "FAIL") + ": no lost upload, no duplicate volume, nothing left")
    print(json.dumps(report, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=60)
    parser.add_argument("--faults", default=",".join(ALL_FAULTS), help=f"some of {','.join(ALL_FAULTS)}")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    parser.add_argument("--latency", default="none", help="the local OCI's latency profile (localoci/latency.py): "
                                                          "none (its own speed) or oci (a tenancy's provisioning times)")
    parser.add_argument("--pool", type=int, default=0, help="a worker pool of this size (docs/worker-pool.md), "
                                                            "filled before the uploads start")
    parser.add_argument("--worker-vms", type=int, default=None,
                        help=f"worker VMs at once (default {WORKER_SLOTS}, or 12 with the oci profile, whose VMs "
                             "spend minutes booting)")
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(ALL_FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; known: {', '.join(ALL_FAULTS)}")
    try:
        worker_vms = args.worker_vms or (WORKER_SLOTS if args.latency == "none" else 12)
        report = run(args.uploads, faults, args.seed, args.timeout, latency=args.latency, worker_vms=worker_vms,
                     pool=args.pool)
    finally:
        if not args.keep:
            local_stack.down(purge=True)
            # The uploads' copies and the volumes are gigabytes; the logs stay for reading.
            for heavy in ("localoci/objects", "localoci/volumes", "corpus"):
                shutil.rmtree(local_stack.local_dir() / heavy, ignore_errors=True)
    print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
