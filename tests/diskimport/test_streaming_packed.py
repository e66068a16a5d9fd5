"""The streaming transfer of compressed and packed objects: decompressed (or cut out of a tar)
on the worker while the object arrives, each object byte fetched once, against the local OCI."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import Any

import oci
import pytest

from diskimport.worker_vm import transfer
from diskimport.worker_vm.commands import LocalRunner
from diskimport.errors import ImageRejected
from diskimport.images.packed import inspect_object
from diskimport.worker_vm.qemu_img import QemuImg
from localoci.process import RunningLocalOCI

from .conftest import finish_against_digest, head_and_tail
from .test_packed import compress, small_disk

MiB = 1024 * 1024


def upload(localoci: RunningLocalOCI, object_storage: oci.object_storage.ObjectStorageClient, bucket: str,
           path: Path, name: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        etag = object_storage.put_object(localoci.namespace, bucket, name, f).headers["etag"]
    details = oci.object_storage.models.CreatePreauthenticatedRequestDetails(
        name="stream-test", object_name=name, access_type="ObjectRead",
        time_expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, details).data
    localoci.admin("DELETE", "metrics")
    return {"url": localoci.endpoint + par.access_uri, "etag": etag, "size": path.stat().st_size,
            "key": f"{localoci.namespace}/{bucket}/{name}"}


def inner_of(path: Path, name: str, declared: int | None = None) -> tuple[Any, transfer.Inner]:
    data = path.read_bytes()
    found, packed = inspect_object(lambda a, b: data[a:b + 1], len(data), name, None, declared, 1 << 45)
    assert packed is not None
    return found, transfer.Inner(packed.container, packed.inner_offset, packed.inner_size)


def convert_through(stream: transfer.ObjectStream, target: Path, virtual_size: int, fmt: str = "raw") -> None:
    with open(target, "wb") as f:
        f.truncate(virtual_size)
    QemuImg(LocalRunner()).convert(stream.nbd_url, fmt, str(target))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return small_disk(tmp_path / "disk.raw", size=16 * MiB, random_mib=6)  # compressed, more than the 4 MiB head


def stream_object(localoci, object_storage, bucket, path: Path, name: str, staging: str, inner: transfer.Inner,
                  present: list[tuple[int, bytes]]) -> tuple[transfer.ObjectStream, dict[str, Any]]:
    uploaded = upload(localoci, object_storage, bucket, path, name)
    runner = LocalRunner()
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   present, transfer.TransferSettings(connections=3, chunk_bytes=MiB), inner=inner)
    return stream, uploaded


@pytest.mark.heavy
@pytest.mark.parametrize("tool", ["gzip", "xz", "zstd", "bzip2"])
def test_a_compressed_raw_disk_is_decompressed_while_it_streams(localoci, object_storage, bucket, disk, staging,
                                                                 tmp_path, tool):
    packed = compress(disk, tool, "-0" if tool == "xz" else "-1")
    found, inner = inner_of(packed, packed.name, declared=disk.stat().st_size if tool == "bzip2" else None)
    present = head_and_tail(packed)
    stream, uploaded = stream_object(localoci, object_storage, bucket, packed, packed.name, staging, inner, present)
    info = transfer.second_opinion(QemuImg(LocalRunner()), stream.nbd_url, "raw", found.virtual_size)
    convert_through(stream, tmp_path / "volume.img", info.virtual_size)
    account = stream.finish()
    assert Path(stream.path).read_bytes() == disk.read_bytes() == (tmp_path / "volume.img").read_bytes()
    missing = uploaded["size"] - sum(len(d) for _, d in present)
    assert account["fetched_bytes"] == missing
    assert localoci.admin("GET", "metrics")["objectBytesRead"][uploaded["key"]] == missing


def test_a_compressed_qcow2_is_read_by_qemu_as_it_decompresses(localoci, object_storage, bucket, disk, staging,
                                                               tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(image)], check=True)
    packed = compress(image, "zstd", "-q")
    found, inner = inner_of(packed, packed.name)
    stream, _ = stream_object(localoci, object_storage, bucket, packed, packed.name, staging, inner,
                              head_and_tail(packed))
    info = transfer.second_opinion(QemuImg(LocalRunner()), stream.nbd_url, "qcow2", found.virtual_size)
    convert_through(stream, tmp_path / "volume.img", info.virtual_size, "qcow2")
    stream.finish()
    assert Path(stream.path).read_bytes() == image.read_bytes()
    assert QemuImg(LocalRunner()).compare(str(image), "qcow2", str(tmp_path / "volume.img"))[0]


@pytest.mark.parametrize("mode,name", [("w", "vm.tar"), ("w:gz", "vm.tar.gz")])
def test_a_tar_member_is_fetched_alone_or_decompressed_past_its_header(localoci, object_storage, bucket, disk,
                                                                       staging, tmp_path, mode, name):
    packed = tmp_path / name
    with tarfile.open(packed, mode) as tar:
        tar.add(str(disk), arcname="disk.raw")
    found, inner = inner_of(packed, name)
    present = head_and_tail(packed)
    stream, uploaded = stream_object(localoci, object_storage, bucket, packed, name, staging, inner, present)
    convert_through(stream, tmp_path / "volume.img", found.virtual_size)
    account = stream.finish()
    assert Path(stream.path).read_bytes() == disk.read_bytes() == (tmp_path / "volume.img").read_bytes()
    read = localoci.admin("GET", "metrics")["objectBytesRead"][uploaded["key"]]
    if mode == "w":  # only the member's bytes the inspection did not read
        data = packed.read_bytes()
        member = range(inner.offset, inner.offset + inner.size)
        known = {i for start, piece in present for i in range(start, start + len(piece)) if i in member}
        assert account["fetched_bytes"] == read == inner.size - len(known)
    else:
        assert read == uploaded["size"] - sum(len(d) for _, d in present)


@pytest.mark.parametrize("tool,size", [("gzip", 4 * MiB), ("zstd", 4 * MiB), ("zstd", 15 * MiB)])
def test_more_data_than_its_size_says_is_a_bomb_and_stops_the_transfer(localoci, object_storage, bucket, disk,
                                                                       staging, tmp_path, tool, size):
    # zstd writes the image itself, seeking over zeros: 15 MiB stops at the backup GPT past them
    packed = compress(disk, tool, "-1")
    bomb = transfer.Inner(tool, 0, size)  # as if its size record said less than the disk's 16 MiB
    stream, _ = stream_object(localoci, object_storage, bucket, packed, packed.name, staging, bomb, [])
    with pytest.raises(ImageRejected, match="^decompression-bomb: "):
        stream.finish()
    with pytest.raises(Exception, match="qemu-img convert failed"):
        convert_through(stream, tmp_path / "volume.img", size)


def test_a_corrupt_stream_fails_the_transfer(localoci, object_storage, bucket, disk, staging, tmp_path):
    packed = compress(disk, "xz", "-0")
    found, inner = inner_of(packed, packed.name)
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    stream, _ = stream_object(localoci, object_storage, bucket, packed, packed.name, staging, inner, [])
    with pytest.raises(ImageRejected, match="^decompression-failed: xz failed"):
        stream.finish()


def test_data_ending_short_of_its_size_fails(localoci, object_storage, bucket, disk, staging):
    packed = compress(disk, "zstd", "-q")
    short = transfer.Inner("zstd", 0, disk.stat().st_size + MiB)
    stream, _ = stream_object(localoci, object_storage, bucket, packed, packed.name, staging, short, [])
    with pytest.raises(ImageRejected, match="^decompression-failed: .*expected"):
        stream.finish()


@pytest.mark.heavy
@pytest.mark.parametrize("tool", ["zstd", "xz"])  # zstd writes the image itself, xz's output goes through us
def test_decompressed_zeros_are_reported_as_holes_over_nbd_and_the_object_stays_off_disk(
        localoci, object_storage, bucket, disk, staging, tmp_path, tool):
    packed = compress(disk, tool, "-q")
    found, inner = inner_of(packed, packed.name)
    present = head_and_tail(packed)
    stream, _ = stream_object(localoci, object_storage, bucket, packed, packed.name, staging, inner, present)
    mapped = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                             f"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={stream.socket}"],
                            capture_output=True, text=True, check=True)
    convert_through(stream, tmp_path / "volume.img", found.virtual_size)
    stream.finish()
    assert (tmp_path / "volume.img").read_bytes() == disk.read_bytes()
    # the disk: GPT in its first MiB, zeros, 6 MiB of data from 2 MiB, zeros, the backup GPT in its last MiB
    zeros = [(e["start"], e["start"] + e["length"]) for e in json.loads(mapped.stdout) if e["zero"]]
    data = disk.read_bytes()
    assert all(data[start:end] == bytes(end - start) for start, end in zeros)  # never data reported as zeros
    assert all(any(start <= a and b <= end for start, end in zeros) for a, b in [(1 * MiB, 2 * MiB),
                                                                                 (8 * MiB, 15 * MiB)])
    # the staging copy keeps those holes, and the object's fetched bytes went through memory only
    assert os.stat(stream.path).st_blocks * 512 <= 8 * MiB + 64 * 1024
    object_file = Path(staging) / "object"
    assert object_file.stat().st_blocks * 512 <= sum(len(d) for _, d in present) + 64 * 1024


def test_an_object_read_in_order_is_fetched_at_most_its_buffers_ahead():
    from diskimport.agent.events import TransferFailed
    from diskimport.agent.fetch import Download

    download = Download(10 * MiB, [(0, MiB)], MiB, buffers=2)
    first, second = download.take(), download.take()
    assert (first.lo, second.lo) == (MiB, 2 * MiB) and first.buf is not None
    taken: list[Any] = []
    third = threading.Thread(target=lambda: taken.append(download.take()))
    third.start()
    third.join(1.5)
    assert third.is_alive() and not taken  # no buffer free: the third chunk waits
    download.done_with(first)
    third.join(5)
    assert taken[0].lo == 3 * MiB and taken[0].buf is not None
    download.fail(TransferFailed("gone"))
    assert download.take() is None  # a failed download hands out nothing, even with a buffer free


@pytest.mark.parametrize("container,right", [("tar", True), ("tar", False), ("zstd", True), ("zstd", False)])
def test_a_member_or_a_compressed_object_is_held_against_a_manifests_digest(
        localoci, object_storage, bucket, disk, staging, tmp_path, container, right):
    if container == "tar":
        packed = tmp_path / "vm.ova"
        with tarfile.open(packed, "w") as tar:
            tar.add(str(disk), arcname="disk1.raw")
        hashed = disk.read_bytes()  # an OVA manifest's digest is of the member
    else:
        packed = compress(disk, "zstd", "-q")
        hashed = packed.read_bytes()  # of the object as uploaded
    found, inner = inner_of(packed, "vm.tar" if container == "tar" else packed.name)
    uploaded = upload(localoci, object_storage, bucket, packed, packed.name)
    runner = LocalRunner()
    digest = hashlib.sha1(hashed).hexdigest() if right else "0" * 40
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   head_and_tail(packed), transfer.TransferSettings(connections=3, chunk_bytes=MiB),
                                   inner=inner, digest=("sha1", digest, "'disk1.raw'"))
    finish_against_digest(stream, right, disk.read_bytes(), "'disk1.raw'", "SHA1")
