"""``python -m deployments.local_stack up|down|status``: the local stack behind ``make up`` / ``make down``.

``up`` starts, in the background, the local OCI (state under ``.local/localoci``) and
prepares what an import needs on it (the import bucket with object events enabled, a
VCN and subnet for workers), then a Prefect server (SQLite under ``.local/prefect``),
saves the blocks for the local OCI, creates the work pool (both through the Prefect API, in
this process), deploys ``prefect.yaml``,
starts a Prefect worker, and serves the upload trigger's build directory
(``python -m function_trigger.build``, written to ``.local/function-build``) with the
FDK's runner as the target of the local Events rule for the import bucket, so an upload
starts an import. It writes ``.local/stack.env`` (``export KEY=value`` lines, and the
environment's ``bin`` first on ``PATH``, for ``source``) and one ``.pid`` file per process. Running
``up`` twice is harmless; ``down`` stops every process ``up`` started.

Set ``LOCAL_DIR`` to keep the stack somewhere other than ``.local/``.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import glob
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import oci

from function_trigger.build import build as build_function
from localoci import process

ROOT = Path(__file__).resolve().parent.parent
IMPORT_BUCKET = "disk-images"
WORKER_IMAGE_ID = "ocid1.image.oc1..localoci-worker"
# The local OCI's regions: the home region, and one that copy-to-region copies to.
REGIONS = ("local-1", "local-2")
WORK_POOL = "import-pool"
# How many flow runs the worker starts at once, unless LOCAL_STACK_POOL_CONCURRENCY says otherwise
# (the test suite, whose modules share a stack on two cores, asks for fewer).
POOL_CONCURRENCY = 6
# The local stack saves its blocks under the product's default name (``blocks.DEFAULT_BLOCK``;
# not imported here, as importing Prefect must wait for the stack's environment), so runs
# need not name them.
BLOCKS = dict.fromkeys(("credentials", "worker", "settings", "target"), "oci-disk-import")
PREFECT = str(Path(sys.executable).with_name("prefect"))


def local_dir() -> Path:
    return Path(os.environ.get("LOCAL_DIR") or ROOT / ".local").resolve()


def read_env(path: Path) -> dict[str, str]:
    """The settings :func:`write_env` wrote; also reads the older plain ``KEY=value`` lines.

    ``PATH`` is not a setting of the stack (it is there for shells that ``source`` the file),
    so it is left out."""
    if not path.exists():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if "=" not in line or line.startswith("#"):
            continue
        exported = line.startswith("export ")
        key, value = line.removeprefix("export ").split("=", 1)
        key = key.strip()
        if key != "PATH":
            values[key] = " ".join(shlex.split(value)) if exported else value.strip()
    return values


def write_env(path: Path, values: dict[str, str]) -> None:
    """``export KEY=value`` lines a fresh shell can ``source``, then the environment's ``bin``
    (where ``prefect`` and ``oci`` are) first on ``PATH``."""
    lines = [f"# source {path} to use the local stack from a shell\n"]
    lines += [f"export {key}={shlex.quote(value)}\n" for key, value in values.items()]
    lines.append(f'export PATH={shlex.quote(str(Path(PREFECT).parent))}:"$PATH"\n')
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.replace(path)


def pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if process.alive(pid) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_localoci(base: Path, previous: dict[str, str]) -> process.RunningLocalOCI:
    pid_file = base / "localoci.pid"
    data_dir = base / "localoci"
    port = int(previous["LOCALOCI_ENDPOINT"].rsplit(":", 1)[1]) if previous.get("LOCALOCI_ENDPOINT") else _free_port()
    if (pid := pid_alive(pid_file)) is not None:
        ready = json.loads((data_dir / "ready.json").read_text())
        return process.RunningLocalOCI(
            process=None, pid=pid, data_dir=data_dir, endpoint=ready["endpoint"], namespace=ready["namespace"],
            tenancy_id=ready["tenancyId"], oci_config_file=ready["ociConfigFile"], oci_profile=ready["ociProfile"],
            ssh_port=ready["sshPort"], region_endpoints=ready.get("regionEndpoints") or {},
        )
    server = process.start(data_dir, port=port, log_path=base / "localoci.log", regions=list(REGIONS))
    pid_file.write_text(str(server.pid))
    return server


# How long a worker VM, and a launched machine, may take to answer once RUNNING on the local OCI
# (an sshd process; a TCG boot): the blocks' boot timeouts, to which a latency profile adds the
# seconds it gives a booting instance (``instance:BOOTED``), so every pipeline waits as long as the
# profile needs (under ``oci``, a worker answers 60 s after RUNNING).
WORKER_BOOT_SECONDS, MACHINE_BOOT_SECONDS = 60.0, 180.0


def boot_timeouts(profile: dict[str, float]) -> tuple[float, float]:
    """The worker and target-machine blocks' boot timeouts under a latency profile's transitions."""
    booted = float(profile.get("instance:BOOTED", 0.0))
    return WORKER_BOOT_SECONDS + booted, MACHINE_BOOT_SECONDS + booted


def apply_latency(env: dict[str, str], profile: str) -> dict[str, float]:
    """Slow the stack's local OCI to ``profile`` and give its worker and target-machine blocks the boot
    timeouts it needs; the profile's transitions."""
    transitions = set_latency_profile(env["LOCALOCI_ENDPOINT"], profile)
    set_boot_timeouts(env, transitions)
    return transitions


