"""`make up` / `make down`: the local stack starts in the background and stops without a trace."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import oci

from deployments.local_stack import chosen_database, read_env
from localoci.process import alive

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = {
    "LOCALOCI_ENDPOINT", "OCI_CONFIG_FILE", "OCI_PROFILE", "OCI_NAMESPACE", "IMPORT_BUCKET",
    "COMPARTMENT_ID", "SUBNET_ID", "IMAGE_ID", "LOCALOCI_SSH_USER", "LOCALOCI_SSH_PORT",
}


def make(target: str, local_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", target], cwd=ROOT, env={**os.environ, "LOCAL_DIR": str(local_dir)},
                          capture_output=True, text=True, timeout=300)


def readme_import_commands() -> list[list[str]]:
    """The commands of README's "Importing a disk" block, each as its words."""
    section = (ROOT / "README.md").read_text().split("\n## Importing a disk\n", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]


def processes_using(path: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if str(path).encode() in Path(f"/proc/{entry}/cmdline").read_bytes() and alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def test_make_up_writes_stack_env_and_make_down_leaves_no_process(tmp_path):
    local = tmp_path / "stack"
    up = make("up", local)
    assert up.returncode == 0, up.stderr
    env = read_env(local / "stack.env")
    assert REQUIRED_KEYS <= env.keys()
    assert httpx.get(env["LOCALOCI_ENDPOINT"] + "/_localoci/health").json()["namespace"] == env["OCI_NAMESPACE"]

    config = oci.config.from_file(env["OCI_CONFIG_FILE"], env["OCI_PROFILE"])
    client = oci.object_storage.ObjectStorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    assert client.get_bucket(env["OCI_NAMESPACE"], env["IMPORT_BUCKET"]).data.object_events_enabled
    network = oci.core.VirtualNetworkClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    assert network.get_subnet(env["SUBNET_ID"]).data.lifecycle_state == "AVAILABLE"

    again = make("up", local)
    assert again.returncode == 0, again.stderr
    assert read_env(local / "stack.env") == env

    # README's commands, in a fresh shell that has nothing of this one: source stack.env, then prefect.
    source, (prefect, noun, verb, deployment, *_) = readme_import_commands()
    assert source == ["source", ".local/stack.env"] and (prefect, noun, verb) == ("prefect", "deployment", "run")
    fresh = subprocess.run(
        ["bash", "-c", f"{shlex.join(['source', str(local / 'stack.env')])} && "
                       f"{shlex.join([prefect, noun, 'inspect', deployment])}"],
        env={"HOME": os.environ["HOME"], "PATH": "/usr/bin:/bin"}, cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "'name': 'default'" in fresh.stdout and "'work_pool_name': 'import-pool'" in fresh.stdout, fresh.stdout
    assert processes_using(local)

    on_postgres = chosen_database() == "postgres"
    assert (local / "postgres.dir").exists() == on_postgres
    cluster = Path((local / "postgres.dir").read_text().strip()) if on_postgres else None
    down = make("down", local)
    assert down.returncode == 0, down.stderr
    assert processes_using(local) == []
    if cluster is not None:  # kept for the next make up; --purge removes it
        assert (cluster / "PG_VERSION").exists() and not processes_using(cluster)
        purged = subprocess.run([sys.executable, "-m", "deployments.local_stack", "down", "--purge"], cwd=ROOT,
                                env={**os.environ, "LOCAL_DIR": str(local)}, capture_output=True, text=True,
                                timeout=120)
        assert purged.returncode == 0, purged.stderr
        assert not cluster.exists()
    assert list(local.glob("*.pid")) == []
