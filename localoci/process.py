"""Start and stop a local OCI server process (for tests and the local stack)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib.request


@dataclass
class RunningLocalOCI:
    process: subprocess.Popen[bytes] | None
    pid: int
    data_dir: Path
    endpoint: str
    namespace: str
    tenancy_id: str
    oci_config_file: str
    oci_profile: str
    ssh_port: int
    # Each region's endpoint, the home region's (``endpoint``) first; a block storage client of region R is
    # ``oci.core.BlockstorageClient(config, service_endpoint=server.region_endpoints[R])``.
    region_endpoints: dict[str, str] = field(default_factory=dict)

    @property
    def home_region(self) -> str:
        return next(iter(self.region_endpoints), "local-1")

    def endpoint_of(self, region: str) -> str:
        """The endpoint of ``region``; KeyError naming the regions served if it is not one of them."""
        try:
            return self.region_endpoints[region] if self.region_endpoints else {"local-1": self.endpoint}[region]
        except KeyError:
            raise KeyError(f"region {region!r} is not served; served: {', '.join(self.region_endpoints) or 'local-1'}") from None

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call the admin API (``/_localoci/...``) and decode its JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.endpoint}/_localoci/{path.lstrip('/')}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            raw = reply.read()
        return json.loads(raw) if raw else None

    def inventory(self, **tags: str) -> dict[str, Any]:
        query = "&".join(f"tag.{k}={v}" for k, v in tags.items())
        return self.admin("GET", f"inventory?{query}")

    def stop(self, timeout: float = 20.0) -> None:
        stop_pid(self.pid, timeout)
        if self.process is not None:
            self.process.wait(timeout=timeout)


def start(
    data_dir: Path,
    port: int = 0,
    log_path: Path | None = None,
    extra_args: list[str] | None = None,
    timeout: float = 30.0,
    regions: list[str] | None = None,
) -> RunningLocalOCI:
    """Start ``python -m localoci serve`` and wait until it listens (in ``regions``, the home region first,
    if told; else those the data directory served last, else local-1 alone)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ready_file = data_dir / "ready.json"
    ready_file.unlink(missing_ok=True)
    log = open(log_path or data_dir / "localoci.log", "ab")
    project_root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(project_root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(
        [sys.executable, "-m", "localoci", "serve", "--data-dir", str(data_dir), "--port", str(port),
         "--ready-file", str(ready_file), *(["--regions", ",".join(regions)] if regions else []), *(extra_args or [])],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while not ready_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"localoci exited with {process.returncode}; see {log.name}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"localoci did not start within {timeout}s; see {log.name}")
        time.sleep(0.05)
    ready = json.loads(ready_file.read_text())
    return RunningLocalOCI(
        process=process, pid=process.pid, data_dir=data_dir, endpoint=ready["endpoint"], namespace=ready["namespace"],
        tenancy_id=ready["tenancyId"], oci_config_file=ready["ociConfigFile"], oci_profile=ready["ociProfile"],
        ssh_port=ready["sshPort"], region_endpoints=ready.get("regionEndpoints") or {},
    )


def stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM a server (it stops its instances' sshd first), SIGKILL it if it lingers."""
    stop_pids([pid], timeout)


def stop_pids(pids: list[int], timeout: float = 20.0, how: signal.Signals = signal.SIGTERM,
              timeouts: dict[int, float] | None = None, groups: set[int] | frozenset[int] = frozenset()) -> None:
    """Signal them all at once (``how``), SIGKILL each that still lingers after its timeout
    (``timeouts``, else ``timeout``): stopping several takes as long as the slowest, not the sum.
    A pid in ``groups`` leads a process group (it was started in a session of its own), and the
    whole group is signalled and waited for: the processes it forked go with it."""
    start = time.monotonic()
    deadlines = {}

    def signal_(pid: int, signum: signal.Signals) -> None:
        try:
            if pid in groups:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def lingers(pid: int) -> bool:
        return group_alive(pid) if pid in groups else alive(pid)

    for pid in pids:
        if lingers(pid):
            signal_(pid, how)
            deadlines[pid] = start + (timeouts or {}).get(pid, timeout)
    killed: set[int] = set()
    while deadlines:
        now = time.monotonic()
        for pid, deadline in list(deadlines.items()):
            if not lingers(pid):
                del deadlines[pid]
            elif pid in killed:
                if now >= deadline:  # not gone even after SIGKILL (stuck in the kernel): leave it
                    del deadlines[pid]
            elif now >= deadline:
                signal_(pid, signal.SIGKILL)
                killed.add(pid)
                deadlines[pid] = now + 5.0
        if deadlines:
            time.sleep(0.05)


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` is still running (zombies do not count)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
