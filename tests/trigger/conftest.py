"""A real Prefect server (SQLite or PostgreSQL, with API auth) holding the import deployment,
the function's configuration pointing at it and at the local OCI, and Object Storage events."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import SESSION_DIR
from tests.waiting import wait_for


def _import_fdk_keeping_the_root_logger() -> None:
    """Importing fdk (the function's ``function_trigger.func`` does) sets the root logger to DEBUG
    with a handler on the stderr of that moment: in a test process, pytest's capture, closed at
    exit, where httpcore's last connection-close messages then end in ``Logging error``
    tracebacks. Import it first, and put the root logger back."""
    import logging
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import fdk  # noqa: F401
    root.setLevel(level)
    root.handlers[:] = handlers


_import_fdk_keeping_the_root_logger()

AUTH = "importer:s3cret-for-tests"
ROOT = Path(__file__).resolve().parents[2]
FUNCTION_TIMEOUT = int(re.search(r"^timeout: (\d+)$", (ROOT / "function_trigger" / "func.yaml").read_text(), re.M)[1])
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found (Debian package postgresql)")
    return str(found[-1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback, started for these tests."""
    root = Path(tempfile.mkdtemp(prefix="prefect-pg-", dir=os.environ.get(SESSION_DIR)))
    os.chmod(root, 0o755)
    data, port = root / "data", _free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    subprocess.run([*as_postgres, _pg_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*as_postgres, _pg_bin("pg_ctl"), "-D", str(data), "-w", "-l", str(data / "server.log"), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    try:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                        "CREATE DATABASE prefect"], check=True, capture_output=True)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run([*as_postgres, _pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def start_prefect(home: Path, database_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_API_AUTH_STRING": AUTH,
           "PREFECT_API_AUTH_STRING": AUTH, "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "ab")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", auth=tuple(AUTH.split(":", 1)), timeout=2).status_code == 200
        except httpx.HTTPError:
            assert proc.poll() is None, f"Prefect server exited; see {home / 'server.log'}"
            return False
    try:
        wait_for(healthy, 180, f"the Prefect server healthy (see {home / 'server.log'})", interval=0.3)
    except AssertionError:
        proc.kill()
        raise
    return proc, url


def api_post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    """POST to the Prefect API as Prefect's own client does: a 503 (SQLite busy while the new
    server's background services start writing) means "try again shortly"."""
    reply = wait_for(lambda: (r := client.post(path, json=body)).status_code != 503 and r,
                     what=f"POST {path} answered other than 503", interval=0.25)
    assert reply.is_success, f"POST {path}: HTTP {reply.status_code} {reply.text}"
    return reply.json()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def prefect_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Prefect server with the deployment ``import-virtual-disk/default`` (no worker: runs stay scheduled)."""
    home = tmp_path_factory.mktemp(f"prefect-{request.param}")
    database = (f"sqlite+aiosqlite:///{home / 'prefect.db'}" if request.param == "sqlite"
                else request.getfixturevalue("postgres_url"))
    proc, url = start_prefect(home, database)
    client = httpx.Client(base_url=url, auth=tuple(AUTH.split(":", 1)), timeout=30)
    flow_id = api_post(client, "/flows/", {"name": "import-virtual-disk"})["id"]
    deployment = api_post(client, "/deployments/", {
        "name": "default", "flow_id": flow_id, "entrypoint": "flows/import_disk.py:import_virtual_disk"})
    machine_flow_id = api_post(client, "/flows/", {"name": "import-machine"})["id"]
    machine = api_post(client, "/deployments/", {
        "name": "default", "flow_id": machine_flow_id, "entrypoint": "flows/import_machine.py:import_machine"})
    try:
        yield {"url": url, "client": client, "deployment_id": deployment["id"], "database": request.param,
               "machine_deployment_id": machine["id"]}
    finally:
        client.close()
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


CREATE = "com.oraclecloud.objectstorage.createobject"


def event(namespace: str, bucket: str, name: str | None, etag: str | None, kind: str = CREATE,
          version: str = "1.0", bucket_id: str = "ocid1.bucket.oc1..x") -> bytes:
    data: dict[str, Any] = {"compartmentId": "ocid1.tenancy.oc1..x", "resourceName": name,
                            "additionalDetails": {"namespace": namespace, "bucketName": bucket,
                                                  "bucketId": bucket_id, "eTag": etag}}
    if name is None:
        del data["resourceName"]
    if version == "1.0":
        body = {"eventType": kind, "cloudEventsVersion": "0.1", "eventTypeVersion": "2.0", "eventID": str(uuid.uuid4()),
                "source": "ObjectStorage", "eventTime": "2026-11-22T00:00:00Z", "data": data}
    else:
        body = {"specversion": "1.0", "type": kind, "id": str(uuid.uuid4()), "source": "ObjectStorage", "data": data}
    return json.dumps(body).encode()


@pytest.fixture
def config(prefect_api, localoci, bucket) -> dict[str, str]:
    return {
        "PREFECT_API_URL": prefect_api["url"], "PREFECT_API_AUTH_STRING": AUTH,
        "WATCH_BUCKETS": bucket, "OCI_AUTH": "config_file", "OCI_CONFIG_FILE": localoci.oci_config_file,
        "OCI_PROFILE": localoci.oci_profile, "OCI_ENDPOINT": localoci.endpoint,
        "FLOW_PARAMETERS": json.dumps({"credentials_block": "local-oci"}),
        # as deployed: the budget is the function's timeout (func.yaml), less the margin func.py keeps
        "TIMEOUT_SECONDS": str(FUNCTION_TIMEOUT - 2),
    }


def runs_for(prefect_api, object_names: set[str], deployment: str = "deployment_id") -> list[dict[str, Any]]:
    runs = api_post(prefect_api["client"], "/flow_runs/filter", {
        "flow_runs": {"deployment_id": {"any_": [prefect_api[deployment]]}}, "limit": 200})
    return [r for r in runs if r["parameters"].get("object_name") in object_names]


def put(object_storage, localoci, bucket: str, name: str, metadata: dict[str, str] | None = None) -> str:
    return object_storage.put_object(localoci.namespace, bucket, name, b"QFI\xfb" + b"\0" * 508,
                                     opc_meta=metadata or {}).headers["etag"]
