"""Raw disks laid out like real guests' boot disks, for the filesystem checks and end-to-end tests.

Each builder writes a sparse raw disk and returns a :class:`GuestDisk`: its path and what a
check of it must report, place by place. Partition tables are written with ``sfdisk`` on the
file; filesystems are made in files of their own (``mkfs.*``, ``mkntfs``, ``mkswap``) and
copied into place, their data only. The LVM physical volume is made by the
lvm2 tools themselves, on a loop device over its partition, with activation and device-mapper
turned off, udev and locking kept away, and only that device scanned (this needs root, as the
checks' loop devices do). Where a logical volume's filesystem goes is computed from what
``lvs`` and ``pvs`` report, independently of :mod:`diskimport.guest.lvm`.

Sizes are the smallest the tools accept: xfs 300 MiB, btrfs 109 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
SECTOR = 512
# sfdisk type shortcuts and codes
GPT_EFI, GPT_LINUX, GPT_LVM, GPT_SWAP = "U", "L", "V", "S"
GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
MBR_NTFS, MBR_LINUX, MBR_EXTENDED = "7", "83", "5"


@dataclass(frozen=True)
class Expected:
    """What the check of one place must say."""

    location: str
    filesystem: str | None
    status: str
    label: str | None = None


@dataclass(frozen=True)
class GuestDisk:
    path: Path
    expected: tuple[Expected, ...]
    regions: dict[str, tuple[int, int]]  # location -> (offset, size) on the disk, as the builder placed it

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def tools_missing() -> list[str]:
    tools = ("sfdisk", "mkfs.vfat", "mkfs.xfs", "mke2fs", "mkntfs", "mkfs.btrfs", "mkswap", "losetup", "lvm")
    return [t for t in tools if shutil.which(t) is None]


def run_tool(*argv: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(argv, input=stdin, text=True, capture_output=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _blank(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def partition_layout(path: Path, table: str, parts: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Write a disk holding a partition table of ``parts`` ((size in MiB, type), 1 MiB aligned);
    return each partition's (offset, size) in bytes. An MBR extended partition holds the
    partitions after it (logical ones), each preceded by a MiB for its EBR."""
    places, lines, offset, logical = [], [], MiB, False
    for index, (size_mib, kind) in enumerate(parts):
        if kind == MBR_EXTENDED:
            size, logical = sum(MiB + s * MiB for s, _ in parts[index + 1:]), True
        else:
            offset += MiB if logical else 0
            size = size_mib * MiB
        places.append((offset, size))
        lines.append(f"start={offset // SECTOR}, size={size // SECTOR}, type={kind}\n")
        offset += 0 if kind == MBR_EXTENDED else size
    _blank(path, offset + MiB)  # room for the backup GPT
    run_tool("sfdisk", "--quiet", str(path), stdin=f"label: {table}\n" + "".join(lines))
    return places


def _filesystem(kind: str, size: int, work: Path, label: str | None = None, start_sector: int = 0) -> Path:
    """A filesystem image of ``size`` bytes in a file of its own."""
    image = work / f"{kind}-{uuid.uuid4().hex[:8]}.img"
    _blank(image, size)
    named = [] if label is None else {"vfat": ["-n", label], "swap": ["-L", label]}.get(kind, ["-L", label])
    if kind == "vfat":
        run_tool("mkfs.vfat", *named, str(image))
    elif kind == "xfs":
        run_tool("mkfs.xfs", "-q", "-f", *named, str(image))
    elif kind == "ext4":
        run_tool("mke2fs", "-q", "-F", "-t", "ext4", *named, str(image))
    elif kind == "btrfs":
        run_tool("mkfs.btrfs", "-q", "-f", *named, str(image))
    elif kind == "ntfs":
        # -p/-H/-S: the partition's place and geometry, as Windows writes them in the boot sector.
        run_tool("mkntfs", "-F", "-Q", "-q", "-s", "512", "-p", str(start_sector), "-H", "255", "-S", "63",
             *named, str(image))
    elif kind == "swap":
        os.chmod(image, 0o600)
        run_tool("mkswap", *named, str(image))
    else:
        raise ValueError(f"no builder for {kind}")
    return image


def data_ranges(path: Path, start: int = 0) -> list[tuple[int, int]]:
    """The (start, end) of the file's data from ``start`` on, its holes left out."""
    ranges, offset = [], start
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while offset < end:
            try:
                begin = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:  # nothing but a hole to the end
                break
            offset = os.lseek(f.fileno(), begin, os.SEEK_HOLE)
            ranges.append((begin, offset))
    return ranges