def set_boot_timeouts(env: dict[str, str], transitions: dict[str, float]) -> None:
    """The worker and target-machine blocks' boot timeouts, as the latency ``transitions`` need."""
    worker_s, machine_s = boot_timeouts(transitions)
    with prefect_api(env["PREFECT_API_URL"]):
        from blocks import TargetMachine, WorkerShape

        worker = WorkerShape.load(BLOCKS["worker"])
        worker.boot_timeout_seconds = worker_s
        worker.save(BLOCKS["worker"], overwrite=True)
        target = TargetMachine.load(BLOCKS["target"])
        target.boot_timeout_seconds = machine_s
        target.save(BLOCKS["target"], overwrite=True)


def set_latency_profile(endpoint: str, profile: str) -> dict[str, float]:
    """Slow the local OCI's transitions to a profile's (``localoci/latency.py``: ``oci`` or ``none``)."""
    request = urllib.request.Request(f"{endpoint}/_localoci/latency/profile", method="POST",
                                     data=json.dumps({"profile": profile}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        raise ValueError(f"latency profile {profile!r}: {exc.read().decode(errors='replace')}") from None


def prepare_cloud(server: process.RunningLocalOCI, previous: dict[str, str]) -> dict[str, str]:
    """Make sure the import bucket and the workers' subnet exist; return their names and ids."""
    config = oci.config.from_file(server.oci_config_file, server.oci_profile)
    compartment = server.tenancy_id
    object_storage = oci.object_storage.ObjectStorageClient(config, service_endpoint=server.endpoint)
    network = oci.core.VirtualNetworkClient(config, service_endpoint=server.endpoint)
    try:
        object_storage.get_bucket(server.namespace, IMPORT_BUCKET)
    except oci.exceptions.ServiceError as exc:
        if exc.status != 404:
            raise
        object_storage.create_bucket(server.namespace, oci.object_storage.models.CreateBucketDetails(
            name=IMPORT_BUCKET, compartment_id=compartment, object_events_enabled=True))
    subnet_id = previous.get("SUBNET_ID")
    try:
        if subnet_id:
            network.get_subnet(subnet_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status != 404:
            raise
        subnet_id = None
    if not subnet_id:
        models = oci.core.models
        vcn = network.create_vcn(models.CreateVcnDetails(compartment_id=compartment, cidr_block="10.0.0.0/16",
                                                         display_name="import-workers")).data
        subnet_id = network.create_subnet(models.CreateSubnetDetails(
            compartment_id=compartment, vcn_id=vcn.id, cidr_block="10.0.0.0/24", display_name="import-workers")).data.id
    return {"IMPORT_BUCKET": IMPORT_BUCKET, "SUBNET_ID": subnet_id}


# A SQLite-backed server answers 503 while another write holds the database, and creating a
# flow run (read the deployment, then insert) fails at once whenever another write lands between
# the two. With many runs going (and several stacks on one machine in the tests) the default
# five retries, about a minute, were seen to run out: in a worker submitting a run, and in a
# run started by hand. Every client of the stack gets more, backing off as Prefect does.
CLIENT_RETRIES = "12"
# The server can also sit on a write for its SQLite busy timeout (60 s) and then commit it.
# A client that gives up first sends the request again and the write happens twice (two
# refusal artifacts for one run were seen): clients wait longer than the server does.
CLIENT_TIMEOUT = "150"
# Flow runs send a heartbeat this often (Prefect's smallest); a run silent for SILENT_HEARTBEATS
# of them is taken for dead by the automations of deployments/automations.py.
HEARTBEAT_SECONDS = "30"
SILENT_HEARTBEATS = 2


def prefect_env(base: Path, api_url: str) -> dict[str, str]:
    """Environment of every Prefect process of the stack (server, CLI, worker, flow runs)."""
    home = base / "prefect"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url(base),
        # How often the worker asks for runs: 0.25 s adds little to a run's start, and costs the
        # server about a tenth of a core; the test suite, with a stack per module, asks each second.
        "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("LOCAL_STACK_POLL_SECONDS", "0.25"),
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_CLIENT_MAX_RETRIES": CLIENT_RETRIES,
        # The worker VM slots are leases on a global concurrency limit. Prefect keeps leases in the
        # server's memory by default: a restarted server forgets them while the limit still counts
        # their slots, and every later run waits forever. On disk they outlive a restart and expire.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
        "PREFECT_API_REQUEST_TIMEOUT": CLIENT_TIMEOUT,
    }
    if on_postgres(base):
        env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = HEARTBEAT_SECONDS
    return env


def on_postgres(base: Path) -> bool:
    """Whether the stack's Prefect server runs on PostgreSQL. Only then do flow runs send
    heartbeats and the host-death automations run: on SQLite their writes (an automation
    bucket per heartbeat) made the server lock up under the test suite's bursts."""
    return database_url(base).startswith("postgresql")


def _wait_http(url: str, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s; see {log}")


def spawn(argv: list[str], env: dict[str, str], log: Path, pid_file: Path, cwd: Path = ROOT) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=cwd,
                                start_new_session=True)
    pid_file.write_text(str(proc.pid))
    return proc.pid


def database_url(base: Path) -> str:
    """The Prefect server's database: the PostgreSQL cluster that :func:`start_postgres` started
    for this stack, or else SQLite under ``base``."""
    chosen = base / "database.url"
    if chosen.exists():
        return chosen.read_text().strip()
    return f"sqlite+aiosqlite:///{base / 'prefect' / 'prefect.db'}"


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as Debian's ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _traversable_by_others(path: Path) -> bool:
    """Whether every directory from / to ``path`` lets other users through (o+x)."""
    return all(os.stat(p).st_mode & 0o001 for p in [path.resolve(), *path.resolve().parents])


def start_postgres(base: Path) -> str:
    """A private PostgreSQL cluster (Debian's postgresql) on a loopback port for the Prefect
    server, started now and stopped by :func:`down`; the server's database URL, which every
    Prefect process of the stack then uses."""
    bindir = postgres_bindir()
    if bindir is None:
        raise RuntimeError("Debian's postgresql is not installed (apt-get install postgresql), or runuser is "
                           "missing; LOCAL_STACK_DATABASE=sqlite runs the stack without it")
    pointer = base / "postgres.dir"
    if pointer.exists() and (Path(pointer.read_text().strip()) / "PG_VERSION").exists():
        data = Path(pointer.read_text().strip())
    else:  # a new stack, or one whose cluster went with /tmp (a reboot): a new cluster
        # In the stack's directory, so it goes with it; the postgres user must reach the cluster's
        # directory, which a root-only path (pytest's, for one) would not allow: then under /tmp.
        if os.geteuid() != 0 or _traversable_by_others(base):
            data = base / "postgres"
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir()
        else:
            data = Path(tempfile.mkdtemp(prefix="oci-import-postgres-"))
        os.chmod(data, 0o700)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                     "-E", "UTF8"]), check=True, capture_output=True)
        pointer.write_text(str(data))
    port_file = base / "postgres.port"
    port = int(port_file.read_text()) if port_file.exists() else _free_port()
    port_file.write_text(str(port))
    pid_file = base / "postgres.pid"
    if pid_alive(pid_file) is None:
        log = data / "server.log"
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60",
                                     "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1 "
                                           "-c max_connections=300 -c shared_buffers=256MB -c fsync=off", "start"]),
                       check=True, capture_output=True)
        pid_file.write_text((data / "postmaster.pid").read_text().split()[0])
        created = subprocess.run(_as_postgres([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                                               "-U", "postgres", "prefect"]), capture_output=True, text=True)
        if created.returncode != 0 and "already exists" not in created.stderr:
            raise RuntimeError(f"createdb failed: {created.stderr}")
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    (base / "database.url").write_text(url)
    return url


