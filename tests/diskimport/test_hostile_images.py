"""Hostile and broken images are refused by the header inspection, each with its own reason.

Every image is built here with the real qemu-img (or by hand where qemu-img will not
make it) and inspected exactly as an upload is: head and tail bytes only.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from diskimport.errors import ImageRejected
from diskimport.inspection import inspect

TIB = 1024**4


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qcow2(tmp: Path, size: str = "64M", *options: str) -> Path:
    path = tmp / "image.qcow2"
    qemu_img("create", "-f", "qcow2", *options, str(path), size)
    return path


def patch(path: Path, offset: int, data: bytes) -> Path:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return path


def backing_file(tmp: Path) -> tuple[Path, str | None]:
    sentinel = tmp / "sentinel"
    sentinel.write_text("host secret")
    return qcow2(tmp, "64M", "-b", str(sentinel), "-F", "raw"), None


def data_file(tmp: Path) -> tuple[Path, str | None]:
    return qcow2(tmp, "64M", "-o", f"data_file={tmp / 'external.raw'}"), None


def unknown_incompatible_feature(tmp: Path) -> tuple[Path, str | None]:
    # incompatible_features is the big-endian u64 at offset 72 of a version 3 header
    return patch(qcow2(tmp), 72, struct.pack(">Q", 1 << 40)), None


def vmdk_flat_descriptor(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n')
    return path, "vmdk"


def vmdk_path_extent(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.vmdk"
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicSparse"\nRW 2048 SPARSE "../../etc/shadow"\n')
    return path, "vmdk"


def vmdk_two_gb_extents(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(path), "64M")
    return path, "vmdk"


def qed(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.qed"
    qemu_img("create", "-f", "qed", str(path), "64M")
    return path, None


def claimed_vmdk_is_qcow2(tmp: Path) -> tuple[Path, str | None]:
    return qcow2(tmp), "vmdk"


def claimed_raw_is_vdi(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.vdi"
    qemu_img("create", "-f", "vdi", str(path), "64M")
    return path, "raw"


def not_a_disk(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "notes.qcow2"
    path.write_text("this is a text file, not a disk image\n" * 100)
    return path, "qcow2"


def empty(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "empty.qcow2"
    path.touch()
    return path, None


def too_large(tmp: Path) -> tuple[Path, str | None]:
    return qcow2(tmp, "40T"), None


def zero_virtual_size(tmp: Path) -> tuple[Path, str | None]:
    return patch(qcow2(tmp), 24, struct.pack(">Q", 0)), None


def truncated_qcow2_header(tmp: Path) -> tuple[Path, str | None]:
    path = qcow2(tmp)
    with open(path, "r+b") as f:
        f.truncate(40)
    return path, "qcow2"


def bit_flipped_magic(tmp: Path) -> tuple[Path, str | None]:
    return patch(qcow2(tmp), 0, b"QFI\xfa"), "qcow2"


def vhdx_bad_region(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.vhdx"
    qemu_img("create", "-f", "vhdx", str(path), "64M")
    # corrupt the region table signature ("regi" at 192 KiB): no metadata region can be found
    return patch(path, 192 * 1024, b"XXXX"), "vhdx"


def qcow2_and_vdi_at_once(tmp: Path) -> tuple[Path, str | None]:
    # a VDI signature (at 0x40) planted in a qcow2 header: the file is two formats at once
    return patch(qcow2(tmp), 0x40, struct.pack("<I", 0xBEDA107F)), None


def gpt_overlapping_mbr(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["sfdisk", "--quiet", str(path)], input="label: gpt\nstart=2048, size=4096, type=L\n", text=True,
                   check=True)
    # a protective MBR must hold one 0xEE partition; add a second, bogus entry
    return patch(path, 446 + 16, bytes([0x80, 0, 2, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 1, 1000)), "raw"


def luks(tmp: Path) -> tuple[Path, str | None]:
    # The first 2 MiB of an image made by `qemu-img create -f luks` (header and key slots). It
    # ships with the tests because qemu-img's PBKDF benchmark fails now and then on a loaded
    # machine ("Unable to get accurate CPU usage").
    path = tmp / "image.luks"
    path.write_bytes(gzip.decompress((Path(__file__).parent / "data" / "luks-header.img.gz").read_bytes()))
    return path, None


# Each hostile image and the code it is refused with.
CORPUS: dict[str, tuple[Callable[[Path], tuple[Path, str | None]], str]] = {
    "qcow2-backing-file": (backing_file, "backing_file"),
    "qcow2-external-data-file": (data_file, "data_file"),
    "qcow2-unknown-incompatible-feature": (unknown_incompatible_feature, "unknown_features"),
    "vmdk-flat-descriptor-naming-a-host-file": (vmdk_flat_descriptor, "descriptor"),
    "vmdk-extent-with-a-path": (vmdk_path_extent, "descriptor"),
    "vmdk-two-gb-extents": (vmdk_two_gb_extents, "descriptor"),
    "qed": (qed, "unsupported-format"),
    "claimed-vmdk-but-qcow2": (claimed_vmdk_is_qcow2, "claimed-format-mismatch"),
    "claimed-raw-but-vdi": (claimed_raw_is_vdi, "claimed-format-mismatch"),
    "text-file-named-qcow2": (not_a_disk, "claimed-format-mismatch"),
    "zero-bytes": (empty, "empty"),
    "virtual-size-above-maximum": (too_large, "too-large"),
    "virtual-size-zero": (zero_virtual_size, "zero-virtual-size"),
    "truncated-qcow2-header": (truncated_qcow2_header, "incomplete-header"),
    "bit-flipped-qcow2-magic": (bit_flipped_magic, "claimed-format-mismatch"),
    "vhdx-corrupt-region-table": (vhdx_bad_region, "claimed-format-mismatch"),
    "qcow2-and-vdi-in-one-file": (qcow2_and_vdi_at_once, "multiple-formats"),
    "gpt-with-extra-mbr-partition": (gpt_overlapping_mbr, "mbr"),
    "luks-container": (luks, "encrypted"),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_image_is_refused_with_its_code(case: str, tmp_path: Path) -> None:
    build, code = CORPUS[case]
    path, claimed = build(tmp_path)
    data = path.read_bytes()
    with pytest.raises(ImageRejected) as refused:
        inspect(lambda a, b: data[a:b + 1], len(data), claimed, 32 * TIB)
    assert refused.value.code == code, str(refused.value)
    assert refused.value.message and str(refused.value).startswith(f"{code}: ")
