"""The read-only filesystem checks on disks laid out like real guests' (tests/guest_disks.py):
LVM without activation, NTFS, btrfs, swap, LUKS, MBR logical partitions, a whole-device
filesystem, and damaged variants. Real checkers, through LocalRunner, on sparse files."""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path
from typing import Callable

import pytest

from diskimport.guest import lvm
from diskimport.worker_vm.commands import LocalRunner
from diskimport.errors import FilesystemErrors
from diskimport.guest.filesystems import FilesystemCheck, check_device, refuse
from tests import guest_disks

LAYOUTS: dict[str, Callable[[Path], guest_disks.GuestDisk]] = {
    "oracle-linux": guest_disks.oracle_linux,
    "oracle-linux-damaged-root": lambda path: guest_disks.oracle_linux(path, damaged_root="agf"),
    "oracle-linux-damaged-root-superblock": lambda path: guest_disks.oracle_linux(path, damaged_root="superblock"),
    "windows": guest_disks.windows,
    "windows-damaged-mft": lambda path: guest_disks.windows(path, damaged_partition=2),
    "windows-damaged-mirror": lambda path: guest_disks.windows(path, damaged_partition=1, damage="mirror"),
    "btrfs-root": guest_disks.btrfs_root,
    "whole-device-ext4": guest_disks.whole_device_ext4,
    "mbr-logical": guest_disks.mbr_logical,
    "unusual-partitions": guest_disks.unusual_partitions,
    "lvm-beyond-reach": lambda path: guest_disks.lvm_beyond_reach(path, path.with_name("other-pv.raw")),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], guest_disks.GuestDisk]:
    """Each layout built once for the module, on first use."""
    disks: dict[str, guest_disks.GuestDisk] = {}

    def get(name: str) -> guest_disks.GuestDisk:
        if name not in disks:
            disks[name] = LAYOUTS[name](tmp_path_factory.mktemp(name) / "disk.raw")
        return disks[name]
    return get


def check(disk: guest_disks.GuestDisk, path: Path | None = None) -> list[FilesystemCheck]:
    return check_device(LocalRunner(), str(path or disk.path), disk.size)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_partition_and_logical_volume_is_reported(built, name):
    disk = built(name)
    results = check(disk)
    assert [(r.location, r.filesystem, r.status, r.label) for r in results] == [
        (e.location, e.filesystem, e.status, e.label) for e in disk.expected], results
    for r in results:  # where the builder put each filesystem, worked out apart from the checks
        if r.location in disk.regions:
            assert (r.offset, r.size) == disk.regions[r.location], r


def test_a_clean_oracle_linux_disk_passes_even_with_unchecked_filesystems_fail(built):
    refuse(check(built("oracle-linux")), "fail")  # swap is nothing to check, not something unchecked


@pytest.mark.parametrize("name, says", [("oracle-linux-damaged-root", "agf"),
                                        ("oracle-linux-damaged-root-superblock", "superblock")],
                         ids=["agf", "superblock"])
def test_the_root_filesystem_inside_lvm_is_checked_and_its_damage_fails_naming_the_volume(built, name, says):
    results = check(built(name))
    with pytest.raises(FilesystemErrors) as caught:
        refuse(results)
    assert caught.value.code == "filesystem-errors"
    assert caught.value.message.startswith("filesystem check failed:\np3:ocivolume/root (xfs): ")
    assert "p2 (" not in caught.value.message and says in caught.value.message.lower()


@pytest.mark.parametrize("name, failing", [("windows-damaged-mft", "p2 (ntfs): "),
                                           ("windows-damaged-mirror", "p1 (ntfs): ")], ids=["mft", "mirror"])
def test_a_damaged_ntfs_partition_fails_naming_it(built, name, failing):
    with pytest.raises(FilesystemErrors) as caught:
        refuse(check(built(name)))
    assert caught.value.code == "filesystem-errors" and failing in caught.value.message
    assert caught.value.message.count("(ntfs): ") == 1


def test_logical_volumes_that_need_device_mapper_are_not_checked_with_the_reason(built):
    details = {r.location: r.detail for r in check(built("lvm-beyond-reach"))}
    assert "segments are not contiguous" in details["disk:data/scattered"]
    assert "on physical volume pv1, which is not this one" in details["disk:data/elsewhere"]
    assert "on physical volume pv1, which is not this one" in details["disk:data/spanning"]
    assert "striped over 2 stripes" in details["disk:data/striped"]


def test_unchecked_filesystems_are_allowed_by_default_and_fail_when_asked(built):
    results = check(built("unusual-partitions"))
    refuse(results)
    refuse(results, "allow")
    with pytest.raises(FilesystemErrors) as caught:
        refuse(results, "fail")
    assert caught.value.code == "unchecked-filesystems"
    message = caught.value.message
    assert "p2 (crypto_LUKS): encrypted (LUKS)" in message and "p4 (unknown): no filesystem signature" in message
    assert "p1 " not in message and "p3 " not in message  # BIOS boot and swap: nothing to check


def _copy_with_metadata(disk: guest_disks.GuestDisk, copy: Path) -> tuple[int, int, bytearray]:
    """Copy a disk whose whole device is a PV; return its metadata area (offset, size) and header."""
    subprocess.run(["cp", "--sparse=always", str(disk.path), str(copy)], check=True)
    with open(copy, "rb") as f:
        label = f.read(2048)[512:1024]  # lvm2 writes its label in sector 1
        assert label[:8] == b"LABELONE"
        # pv_header: uuid (32), device size (8), data areas (16 each, then 16 zero bytes), metadata areas
        mda_offset, mda_size = struct.unpack_from("<QQ", label, 32 + 40 + 32)
        f.seek(mda_offset)
        return mda_offset, mda_size, bytearray(f.read(512))


