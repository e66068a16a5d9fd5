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
from diskimport.images.inspection import inspect

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


# -- VHDs: a fixed VHD is found by the footer in its last 512 bytes ---------------------------

def vhd_checksum(footer: bytes) -> int:
    """One's complement of the byte sum of the footer with its checksum field zero."""
    return ~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF


def rewrite_vhd_footer(path: Path, offset: int | None = None, *, creator: bytes | None = None,
                       disk_type: int | None = None, current_size: int | None = None,
                       geometry: tuple[int, int, int] | None = None, data_offset: int | None = None) -> Path:
    """Change fields of the VHD footer at ``offset`` (the last 512 bytes by default), checksum recomputed."""
    with open(path, "r+b") as f:
        f.seek(offset if offset is not None else f.seek(0, 2) - 512)
        start = f.tell()
        footer = bytearray(f.read(512))
        if data_offset is not None:
            footer[16:24] = struct.pack(">Q", data_offset)
        if creator is not None:
            footer[28:32] = creator
        if current_size is not None:
            footer[48:56] = struct.pack(">Q", current_size)
        if geometry is not None:
            footer[56:60] = struct.pack(">HBB", *geometry)
        if disk_type is not None:
            footer[60:64] = struct.pack(">I", disk_type)
        footer[64:68] = struct.pack(">I", vhd_checksum(bytes(footer)))
        f.seek(start)
        f.write(footer)
    return path


def fixed_vhd(tmp: Path, size: str = "8M", name: str = "image.vhd") -> Path:
    path = tmp / name
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", str(path), size)
    return path


def fixed_vhd_of(tmp: Path, source: Path, fmt: str = "raw") -> Path:
    """A fixed VHD made by qemu-img whose data is ``source`` read as ``fmt``."""
    path = tmp / "image.vhd"
    qemu_img("convert", "-f", fmt, "-O", "vpc", "-o", "subformat=fixed", str(source), str(path))
    return path


def fixed_vhd_wrong_checksum(tmp: Path) -> tuple[Path, str | None]:
    path = fixed_vhd(tmp)
    uuid_byte = path.stat().st_size - 512 + 68
    with open(path, "rb") as f:
        f.seek(uuid_byte)
        flipped = f.read(1)[0] ^ 0xFF
    return patch(path, uuid_byte, bytes([flipped])), None  # the stored checksum no longer matches


def fixed_vhd_larger_than_the_object(tmp: Path) -> tuple[Path, str | None]:
    path = fixed_vhd(tmp)
    return rewrite_vhd_footer(path, current_size=path.stat().st_size - 512 + 1024 * 1024), None


def dynamic_vhd_footer_without_its_header(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=dynamic", str(path), "8M")
    return patch(path, 0, bytes(512)), None  # the footer's copy at the start is gone; its end stays


def differencing_vhd(tmp: Path) -> tuple[Path, str | None]:
    path = tmp / "image.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=dynamic", str(path), "8M")
    return rewrite_vhd_footer(rewrite_vhd_footer(path, 0, disk_type=4), disk_type=4), None


def differencing_vhd_footer_only(tmp: Path) -> tuple[Path, str | None]:
    return rewrite_vhd_footer(fixed_vhd(tmp), disk_type=4), None


def fixed_vhd_holding_a_qcow2(tmp: Path) -> tuple[Path, str | None]:
    return fixed_vhd_of(tmp, qcow2(tmp)), None  # the VHD's data is the qcow2 file's bytes


def fixed_vhd_holding_a_bad_gpt(tmp: Path) -> tuple[Path, str | None]:
    return fixed_vhd_of(tmp, gpt_overlapping_mbr(tmp)[0]), "vpc"


def fixed_vhd_named_raw(tmp: Path) -> tuple[Path, str | None]:
    return fixed_vhd(tmp, name="image.raw"), "raw"


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
    "fixed-vhd-footer-checksum-wrong": (fixed_vhd_wrong_checksum, "vhd-footer-checksum"),
    "fixed-vhd-footer-larger-than-the-object": (fixed_vhd_larger_than_the_object, "vhd-size-mismatch"),
    "dynamic-vhd-footer-without-its-header": (dynamic_vhd_footer_without_its_header, "vhd-not-fixed"),
    "differencing-vhd": (differencing_vhd, "vhd-differencing"),
    "differencing-vhd-footer-only": (differencing_vhd_footer_only, "vhd-differencing"),
    "fixed-vhd-holding-a-qcow2": (fixed_vhd_holding_a_qcow2, "nested-image"),
    "fixed-vhd-holding-a-gpt-with-extra-mbr-partition": (fixed_vhd_holding_a_bad_gpt, "mbr"),
    "fixed-vhd-uploaded-as-raw": (fixed_vhd_named_raw, "claimed-format-mismatch"),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_image_is_refused_with_its_code(case: str, tmp_path: Path) -> None:
    build, code = CORPUS[case]
    path, claimed = build(tmp_path)
    data = path.read_bytes()
    with pytest.raises(ImageRejected) as refused:
        inspect(lambda a, b: data[a:b], len(data), claimed, 32 * TIB)
    assert refused.value.code == code, str(refused.value)
    assert refused.value.message and str(refused.value).startswith(f"{code}: ")
