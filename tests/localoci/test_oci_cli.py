"""The real ``oci`` CLI against the local OCI: large multipart uploads, parallel multipart downloads, volume groups."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import oci
import pytest

from localoci.process import RunningLocalOCI
# new_volume, tag: AVAILABLE volumes for a test, deleted with its volume groups at its end.
from tests.localoci.test_volume_groups import new_volume, tag  # noqa: F401

MiB = 1024 * 1024
OCI_CLI = Path(sys.executable).with_name("oci")


def run_oci(localoci: RunningLocalOCI, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OCI_CLI_SUPPRESS_FILE_PERMISSIONS_WARNING": "True"}
    command = [str(OCI_CLI), *args, "--endpoint", localoci.endpoint,
               "--config-file", localoci.oci_config_file, "--profile", localoci.oci_profile]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` bytes of varied data (every MiB differs) and return their MD5."""
    block = bytearray(os.urandom(MiB))
    md5 = hashlib.md5()
    with open(path, "wb") as f:
        for i in range(size // MiB):
            block[:8] = i.to_bytes(8, "big")
            block[-8:] = os.urandom(8)
            md5.update(block)
            f.write(block)
    return md5.hexdigest()


def file_md5(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            md5.update(chunk)
    return md5.hexdigest()


@pytest.mark.heavy
def test_cli_multipart_put_and_parallel_multipart_get_of_300_mib_preserve_md5(
    localoci: RunningLocalOCI, bucket: str, object_storage: oci.object_storage.ObjectStorageClient, tmp_path: Path
) -> None:
    assert OCI_CLI.exists(), f"the oci CLI is not installed next to {sys.executable}"
    source, target = tmp_path / "disk.raw", tmp_path / "downloaded.raw"
    source_md5 = write_random_file(source, 300 * MiB)
    name = "images/big disk.raw"
    common = ["-ns", localoci.namespace, "-bn", bucket, "--name", name]

    # 300 MiB in 64 MiB parts: a 5-part multipart upload, uploaded in parallel and checked by the CLI.
    put = run_oci(localoci, "os", "object", "put", *common, "--file", str(source), "--part-size", "64",
                  "--parallel-upload-count", "4", "--verify-checksum")
    assert "Split file into 5 parts" in put.stderr
    head = object_storage.head_object(localoci.namespace, bucket, name)
    assert int(head.headers["content-length"]) == 300 * MiB
    assert head.headers["opc-multipart-md5"].endswith("-5")

    # Above the 128 MiB threshold with 128 MiB parts: three ranged GETs, four at a time
    # (--debug makes the CLI print the response headers, so the ranges it fetched show).
    get = run_oci(localoci, "--debug", "os", "object", "get", *common, "--file", str(target),
                  "--multipart-download-threshold", "128", "--part-size", "128", "--parallel-download-count", "4")
    debug = get.stdout + get.stderr
    for first, last in ((0, 128 * MiB - 1), (128 * MiB, 256 * MiB - 1), (256 * MiB, 300 * MiB - 1)):
        assert f"bytes {first}-{last}/{300 * MiB}" in debug, f"no ranged GET of bytes {first}-{last}"
    assert target.stat().st_size == 300 * MiB
    assert file_md5(target) == source_md5


@pytest.mark.heavy
def test_cli_volume_group_create_get_delete(localoci: RunningLocalOCI, blockstorage: oci.core.BlockstorageClient,
                                            compartment_id: str, availability_domains: list[str], new_volume, tag) -> None:
    ids = [new_volume(50).id, new_volume(60).id]
    source = json.dumps({"type": "volumeIds", "volumeIds": ids})
    created = json.loads(run_oci(
        localoci, "bv", "volume-group", "create", "--compartment-id", compartment_id,
        "--availability-domain", availability_domains[0], "--source-details", source, "--display-name", "cli-group",
        "--freeform-tags", json.dumps({"test": tag}), "--wait-for-state", "AVAILABLE", "--wait-interval-seconds", "1",
    ).stdout)["data"]
    assert (created["lifecycle-state"], created["display-name"], created["volume-ids"]) == ("AVAILABLE", "cli-group", ids)
    assert created["size-in-gbs"] == 110

    got = json.loads(run_oci(localoci, "bv", "volume-group", "get", "--volume-group-id", created["id"]).stdout)["data"]
    assert got["volume-ids"] == ids and got["source-details"] == {"type": "volumeIds", "volume-ids": ids}
    assert blockstorage.get_volume(ids[0]).data.volume_group_id == created["id"]

    run_oci(localoci, "bv", "volume-group", "delete", "--volume-group-id", created["id"], "--force",
            "--wait-for-state", "TERMINATED", "--wait-interval-seconds", "1")
    assert blockstorage.get_volume_group(created["id"]).data.lifecycle_state == "TERMINATED"
    assert [blockstorage.get_volume(v).data.volume_group_id for v in ids] == [None, None]