def start_prefect_server(base: Path, previous: dict[str, str]) -> str:
    pid_file = base / "prefect-server.pid"
    api_url = previous.get("PREFECT_API_URL") or f"http://127.0.0.1:{_free_port()}/api"
    (base / "prefect").mkdir(parents=True, exist_ok=True)
    if pid_alive(pid_file) is None:
        port = api_url.rsplit(":", 1)[1].split("/")[0]
        spawn([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", port],
               prefect_env(base, api_url), base / "prefect-server.log", pid_file)
    _wait_http(api_url + "/health", 180, "the Prefect server", base / "prefect-server.log")
    return api_url


_API_SETTINGS: dict[tuple[int, str], tuple[Any, Any]] = {}  # (id of the settings they update, URL): both


@contextlib.contextmanager
def prefect_api(api_url: str) -> Iterator[None]:
    """Point this process's Prefect client at ``api_url`` (settings are read once, at import),
    with the stack's client retries and timeout: Prefect's ``temporary_settings``, with the
    settings it makes kept for the next call. Making them validates every setting again (tens of
    milliseconds of CPU), and the tests enter this around every call to a stack's API."""
    import prefect.context
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES

    context = prefect.context.get_settings_context()
    key = (id(context.settings), api_url)
    cached = _API_SETTINGS.get(key)
    if cached is None or cached[0] is not context.settings:
        if len(_API_SETTINGS) > 64:
            _API_SETTINGS.clear()
        updated = context.settings.copy_with_update(updates={
            PREFECT_API_URL: api_url, PREFECT_CLIENT_MAX_RETRIES: int(CLIENT_RETRIES),
            PREFECT_API_REQUEST_TIMEOUT: float(CLIENT_TIMEOUT)})
        cached = _API_SETTINGS[key] = (context.settings, updated)  # the first kept: its id is not reused
    with prefect.context.SettingsContext(profile=context.profile, settings=cached[1]):
        yield


def save_blocks(server: process.RunningLocalOCI, values: dict[str, str],
                transitions: dict[str, float] | None = None) -> None:
    """Blocks that point the importer at the local OCI (its boot timeouts as its latency ``transitions`` need)."""
    with prefect_api(values["PREFECT_API_URL"]):
        _save_blocks(server, values, *boot_timeouts(transitions or {}))


def _save_blocks(server: process.RunningLocalOCI, values: dict[str, str], worker_boot_s: float,
                 machine_boot_s: float) -> None:
    from blocks import ImportSettings, OCICredentials, TargetMachine, WorkerShape

    OCICredentials(auth_type="config_file", config_file=server.oci_config_file, profile=server.oci_profile,
                   endpoint=server.endpoint, region_endpoints={r: e for r, e in server.region_endpoints.items()
                                                               if e != server.endpoint}
                   ).save(BLOCKS["credentials"], overwrite=True)
    WorkerShape(compartment_id=values["COMPARTMENT_ID"], subnet_id=values["SUBNET_ID"], image_id=WORKER_IMAGE_ID,
                shape="VM.Standard.E4.Flex", ocpus=2, memory_in_gbs=16, ssh_user=values["LOCALOCI_SSH_USER"],
                ssh_port=int(values["LOCALOCI_SSH_PORT"]), use_sudo=os.geteuid() != 0,
                boot_timeout_seconds=worker_boot_s).save(BLOCKS["worker"], overwrite=True)
    ImportSettings(compartment_id=values["COMPARTMENT_ID"]).save(BLOCKS["settings"], overwrite=True)
    # Imported machines start in the same local network; TCG boots take seconds, not minutes.
    # Their SSH is at the local OCI's SSH port of their private IP (a loopback address).
    TargetMachine(compartment_id=values["COMPARTMENT_ID"], subnet_id=values["SUBNET_ID"], image_id=WORKER_IMAGE_ID,
                  boot_timeout_seconds=machine_boot_s, console_poll_seconds=2, ssh_port=int(values["LOCALOCI_SSH_PORT"]),
                  reach_timeout_seconds=60).save(BLOCKS["target"], overwrite=True)


def _prefect(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([PREFECT, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def deploy(base: Path, api_url: str) -> None:
    """Register the block types and the work pool in this process (a ``prefect`` command costs a
    few seconds of a core to start, and every stack of the test suite ran three), then deploy
    ``prefect.yaml`` as ``prefect deploy --all`` does."""
    register_block_types_and_pool(api_url)
    _prefect(["--no-prompt", "deploy", "--all"], prefect_env(base, api_url))


def register_block_types_and_pool(api_url: str) -> None:
    """What ``prefect block register -m blocks`` and ``prefect work-pool create`` /
    ``set-concurrency-limit`` do, through the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    from blocks import ImportSettings, OCICredentials, TargetMachine, WorkerShape

    with prefect_api(api_url):
        for block in (OCICredentials, ImportSettings, TargetMachine, WorkerShape):
            block.register_type_and_schema()
        # The concurrency limit bounds the flow-run processes one small machine starts at once:
        # a burst of uploads waits in the pool instead of overloading the server.
        limit = int(os.environ.get("LOCAL_STACK_POOL_CONCURRENCY") or POOL_CONCURRENCY)
        with get_client(sync_client=True) as client:
            try:
                client.create_work_pool(WorkPoolCreate(
                    name=WORK_POOL, type="process", concurrency_limit=limit,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
            except ObjectAlreadyExists:
                client.update_work_pool(WORK_POOL, WorkPoolUpdate(concurrency_limit=limit))


def start_warm_runner(base: Path, api_url: str) -> str:
    """Start :mod:`deployments.warm_runner`; return its socket (flow runs start through it)."""
    pid_file = base / "warm-runner.pid"
    sock = base / "warm-runner.sock"
    if pid_alive(pid_file) is None:
        sock.unlink(missing_ok=True)
        spawn([sys.executable, "-m", "deployments.warm_runner", str(sock)], prefect_env(base, api_url),
               base / "warm-runner.log", pid_file)
    deadline = time.monotonic() + 120
    while not sock.exists():
        if time.monotonic() > deadline or pid_alive(pid_file) is None:
            raise RuntimeError(f"the warm runner did not start; see {base / 'warm-runner.log'}")
        time.sleep(0.1)
    return str(sock)


def set_up_automations(api_url: str) -> None:
    """The automations that crash and retry import runs whose host died (deployments/automations.py)."""
    from blocks import ImportSettings
    from deployments import automations

    with prefect_api(api_url):
        automations.ensure(int(HEARTBEAT_SECONDS), ImportSettings.model_fields["crash_retries"].default,
                           SILENT_HEARTBEATS)


def start_reconciler(base: Path, api_url: str) -> None:
    """Start :mod:`deployments.reconciler`, the backstop for automation events a restarting server loses."""
    from blocks import ImportSettings

    pid_file = base / "reconciler.pid"
    if pid_alive(pid_file) is None:
        spawn([sys.executable, "-m", "deployments.reconciler", "--heartbeat", HEARTBEAT_SECONDS,
                "--silence", str(SILENT_HEARTBEATS),
                "--retries", str(ImportSettings.model_fields["crash_retries"].default)],
               prefect_env(base, api_url), base / "reconciler.log", pid_file)


def use_warm_client(base: Path, api_url: str) -> None:
    """Make the work pool start flow runs with :mod:`deployments.warm_client`, in a working
    directory of the stack's own: without one, the process worker makes a temporary directory in
    /tmp for each run, which stays there whenever the worker is stopped while a run is going."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate

    runs = base / "runs"
    runs.mkdir(exist_ok=True)
    defaults = {"command": f"{sys.executable} -m deployments.warm_client", "working_dir": str(runs)}
    with prefect_api(api_url), get_client(sync_client=True) as client:
        template = client.read_work_pool(WORK_POOL).base_job_template
        variables = template["variables"]["properties"]
        if any(variables[name].get("default") != value for name, value in defaults.items()):
            for name, value in defaults.items():
                variables[name]["default"] = value
            client.update_work_pool(WORK_POOL, WorkPoolUpdate(base_job_template=template))


def start_worker(base: Path, api_url: str) -> None:
    pid_file = base / "prefect-worker.pid"
    if pid_alive(pid_file) is None:
        # No --limit: prefect 3.8.8's worker limiter crashes the worker when a killed run is retried
        # ("this borrower is already holding one of this CapacityLimiter's tokens"); the global
        # concurrency limit bounds the runs that hold a worker VM.
        env = {**prefect_env(base, api_url), "IMPORT_WARM_RUNNER_SOCKET": str(base / "warm-runner.sock")}
        spawn([PREFECT, "worker", "start", "--pool", WORK_POOL, "--type", "process"], env,
               base / "prefect-worker.log", pid_file)


def start_function(base: Path, values: dict[str, str], previous: dict[str, str]) -> str:
    """Build the upload trigger (as ``make function`` does) and serve its build directory with
    the FDK's runner; return the endpoint events are delivered to."""
    pid_file = base / "function.pid"
    endpoint = previous.get("FUNCTION_ENDPOINT") or f"http://127.0.0.1:{_free_port()}/"
    if pid_alive(pid_file) is None:
        function_dir = build_function(base / "function-build")
        port = endpoint.rstrip("/").rsplit(":", 1)[1]
        env = {
            **os.environ, "PREFECT_API_URL": values["PREFECT_API_URL"], "WATCH_BUCKETS": values["IMPORT_BUCKET"],
            "OCI_AUTH": "config_file", "OCI_CONFIG_FILE": values["OCI_CONFIG_FILE"],
            "OCI_PROFILE": values["OCI_PROFILE"], "OCI_ENDPOINT": values["LOCALOCI_ENDPOINT"],
            "FLOW_PARAMETERS": json.dumps({"credentials_block": BLOCKS["credentials"],
                                           "worker_block": BLOCKS["worker"], "settings_block": BLOCKS["settings"]}),
        }
        with open(base / "function.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "function_trigger.local_runner", "--port", port,
                                     "--socket-dir", str(base / "function"), "--function-dir", str(function_dir)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=ROOT,
                                    start_new_session=True)
        pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", int(endpoint.rstrip("/").rsplit(":", 1)[1])), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the function runner did not listen; see {base / 'function.log'}") from None
            time.sleep(0.2)
    return endpoint


def register_event_rule(server: process.RunningLocalOCI, bucket: str, endpoint: str) -> None:
    """The local Events rule: object creates and updates in the import bucket go to the function."""
    name = "import-trigger"
    for rule in server.admin("GET", "events/rules"):
        if rule["displayName"] == name:
            if rule["endpoint"] == endpoint:
                return
            server.admin("DELETE", f"events/rules/{rule['id']}")
    server.admin("POST", "events/rules", {
        "displayName": name, "endpoint": endpoint, "eventVersion": "1.0",
        "condition": {"eventType": ["com.oraclecloud.objectstorage.createobject",
                                    "com.oraclecloud.objectstorage.updateobject"],
                      "data": {"additionalDetails": {"bucketName": [bucket]}}}})


def postgres_bindir() -> Path | None:
    """The newest Debian postgresql's bin directory, if it is installed and we can run it (as
    root, through runuser as the ``postgres`` user)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or (os.geteuid() == 0 and not shutil.which("runuser")):
        return None
    return Path(found[-1]).parent


def chosen_database() -> str:
    """The Prefect server's database for a new stack: ``LOCAL_STACK_DATABASE`` (``postgres`` or
    ``sqlite``), else PostgreSQL where Debian's postgresql is installed (``make`` installs it).
    SQLite stalls for its whole 60 s busy timeout now and then under concurrent runs (the
    server's own background writers lock each other out); PostgreSQL does not."""
    chosen = os.environ.get("LOCAL_STACK_DATABASE", "").strip().lower()
    if chosen and chosen not in ("postgres", "sqlite"):
        raise ValueError(f"LOCAL_STACK_DATABASE must be postgres or sqlite, not {chosen!r}")
    return chosen or ("postgres" if postgres_bindir() is not None else "sqlite")


def up(database: str | None = None) -> dict[str, str]:
    """Start (or find running) every process of the stack; ``database``: the Prefect server's,
    ``postgres`` (a private cluster) or ``sqlite``; by default :func:`chosen_database`."""
    database = database or chosen_database()
    base = local_dir()
    base.mkdir(parents=True, exist_ok=True)
    env_path = base / "stack.env"
    previous = read_env(env_path)
    server = start_localoci(base, previous)
    transitions = {}
    if profile := os.environ.get("LOCALOCI_LATENCY_PROFILE"):
        transitions = set_latency_profile(server.endpoint, profile)
    values = {
        "LOCALOCI_ENDPOINT": server.endpoint,
        "OCI_CONFIG_FILE": server.oci_config_file,
        "OCI_PROFILE": server.oci_profile,
        "OCI_NAMESPACE": server.namespace,
        "COMPARTMENT_ID": server.tenancy_id,
        "IMAGE_ID": WORKER_IMAGE_ID,
        "LOCALOCI_SSH_USER": getpass.getuser(),
        "LOCALOCI_SSH_PORT": str(server.ssh_port),
    }
    values.update(prepare_cloud(server, previous))
    if database == "postgres":
        values["PREFECT_DATABASE"] = start_postgres(base)
    elif pid_alive(base / "prefect-server.pid") is None:
        (base / "database.url").unlink(missing_ok=True)
    api_url = start_prefect_server(base, previous)
    values["PREFECT_API_URL"] = api_url
    values["PREFECT_UI_URL"] = api_url.removesuffix("/api")
    save_blocks(server, values, transitions)
    deploy(base, api_url)
    if on_postgres(base):
        set_up_automations(api_url)
        start_reconciler(base, api_url)
    use_warm_client(base, api_url)
    start_warm_runner(base, api_url)
    start_worker(base, api_url)
    values.update({"PREFECT_HOME": str(base / "prefect"), "WORK_POOL": WORK_POOL})
    values["FUNCTION_ENDPOINT"] = start_function(base, values, previous)
    register_event_rule(server, values["IMPORT_BUCKET"], values["FUNCTION_ENDPOINT"])
    write_env(env_path, values)
    return values


WORKER_STOP_SECONDS = 5.0  # how long make down waits for the worker after SIGTERM, then SIGKILL
# Stopped with the processes they forked: the warm runner's flow runs, and the worker's flow-run
# clients (with a cold-started engine, when the runner was gone as the run began: stopped only
# with the worker, that client outlived its stack and the run went on retrying a server gone).
GROUP_LEADERS = ("warm-runner", "prefect-worker")


def down(purge: bool = False) -> list[str]:
    """Stop every process of the stack; return what was stopped. ``purge`` also removes the
    PostgreSQL cluster, which lives outside the stack's directory and would outlive it."""
    base = local_dir()
    stopped = []
    # In three groups, each stopped at once (a group takes as long as its slowest): the Prefect
    # server's clients (a worker whose server had gone spent 7.5 s retrying its goodbye), the
    # server, then PostgreSQL with a fast shutdown (SIGINT, pg_ctl's default), which ends the
    # sessions left: a smart one (SIGTERM) waited out its 20 s for those of a stopped server.
    # The worker stops in well under a second, but at the end of a test session it has outlived
    # SIGTERM until the SIGKILL 20 s later, every time: 5 s is grace enough. (It waits for its
    # runs in flight.) Those runs are children of the warm runner, in its process group: the whole
    # group is stopped, or a run in flight outlives its stack, and so does the worker's client of it.
    order = {"prefect-server": 1, "postgres": 2}
    for rank, group in itertools.groupby(sorted(base.glob("*.pid"), key=lambda p: (order.get(p.stem, 0), p.stem)),
                                         key=lambda p: order.get(p.stem, 0)):
        running = [(pid_file, pid_alive(pid_file)) for pid_file in group]
        process.stop_pids([pid for _, pid in running if pid is not None],
                          how=signal.SIGINT if rank == order["postgres"] else signal.SIGTERM,
                          timeouts={pid: WORKER_STOP_SECONDS for pid_file, pid in running
                                    if pid_file.stem == "prefect-worker" and pid is not None},
                          groups={pid for pid_file, pid in running if pid_file.stem in GROUP_LEADERS and pid is not None})
        for pid_file, pid in running:
            if pid is not None:
                stopped.append(f"{pid_file.stem} (pid {pid})")
            pid_file.unlink(missing_ok=True)
    pointer = base / "postgres.dir"
    if purge and pointer.exists():
        shutil.rmtree(pointer.read_text().strip(), ignore_errors=True)
        for name in ("postgres.dir", "postgres.port", "database.url"):
            (base / name).unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.local_stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--purge", action="store_true",
                        help="down: also remove the stack's PostgreSQL cluster (its runs and blocks)")
    args = parser.parse_args(argv)
    if args.command == "up":
        values = up()
        print(f"local stack is up; settings in {local_dir() / 'stack.env'}:")
        for key, value in values.items():
            print(f"  {key}={value}")
    elif args.command == "down":
        stopped = down(purge=args.purge)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        running = {p.stem: pid_alive(p) for p in local_dir().glob("*.pid")}
        for name, pid in running.items():
            print(f"{name}: {'running (pid %d)' % pid if pid else 'not running'}")
        return 0 if running and all(running.values()) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