def _place(disk: Path, offset: int, image: Path) -> None:
    """Copy ``image`` into ``disk`` at ``offset``, its data only (holes stay holes), and remove it."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        for pos, hole in data_ranges(image):
            while pos < hole:
                pos += os.copy_file_range(src.fileno(), dst.fileno(), hole - pos, pos, offset + pos)
    image.unlink()


def _put(disk: Path, offset: int, kind: str, size: int, work: Path, label: str | None = None) -> None:
    _place(disk, offset, _filesystem(kind, size, work, label, start_sector=offset // SECTOR))


def write_at(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


# -- LVM with the lvm2 tools, nothing activated ---------------------------------------------------

_LVM_CONF = """
devices {{ filter = [ {filters}, "r|.*|" ] use_devicesfile = 0 obtain_device_list_from_udev = 0 }}
activation {{ udev_sync = 0 udev_rules = 0 monitoring = 0 }}
global {{ activation = 0 use_lvmpolld = 0 event_activation = 0 locking_dir = "{work}/lock" }}
backup {{ backup = 0 archive = 0 }}
"""


@dataclass(frozen=True)
class LvmLayout:
    pe_start: int        # bytes, from the PV's start
    extent_size: int     # bytes
    segments: dict[str, list[tuple[str, int, int]]]  # LV -> [(PV device, first PE, last PE)], in LV order

    def lv_range(self, lv: str, device: str) -> tuple[int, int]:
        """(offset from the PV's start, size) of an LV made of one run of extents on ``device``."""
        [(pv, first, last)] = self.segments[lv]
        assert pv == device
        return self.pe_start + first * self.extent_size, (last - first + 1) * self.extent_size


def make_volume_group(pvs: list[tuple[Path, int, int]], vg: str, lvs: list[list[str]], extent_mib: int = 4,
                      autoactivation: bool = False) -> LvmLayout:
    """Make PVs at (disk, offset, size) regions, a VG ``vg`` over them and the LVs (``lvcreate``
    arguments each, ``{0}``/``{1}`` standing for the PVs' devices); report where the extents went.
    ``autoactivation``: the VG is marked for autoactivation, as installers make them (a guest's
    initramfs activates its root LV only then); it is still not activated here."""
    with tempfile.TemporaryDirectory(prefix="lvm-") as work:
        loops: list[str] = []
        try:
            for disk, offset, size in pvs:
                loops.append(run_tool("losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
                                  str(disk)).strip())
            Path(work, "lock").mkdir()
            Path(work, "lvm.conf").write_text(_LVM_CONF.format(
                filters=", ".join(f'"a|^{loop}$|"' for loop in loops), work=work))
            env = {**os.environ, "LVM_SYSTEM_DIR": work, "LVM_SUPPRESS_FD_WARNINGS": "1"}
            # No autoactivation unless asked, should a udev with lvm2's rules see these devices.
            run_tool("vgcreate", "-q", "--setautoactivation", "y" if autoactivation else "n", "-s", f"{extent_mib}M",
                     vg, *loops, env=env)
            for args in lvs:
                options = [a for a in args if "{" not in a]
                on = [a.format(*loops) for a in args if "{" in a]  # PVs (and extent ranges) to allocate from
                run_tool("lvcreate", "-q", "-y", "--activate", "n", "--zero", "n", "--wipesignatures", "n",
                     *options, vg, *on, env=env)
            report = json.loads(run_tool("lvs", "--reportformat", "json", "-o", "lv_name,seg_start_pe,seg_pe_ranges",
                                     vg, env=env))["report"][0]["lv"]
            pv_report = json.loads(run_tool("pvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                                        "-o", "pv_name,pe_start,vg_extent_size", env=env))["report"][0]["pv"]
        finally:
            for loop in loops:
                subprocess.run(["losetup", "--detach", loop], capture_output=True)
    names = {loop: f"pv{n}" for n, loop in enumerate(loops)}
    pe_starts = {int(p["pe_start"]) for p in pv_report}
    assert len(pe_starts) == 1, pv_report
    segments: dict[str, list[tuple[str, int, int]]] = {}
    for row in sorted(report, key=lambda r: (r["lv_name"], int(r["seg_start_pe"]))):
        for piece in row["seg_pe_ranges"].split():
            device, _, pes = piece.rpartition(":")
            first, _, last = pes.partition("-")
            segments.setdefault(row["lv_name"], []).append((names[device], int(first), int(last)))
    return LvmLayout(pe_starts.pop(), int(pv_report[0]["vg_extent_size"]), segments)


# -- the layouts ------------------------------------------------------------------------------

def oracle_linux(path: Path, damaged_root: str | None = None) -> GuestDisk:
    """GPT: p1 EFI (vfat), p2 /boot (xfs), p3 an LVM PV whose VG ``ocivolume`` holds
    ``root`` (xfs) and ``swap``, as Oracle Linux lays out its images.

    ``damaged_root`` breaks the root filesystem: ``"agf"`` the magic of allocation group 0's
    free space header (blkid still sees an xfs), ``"superblock"`` the superblock's block size
    (blkid sees nothing; the check must find the xfs by its magic number).
    """
    (efi, efi_size), (boot, boot_size), (pv, pv_size) = partition_layout(
        path, "gpt", [(32, GPT_EFI), (300, GPT_LINUX), (312, GPT_LVM)])
    work = path.parent
    _put(path, efi, "vfat", efi_size, work)
    _put(path, boot, "xfs", boot_size, work, label="boot")
    layout = make_volume_group([(path, pv, pv_size)], "ocivolume", [["-L", "300M", "-n", "root"],
                                                                    ["-L", "8M", "-n", "swap"]])
    root, root_size = layout.lv_range("root", "pv0")
    swap, swap_size = layout.lv_range("swap", "pv0")
    _put(path, pv + root, "xfs", root_size, work, label="root")
    _put(path, pv + swap, "swap", swap_size, work)
    if damaged_root == "agf":
        write_at(path, pv + root + SECTOR, b"XXXX")  # the AGF follows the superblock's sector
    elif damaged_root == "superblock":
        write_at(path, pv + root + 4, b"\0" * 4)  # sb_blocksize
    elif damaged_root is not None:
        raise ValueError(f"unknown damage {damaged_root!r}")
    return GuestDisk(path, (
        Expected("p1", "vfat", "clean"),
        Expected("p2", "xfs", "clean", "boot"),
        Expected("p3:ocivolume/root", "xfs", "errors" if damaged_root else "clean",
                 None if damaged_root == "superblock" else "root"),
        Expected("p3:ocivolume/swap", "swap", "skipped"),
    ), {"p1": (efi, efi_size), "p2": (boot, boot_size), "p3": (pv, pv_size),
        "p3:ocivolume/root": (pv + root, root_size), "p3:ocivolume/swap": (pv + swap, swap_size)})


def windows(path: Path, damaged_partition: int | None = None, damage: str = "mft") -> GuestDisk:
    """MBR: p1 "System Reserved" and p2 the system drive, both NTFS.

    ``damaged_partition`` is broken by ``damage``: ``"mft"`` the magic of ``$MFT``'s first
    record (blkid then no longer recognises the filesystem, nor reads its label: the check
    must find it by its boot sector), ``"mirror"`` a field of ``$MFTMirr``'s copy of record 1
    (blkid still sees a healthy NTFS; only ntfsfix notices $MFTMirr differing from $MFT).
    """
    places = partition_layout(path, "dos", [(16, MBR_NTFS), (32, MBR_NTFS)])
    labels = ["System Reserved", "Windows"]
    for (offset, size), label in zip(places, labels):
        _put(path, offset, "ntfs", size, path.parent, label=label)
    if damaged_partition is not None:
        offset = places[damaged_partition - 1][0]
        with open(path, "rb") as f:
            f.seek(offset)
            boot = f.read(SECTOR)
        sector_bytes, sectors_per_cluster = struct.unpack_from("<HB", boot, 11)
        mft_cluster, mirror_cluster = struct.unpack_from("<qq", boot, 0x30)
        cluster = sector_bytes * sectors_per_cluster
        if damage == "mft":
            write_at(path, offset + mft_cluster * cluster, b"BAAD")
        else:  # record 1 of the mirror (records are 1 KiB), its sequence number and link count
            write_at(path, offset + mirror_cluster * cluster + 1024 + 0x10, b"\xff" * 4)
    lost_label = damage == "mft"
    return GuestDisk(path, tuple(
        Expected(f"p{n}", "ntfs", "errors", None if lost_label else label) if n == damaged_partition
        else Expected(f"p{n}", "ntfs", "clean", label)
        for n, label in enumerate(labels, start=1)), {f"p{n}": place for n, place in enumerate(places, start=1)})


def btrfs_root(path: Path) -> GuestDisk:
    """GPT: p1 EFI (vfat), p2 a btrfs root, as Fedora and openSUSE lay out theirs."""
    places = partition_layout(path, "gpt", [(32, GPT_EFI), (112, GPT_LINUX)])
    _put(path, places[0][0], "vfat", places[0][1], path.parent, label="EFI")
    _put(path, places[1][0], "btrfs", places[1][1], path.parent, label="fedora")
    return GuestDisk(path, (Expected("p1", "vfat", "clean", "EFI"), Expected("p2", "btrfs", "clean", "fedora")),
                     {"p1": places[0], "p2": places[1]})


def whole_device_ext4(path: Path) -> GuestDisk:
    """ext4 on the whole device, no partition table (a typical data disk)."""
    _blank(path, 64 * MiB)
    run_tool("mke2fs", "-q", "-F", "-t", "ext4", "-L", "data", str(path))
    return GuestDisk(path, (Expected("disk", "ext4", "clean", "data"),), {"disk": (0, 64 * MiB)})


def mbr_logical(path: Path) -> GuestDisk:
    """MBR: p1 ext4, p2 an extended partition holding the logical p5 and p6 (ext4)."""
    places = partition_layout(path, "dos", [(16, MBR_LINUX), (0, MBR_EXTENDED), (16, MBR_LINUX), (16, MBR_LINUX)])
    (p1, _), _, (p5, _), (p6, _) = places
    for offset, label in ((p1, "one"), (p5, "five"), (p6, "six")):
        _put(path, offset, "ext4", 16 * MiB, path.parent, label=label)
    return GuestDisk(path, (Expected("p1", "ext4", "clean", "one"), Expected("p5", "ext4", "clean", "five"),
                            Expected("p6", "ext4", "clean", "six")),
                     {"p1": places[0], "p5": places[2], "p6": places[3]})


def unusual_partitions(path: Path) -> GuestDisk:
    """GPT: p1 BIOS boot (no filesystem), p2 LUKS, p3 swap, p4 nothing recognisable."""
    places = partition_layout(path, "gpt", [(1, GPT_BIOS_BOOT), (4, GPT_LINUX), (8, GPT_SWAP), (4, GPT_LINUX)])
    header = bytearray(SECTOR * 2)  # a LUKS1 header: magic, version, cipher, uuid
    header[0:8] = b"LUKS\xba\xbe\x00\x01"
    header[8:11], header[40:43] = b"aes", b"xts"
    header[168:204] = str(uuid.uuid4()).encode()
    write_at(path, places[1][0], bytes(header))
    _put(path, places[2][0], "swap", places[2][1], path.parent)
    write_at(path, places[3][0], os.urandom(64 * 1024))
    return GuestDisk(path, (Expected("p1", None, "skipped"), Expected("p2", "crypto_LUKS", "not checked"),
                            Expected("p3", "swap", "skipped"), Expected("p4", None, "not checked")),
                     {f"p{n}": place for n, place in enumerate(places, start=1)})


def lvm_beyond_reach(path: Path, other: Path) -> GuestDisk:
    """A whole-device PV (``path``) of VG ``data`` spanning a second disk (``other``), whose LVs
    are: ``plain`` (ext4, linear on this disk), ``scattered`` (two runs of extents apart),
    ``elsewhere`` (on the other disk), ``spanning`` (on both) and ``striped`` (two stripes)."""
    _blank(path, 64 * MiB)
    _blank(other, 32 * MiB)
    layout = make_volume_group([(path, 0, 64 * MiB), (other, 0, 32 * MiB)], "data", [
        ["-l", "16", "-n", "plain", "{0}"],
        ["-l", "4", "-n", "scattered", "{0}:20-21", "{0}:30-31"],
        ["-l", "4", "-n", "elsewhere", "{1}"],
        ["-l", "4", "-n", "spanning", "{0}:40-41", "{1}:10-11"],
        ["-l", "4", "-i", "2", "-n", "striped"],
    ], extent_mib=1)
    plain, plain_size = layout.lv_range("plain", "pv0")
    _put(path, plain, "ext4", plain_size, path.parent, label="plain")
    return GuestDisk(path, (
        Expected("disk:data/plain", "ext4", "clean", "plain"),
        Expected("disk:data/scattered", None, "not checked"),
        Expected("disk:data/elsewhere", None, "not checked"),
        Expected("disk:data/spanning", None, "not checked"),
        Expected("disk:data/striped", None, "not checked"),
    ), {"disk": (0, 64 * MiB), "disk:data/plain": (plain, plain_size)})
