"""``make demo``: the main job end to end on the local stack.

Builds a sample disk (GPT; ext4, xfs and vfat partitions holding real files) as qcow2,
uploads it through the SDK (the upload event makes the function start
``import-virtual-disk/default``), waits for that run, prints the summary and checks the result independently: the volume must read back as the
image's guest-visible content and no worker may be left. Exit 0 only on a verified
import.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import oci
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun

from deployments import local_stack
from diskimport.sample_disk import build_disk, convert

DEPLOYMENT = "import-virtual-disk/default"


_CLIENTS: dict[tuple[Any, ...], oci.object_storage.ObjectStorageClient] = {}
_HTTP: list[httpx.Client] = []


def stack_clients(env: dict[str, str]) -> tuple[oci.object_storage.ObjectStorageClient, dict[str, Any]]:
    """The stack's Object Storage client and SDK config. The client is made once per config, key
    and thread: making one reads and checks the private key, tens of milliseconds of CPU that the
    tests, calling this at every upload, spent by the minute."""
    config = oci.config.from_file(env["OCI_CONFIG_FILE"], env["OCI_PROFILE"])
    try:
        key_stamp = os.stat(os.path.expanduser(config.get("key_file", ""))).st_mtime_ns
    except OSError:
        key_stamp = None
    key = (tuple(sorted((k, str(v)) for k, v in config.items())), key_stamp, env["LOCALOCI_ENDPOINT"],
           threading.get_ident())
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = oci.object_storage.ObjectStorageClient(config,
                                                                        service_endpoint=env["LOCALOCI_ENDPOINT"])
    return client, config


def local_http() -> httpx.Client:
    """One HTTP client for the local OCI's admin API (thread-safe): a new one per call builds an
    SSL context, tens of milliseconds of CPU, even for plain HTTP."""
    if not _HTTP:
        _HTTP.append(httpx.Client(timeout=30))
    return _HTTP[0]


def upload(env: dict[str, str], path: Path, object_name: str, metadata: dict[str, str] | None = None,
           bucket: str | None = None) -> str:
    """PUT a file (into the import bucket unless ``bucket`` names another); return its ETag."""
    client, _ = stack_clients(env)
    with open(path, "rb") as f:
        reply = client.put_object(env["OCI_NAMESPACE"], bucket or env["IMPORT_BUCKET"], object_name, f,
                                  opc_meta=metadata or {})
    return reply.headers["etag"]


def start_import(env: dict[str, str], object_name: str, bucket: str | None = None, deployment: str = DEPLOYMENT,
                 **parameters: Any) -> FlowRun:
    """Start an import by hand, as ``prefect deployment run`` does (``deployment``: a machine's is
    ``import-machine/default``)."""
    from prefect.deployments import run_deployment

    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        return run_deployment(deployment, parameters={"bucket": bucket or env["IMPORT_BUCKET"],
                                                      "object_name": object_name, **parameters}, timeout=0)


def run_started_by_upload(env: dict[str, str], object_name: str, etag: str, timeout: float = 120) -> FlowRun:
    """The flow run the upload trigger started for this object version."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    deadline = time.monotonic() + timeout
    with local_stack.prefect_api(env["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["default"])),
                                         limit=200)
            for run in runs:
                if run.parameters.get("object_name") == object_name and run.parameters.get("etag") == etag:
                    return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"no flow run was started for {object_name}@{etag} within {timeout:.0f}s; "
                                   "see function.log in the stack directory")
            time.sleep(0.5)


def wait_for_run(env: dict[str, str], flow_run_id: Any, timeout: float = 600) -> FlowRun:
    deadline = time.monotonic() + timeout
    with local_stack.prefect_api(env["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run.state.name if run.state else '?'} "
                                   f"after {timeout:.0f}s")
            time.sleep(0.5)


def run_result(env: dict[str, str], run: FlowRun) -> Any:
    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        return run.state.result(raise_on_failure=False)


def inventory(env: dict[str, str]) -> dict[str, Any]:
    return local_http().get(env["LOCALOCI_ENDPOINT"] + "/_localoci/inventory").json()


def volume_matches(env: dict[str, str], volume_id: str, source: Path, fmt: str) -> tuple[bool, str]:
    """Compare the volume's backing file with the source image, as a second, independent check."""
    backing = next(v["backingFile"] for v in inventory(env)["volumes"] if v["id"] == volume_id)
    done = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(source), backing],
                          capture_output=True, text=True)
    return done.returncode == 0, (done.stdout + done.stderr).strip()


def main() -> int:
    env = local_stack.up()
    with tempfile.TemporaryDirectory(prefix="demo-disk-") as tmp:
        raw = Path(tmp) / "disk.raw"
        files = {"README.txt": b"imported by oci-disk-import\n", "data.bin": os.urandom(4 * 1024 * 1024)}
        build_disk(raw, files, table="gpt")
        image = convert(raw, Path(tmp) / "demo-disk.qcow2", "qcow2")
        object_name = f"demo/demo-disk-{int(time.time())}.qcow2"
        etag = upload(env, image, object_name, {"display_name": "demo-disk"})
        print(f"uploaded {object_name} ({image.stat().st_size:,} bytes, ETag {etag}); the upload event starts the import")
        started = run_started_by_upload(env, object_name, etag)
        print(f"import running: {env['PREFECT_UI_URL']}/runs/flow-run/{started.id}")
        run = wait_for_run(env, started.id)
        if not run.state.is_completed():
            print(f"import failed: {run.state.name}: {run.state.message}")
            return 1
        summary = run_result(env, run)
        same, detail = volume_matches(env, summary["volume_id"], image, "qcow2")
        live = inventory(env)
    print()
    print(f"volume       {summary['volume_id']} ({summary['volume_size_gb']} GB, {summary['availability_domain']})")
    print(f"format       {summary['format']}, {summary['virtual_size']:,} bytes virtual")
    for check in summary["filesystems"]:
        print(f"filesystem   {check['location']} ({check['filesystem'] or 'unknown'}): {check['status']}")
    print("steps        " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["steps"].items()))
    print(f"verified     {'yes' if same else 'NO'}: {detail}")
    print(f"workers left {len(live['instances'])}")
    print(f"Prefect UI   {env['PREFECT_UI_URL']}/runs/flow-run/{run.id}")
    ok = same and not live["instances"] and all(c["status"] == "clean" for c in summary["filesystems"])
    print("demo: " + ("import verified" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
