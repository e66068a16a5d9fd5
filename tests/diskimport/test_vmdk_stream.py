"""A streamOptimized VMDK decoded by the stream program as it arrives and written onto the device.

The image streams from the real local OCI through the real stream program (diskimport.agent.vmdk),
which inflates each grain once and writes it straight onto a volume file; qemu-img makes
the images and is the judge of what the disk should hold. Crafted streams (a grain table
that disagrees with the markers, a grain out of the disk, a grain that inflates too far)
are refused with ``vmdk-stream-invalid`` and a message that says where.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import oci
import pytest

from diskimport.worker_vm import agent_archive, transfer
from diskimport.worker_vm.commands import LocalRunner
from diskimport.errors import ImageRejected

from .conftest import head_and_tail

MiB = 1024 * 1024
VIRTUAL = 256 * MiB
GRAIN = 64 * 1024


def raw_disk(path: Path) -> bytes:
    """A disk with data in runs (incompressible and compressible), zeros between them, a partial tail."""
    data = bytearray(VIRTUAL)
    for n in range(6):
        at = n * 40 * MiB + 3 * MiB + 4096 * n
        data[at:at + 9 * MiB] = os.urandom(9 * MiB) if n % 2 else bytes([n + 1]) * (9 * MiB)
    data[-1000:] = os.urandom(1000)
    path.write_bytes(data)
    return bytes(data)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    tmp = tmp_path_factory.mktemp("vmdk-stream")
    content = raw_disk(tmp / "disk.raw")
    target = tmp / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(tmp / "disk.raw"), str(target)], check=True)
    return content, target


def vmware_layout(content: bytes, grain: int = GRAIN, per: int = 512, *, tamper=None) -> bytes:
    """A streamOptimized VMDK laid out as VMware writes one: header (directory at the end), grains
    each with its marker, a grain table marker after its grains, directory, footer, end-of-stream.

    ``tamper(grains, tables)`` may change the grains ([lba, deflated]) and tables before they are laid out.
    """
    capacity = len(content) // 512
    count = -(-len(content) // grain)

    def header(gd_offset: int) -> bytes:
        h = struct.pack("<4sIIQQQQIQQQ", b"KDMV", 3, 0x30001, capacity, grain // 512, 1, 20, per, 0,
                        gd_offset, 128)
        h += b"\0" + b"\n \r\n"
        h = h.ljust(77, b"\0") + struct.pack("<H", 1)
        return h.ljust(512, b"\0")

    grains = []
    for index in range(count):
        piece = content[index * grain:(index + 1) * grain].ljust(grain, b"\0")
        if piece.count(0) != grain:
            grains.append([index * grain // 512, zlib.compress(piece, 1)])
    descriptor = (f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                  f'createType="streamOptimized"\n\nRW {capacity} SPARSE "disk.vmdk"\n\n'
                  f'ddb.adapterType = "lsilogic"\n').encode()
    out = bytearray(header(0xFFFFFFFFFFFFFFFF) + descriptor).ljust(128 * 512, b"\0")
    tables: dict[int, list[int]] = {}
    if tamper is not None:
        tamper(grains, tables)
    entries = [0] * (-(-count // per) * per)
    placed: list[tuple[int, int]] = []
    for lba, deflated in grains:
        placed.append((lba, len(out) // 512))
        out += (struct.pack("<QI", lba, len(deflated)) + deflated).ljust(-(-(12 + len(deflated)) // 512) * 512, b"\0")
    for lba, sector in placed:
        if lba * 512 // grain < len(entries):
            entries[lba * 512 // grain] = sector
    for index, value in tables.items():
        entries[index] = value
    directory = []
    for g in range(len(entries) // per):
        table = entries[g * per:(g + 1) * per]
        if not any(table):
            directory.append(0)
            continue
        out += struct.pack("<QII", per * 4 // 512, 0, 1).ljust(512, b"\0")
        directory.append(len(out) // 512)
        out += struct.pack(f"<{per}I", *table)
    body = struct.pack(f"<{len(directory)}I", *directory)
    body = body.ljust(-(-len(body) // 512) * 512, b"\0")
    out += struct.pack("<QII", len(body) // 512, 0, 2).ljust(512, b"\0")
    gd_at = len(out) // 512
    out += body
    out += struct.pack("<QII", 1, 0, 3).ljust(512, b"\0") + header(gd_at)
    out += bytes(512)  # end of stream
    return bytes(out)


def put(localoci, object_storage: oci.object_storage.ObjectStorageClient, bucket: str, name: str,
        data: bytes) -> dict[str, Any]:
    etag = object_storage.put_object(localoci.namespace, bucket, name, data).headers["etag"]
    details = oci.object_storage.models.CreatePreauthenticatedRequestDetails(
        name="vmdk-stream-test", object_name=name, access_type="ObjectRead",
        time_expires=__import__("datetime").datetime.now(__import__("datetime").timezone.utc)
        + __import__("datetime").timedelta(hours=1))
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, details).data
    return {"url": localoci.endpoint + par.access_uri, "etag": etag, "size": len(data)}


def decode(uploaded: dict[str, Any], image: Path, staging: str, target: Path, *, fresh: bool = True,
           digest: tuple[str, str, str] | None = None) -> dict[str, Any]:
    runner = LocalRunner()
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   head_and_tail(image, head=1 * MiB, tail=4096),
                                   transfer.TransferSettings(connections=2, chunk_bytes=2 * MiB),
                                   digest=digest, decode=transfer.Decode(VIRTUAL, fresh))
    assert stream.decoding and not stream.windowed
    try:
        if fresh:
            with open(target, "wb") as f:
                f.truncate(VIRTUAL)
        stream.use_device(str(target))
        return stream.finish()
    except BaseException:
        stream.abort()
        raise


def test_a_qemu_written_stream_optimized_vmdk_is_decoded_bit_exact(localoci, object_storage, bucket, disk,
                                                                    staging, tmp_path):
    content, image = disk
    uploaded = put(localoci, object_storage, bucket, "qemu.vmdk", image.read_bytes())
    target = tmp_path / "volume.img"
    account = decode(uploaded, image, staging, target)
    assert target.read_bytes() == content
    decoded = account["decoded"]
    data_grains = sum(1 for i in range(0, VIRTUAL, GRAIN) if content[i:i + GRAIN].count(0) != GRAIN)
    assert decoded["grains"] == data_grains
    assert decoded["written"] == decoded["verified"] == data_grains * GRAIN
    assert decoded["verified"] + decoded["gaps_checked"] == VIRTUAL  # and the rest found to be zeros
    # every byte fetched once, the head and tail handed over not at all
    assert account["fetched_bytes"] == uploaded["size"] - 1 * MiB - 4096
    assert os.stat(Path(staging) / "image").st_blocks * 512 <= 2 * MiB  # nothing staged beyond what was handed over


@pytest.mark.heavy
def test_a_vmware_laid_out_vmdk_with_a_digest_is_decoded_onto_a_used_volume(localoci, object_storage, bucket,
                                                                             disk, staging, tmp_path):
    content, _ = disk
    data = vmware_layout(content)
    image = tmp_path / "vmware.vmdk"
    image.write_bytes(data)
    # qemu-img reads the same disk from it
    raw = tmp_path / "disk.raw"
    raw.write_bytes(content)
    check = subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(image), str(raw)],
                           capture_output=True)
    assert check.returncode == 0, check.stderr
    uploaded = put(localoci, object_storage, bucket, "vmware.vmdk", data)
    target = tmp_path / "used.img"
    target.write_bytes(os.urandom(VIRTUAL))  # a volume written before: the gaps must be zeroed
    account = decode(uploaded, image, staging, target, fresh=False,
                     digest=("sha256", hashlib.sha256(data).hexdigest(), "vmware.vmdk"))
    assert target.read_bytes() == content  # the grains written, and the random bytes between them zeroed
    assert account["decoded"]["written"] < VIRTUAL - 100 * MiB


def test_a_digest_that_does_not_match_refuses_the_decoded_vmdk(localoci, object_storage, bucket, disk, staging,
                                                               tmp_path):
    content, image = disk
    uploaded = put(localoci, object_storage, bucket, "qemu.vmdk", image.read_bytes())
    with pytest.raises(ImageRejected, match="^ova-digest-mismatch: the bytes of disk1.vmdk do not match"):
        decode(uploaded, image, staging, tmp_path / "volume.img", digest=("sha256", "0" * 64, "disk1.vmdk"))


CRAFTED = {
    "a grain table that disagrees with the markers": (
        lambda grains, tables: tables.update({grains[0][0] * 512 // GRAIN: 129 + 7}),
        r"grain \d+ of the disk is at sector \d+ by the VMDK's grain table, by its markers at sector \d+"),
    "a grain past the end of the disk": (
        lambda grains, tables: grains[2].__setitem__(0, VIRTUAL // 512 + 128),
        r"the grain at byte \d+ is for sector \d+, not a grain's start on the disk"),
    "a grain not on a grain's start": (
        lambda grains, tables: grains[2].__setitem__(0, grains[2][0] + 8),
        r"the grain at byte \d+ is for sector \d+, not a grain's start on the disk"),
    "a grain that inflates to more than a grain": (
        lambda grains, tables: grains[1].__setitem__(1, zlib.compress(bytes(2 * GRAIN))),
        r"the grain at byte \d+ inflates to more than 65536 bytes"),
    "a grain that does not inflate": (
        lambda grains, tables: grains[1].__setitem__(1, b"not deflate at all" * 10),
        r"the grain at byte \d+ does not inflate"),
    "two grains for the same place": (
        lambda grains, tables: grains[5].__setitem__(0, grains[4][0]),
        r"the grain at byte \d+ is for sector \d+, which the grain at byte \d+ already holds"),
}


@pytest.mark.heavy
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_stream_is_refused_naming_where(localoci, object_storage, bucket, disk, staging, tmp_path, case):
    content, _ = disk
    tamper, message = CRAFTED[case]
    data = vmware_layout(content, tamper=tamper)
    image = tmp_path / "crafted.vmdk"
    image.write_bytes(data)
    uploaded = put(localoci, object_storage, bucket, "crafted.vmdk", data)
    with pytest.raises(ImageRejected, match="^vmdk-stream-invalid: " + message):
        decode(uploaded, image, staging, tmp_path / "volume.img")


def test_a_python_without_preadv_decodes_the_same(localoci, object_storage, bucket, disk, staging, tmp_path,
                                                  monkeypatch):
    """A worker's python3 may be older than 3.7, without os.preadv: the stream program then reads the
    device back through the page cache, flushed and dropped first, and the disk comes out the same."""
    content, image = disk
    older = tmp_path / "agent"
    shutil.copytree(agent_archive.PACKAGE, older)
    files = older / "files.py"  # where every read of the programs goes through
    text = files.read_text()
    assert "\nimport os\n" in text
    files.write_text(text.replace("\nimport os\n", "\nimport os\ndel os.preadv\n", 1))
    monkeypatch.setattr(transfer, "agent_archive", lambda: agent_archive.build(older))
    uploaded = put(localoci, object_storage, bucket, "older.vmdk", image.read_bytes())
    target = tmp_path / "volume.img"
    target.write_bytes(os.urandom(VIRTUAL))
    account = decode(uploaded, image, staging, target, fresh=False)
    assert target.read_bytes() == content
    assert account["decoded"]["written"] == account["decoded"]["verified"] > 0


def last_grain_end(data: bytes) -> int:
    """The byte after the last grain's deflated bytes in a qemu-img-written stream (markers walked from its overhead)."""
    overhead = struct.unpack_from("<Q", data, 64)[0] * 512  # the header's overHead, in sectors
    at, end = overhead, 0
    while at + 12 <= len(data):
        _, length = struct.unpack_from("<QI", data, at)
        if not length:  # a metadata marker: its body follows its sector
            sectors = struct.unpack_from("<Q", data, at)[0]
            at += 512 + sectors * 512
            continue
        end = at + 12 + length
        at = -(-end // 512) * 512
    return end


def test_a_stream_that_ends_with_its_last_grain_unpadded_is_decoded(localoci, object_storage, bucket, disk,
                                                                    staging, tmp_path):
    """A writer that ends the file right after its last grain's deflated bytes, without padding the
    sector: the stream ends there, and the disk is whole (qemu-img reads the same file alike)."""
    content, image = disk
    data = image.read_bytes()
    data = data[:last_grain_end(data)]
    assert len(data) % 512
    cut = tmp_path / "cut.vmdk"
    cut.write_bytes(data)
    raw = tmp_path / "disk.raw"
    raw.write_bytes(content)
    check = subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(cut), str(raw)], capture_output=True)
    assert check.returncode == 0, check.stderr
    uploaded = put(localoci, object_storage, bucket, "cut.vmdk", data)
    target = tmp_path / "volume.img"
    account = decode(uploaded, cut, staging, target)
    assert target.read_bytes() == content
    assert account["decoded"]["verified"] + account["decoded"]["gaps_checked"] == VIRTUAL