def _lvm_crc(data: bytes) -> int:
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def test_lvm_metadata_wrapping_around_its_ring_buffer_is_read(built, tmp_path):
    """Move the VG's metadata text so it wraps past the metadata area's end, as it does after
    many metadata updates; the logical volumes must be found as before."""
    disk = built("lvm-beyond-reach")
    copy = tmp_path / "wrapped.raw"
    mda_offset, mda_size, mdah = _copy_with_metadata(disk, copy)
    text_offset, text_size, text_crc = struct.unpack_from("<QQI", mdah, 40)
    with open(copy, "r+b") as f:
        f.seek(mda_offset + 512)
        f.write(b"\0" * (text_offset + text_size - 512))  # every copy so far is gone ...
        f.seek(mda_offset + text_offset)
        text = _read(disk.path, mda_offset + text_offset, text_size)
        assert _lvm_crc(text) == text_crc
        new_offset = mda_size - text_size // 2  # ... and the current one is half before the end, half after
        f.seek(mda_offset + new_offset)
        f.write(text[:mda_size - new_offset])
        f.seek(mda_offset + 512)
        f.write(text[mda_size - new_offset:])
        struct.pack_into("<Q", mdah, 40, new_offset)
        struct.pack_into("<I", mdah, 0, _lvm_crc(bytes(mdah[4:])))
        f.seek(mda_offset)
        f.write(mdah)
    before = [(r.location, r.status, r.offset) for r in check(disk)]
    assert [(r.location, r.status, r.offset) for r in check(disk, copy)] == before


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_lvm_metadata_with_a_bad_checksum_is_not_trusted(built, tmp_path):
    disk = built("lvm-beyond-reach")
    copy = tmp_path / "bad.raw"
    mda_offset, _, mdah = _copy_with_metadata(disk, copy)
    text_offset, _ = struct.unpack_from("<QQ", mdah, 40)
    with open(copy, "r+b") as f:
        f.seek(mda_offset + text_offset + 100)  # inside the current metadata text
        f.write(b"#")
    [result] = check(disk, copy)
    assert (result.location, result.filesystem, result.status) == ("disk", "LVM2_member", "not checked")
    assert "checksum mismatch" in result.detail


METADATA = """
# a comment
vg1 {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-gggggg"
seqno = 7
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192   # 4 MiB
physical_volumes {
pv0 { id = "AAAAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGGGG" device = "/dev/sda3" pe_start = 2048 pe_count = 100 }
pv1 { id = "HHHHHH-IIII-JJJJ-KKKK-LLLL-MMMM-NNNNNN" pe_start = 2048 pe_count = 100 }
}
logical_volumes {
root { status = ["READ", "WRITE", "VISIBLE"] creation_host = "a \\"quoted\\" host" segment_count = 2
  segment1 { start_extent = 0 extent_count = 10 type = "striped" stripe_count = 1 stripes = [ "pv0", 5 ] }
  segment2 { start_extent = 10 extent_count = 5 type = "striped" stripe_count = 1 stripes = [ "pv0", 15 ] }
}
pool { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 4 type = "thin-pool"
  metadata = "pool_tmeta" pool = "pool_tdata" } }
pool_tdata { status = ["READ", "WRITE"] segment1 { start_extent = 0 extent_count = 4 type = "striped"
  stripe_count = 1 stripes = ["pv0", 40] } }
thin { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 8 type = "thin"
  thin_pool = "pool" } }
mirrored { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 2 type = "raid1"
  raids = ["mirrored_rmeta_0", "mirrored_rimage_0"] } }
snap { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 2 type = "striped"
  stripe_count = 1 stripes = ["pv0", 60] } }
snapshot0 { status = ["READ"] segment1 { start_extent = 0 extent_count = 10 type = "snapshot"
  chunk_size = 8 origin = "root" cow_store = "snap" } }
beyond { status = ["READ", "WRITE", "VISIBLE"] segment1 { start_extent = 0 extent_count = 10 type = "striped"
  stripe_count = 1 stripes = ["pv0", 95] } }
}
}
contents = "Text Format Volume Group"
version = 1
"""


def test_metadata_maps_linear_volumes_and_names_what_it_cannot():
    parsed = lvm.parse_config(METADATA)
    assert parsed["vg1"]["logical_volumes"]["root"]["creation_host"] == 'a "quoted" host'
    vg, lvs = lvm.map_logical_volumes(parsed, "AAAAAABBBBCCCCDDDDEEEEFFFFGGGGGG", 1 << 30)
    assert vg == "vg1"
    found = {lv.name: lv for lv in lvs}
    assert list(found) == ["root", "pool", "thin", "mirrored", "snap", "beyond"]  # hidden ones are not listed
    extent = 4 * 1024 * 1024
    assert (found["root"].offset, found["root"].size) == (1024 * 1024 + 5 * extent, 15 * extent)
    assert "thin-pool volume" in found["pool"].reason
    assert "thin volume in pool pool" in found["thin"].reason
    assert "raid1 volume" in found["mirrored"].reason
    assert "snapshot of root" in found["snap"].reason
    assert "beyond the PV's 100 extents" in found["beyond"].reason
    with pytest.raises(lvm.LvmError, match="not among"):
        lvm.map_logical_volumes(parsed, "X" * 32, 1 << 30)


@pytest.mark.parametrize("text", ["vg { a = }", "vg { a = [1, 2 }", "vg {", "{ }", "vg " + "{ x " * 40])
def test_malformed_metadata_is_an_lvm_error(text):
    with pytest.raises(lvm.LvmError):
        lvm.volume_group(lvm.parse_config(text))

