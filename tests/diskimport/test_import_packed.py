"""Compressed and packed uploads imported end to end by the import core (no Prefect), against
the local OCI and sshd worker VMs: bit-exact volumes, and refusals that leave nothing."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from diskimport.errors import ImageRejected
from diskimport.sample_disk import build_disk
from localoci.process import RunningLocalOCI

from .conftest import import_object, live, version_of, volume_holds

MiB = 1024 * 1024
pytestmark = pytest.mark.usefixtures("no_faults")


@pytest.fixture(scope="module")
def busy_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT disk with an ext4 holding incompressible data: compressed, more than the 4 MiB head."""
    raw = tmp_path_factory.mktemp("packed") / "busy.raw"
    build_disk(raw, {"a.txt": b"alpha\n", "noise.bin": os.urandom(6 * MiB)}, table="gpt", filesystems=("ext4",))
    return raw


def packed_form(raw: Path, name: str, directory: Path) -> Path:
    """``raw`` in the form ``name`` says: compressed (a qcow2 first for ``.qcow2.*``) or in a tar."""
    target = directory / name
    if name.endswith(".tar"):
        with tarfile.open(target, "w") as tar:
            tar.add(str(raw), arcname="disk.raw")
        return target
    source = raw
    if ".qcow2." in name:
        source = directory / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(source)], check=True)
    tool = {"gz": ["gzip", "-1"], "xz": ["xz", "-0"], "zst": ["zstd", "-q", "-1"],
            "bz2": ["bzip2", "-1"]}[name.rsplit(".", 1)[1]]
    with open(target, "wb") as out:
        subprocess.run([*tool, "-c", str(source)], stdout=out, check=True)
    return target


def put(localoci: RunningLocalOCI, object_storage: Any, bucket: str, path: Path, name: str,
        metadata: dict[str, str] | None = None) -> None:
    with open(path, "rb") as f:
        object_storage.put_object(localoci.namespace, bucket, name, f, **({"opc_meta": metadata} if metadata else {}))


def nothing_left(localoci: RunningLocalOCI, version: Any) -> bool:
    return not live(localoci, "volumes", version) and not live(localoci, "instances", version)


@pytest.mark.parametrize("name,fmt", [("disk.raw.gz", "raw"), ("disk.img.xz", "raw"), ("disk.qcow2.zst", "qcow2"),
                                      ("disk.tar", "raw")])
@pytest.mark.heavy
def test_a_compressed_or_packed_disk_imports_bit_exact(localoci, object_storage, bucket, make_importer, busy_disk,
                                                       tmp_path, name, fmt):
    put(localoci, object_storage, bucket, packed_form(busy_disk, name, tmp_path), name)
    importer = make_importer()
    version = version_of(importer, localoci, bucket, name)
    summary = import_object(importer, version)
    assert summary["format"] == fmt and summary["virtual_size"] == busy_disk.stat().st_size
    assert volume_holds(localoci, summary["volume_id"], busy_disk)
    if name.endswith(".tar"):  # the member alone was fetched
        assert summary["fetched_bytes"] < busy_disk.stat().st_size
    assert [(c["filesystem"], c["status"]) for c in summary["filesystems"]] == [("ext4", "clean")]


def test_a_bomb_fails_on_the_worker_and_leaves_nothing(localoci, object_storage, bucket, make_importer, busy_disk,
                                                       tmp_path):
    """A bzip2 records no size; one that says (in its metadata) less than it holds is stopped."""
    name = "bomb.raw.bz2"
    put(localoci, object_storage, bucket, packed_form(busy_disk, name, tmp_path), name,
        {"virtual-size": str(busy_disk.stat().st_size // 2)})
    importer = make_importer()
    version = version_of(importer, localoci, bucket, name)
    with pytest.raises(ImageRejected) as refused:
        import_object(importer, version)
    assert refused.value.code == "decompression-bomb"
    assert nothing_left(localoci, version)


def test_an_unknown_size_is_refused_before_anything_is_created(localoci, object_storage, bucket, make_importer,
                                                               busy_disk, tmp_path):
    name = "nosize.raw.bz2"
    put(localoci, object_storage, bucket, packed_form(busy_disk, name, tmp_path), name)
    importer = make_importer()
    version = version_of(importer, localoci, bucket, name)
    with pytest.raises(ImageRejected) as refused:
        import_object(importer, version)
    assert refused.value.code == "virtual-size-unknown" and "opc-meta-virtual-size" in refused.value.message
    assert nothing_left(localoci, version)
    assert localoci.inventory()  # the local OCI still answers
