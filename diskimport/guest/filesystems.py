"""Read-only checks of every filesystem on a device, run on the worker.

Every partition of the device's table (MBR logical partitions included, the extended
container itself skipped), or the whole device when it has no table, is probed with
``blkid``. A filesystem is checked through a read-only loop device over its byte range
(``losetup -r -o OFFSET --sizelimit SIZE``), so the same commands work on a block device
and on a file: ext2/3/4 with ``e2fsck -fn``, xfs ``xfs_repair -n``, vfat ``fsck.vfat -n``,
NTFS ``ntfsfix --no-action``, btrfs ``btrfs check --readonly``.

An LVM2 physical volume is read as bytes (:mod:`diskimport.guest.lvm`), never activated: each
logical volume that maps onto one contiguous range of it is checked like a partition at
that range; the others are reported with the reason. Swap, BIOS boot and Microsoft
reserved partitions hold nothing to check and are reported "skipped"; encrypted volumes
(LUKS, BitLocker), unknown filesystems and unreadable LVM metadata are reported "not
checked", with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

from . import lvm
from ..worker_vm.commands import CommandFailed, CommandRunner, read_range
from ..errors import FilesystemErrors

CHECKERS = {
    "ext2": ["e2fsck", "-f", "-n"],
    "ext3": ["e2fsck", "-f", "-n"],
    "ext4": ["e2fsck", "-f", "-n"],
    "xfs": ["xfs_repair", "-n"],
    "vfat": ["fsck.vfat", "-n"],
    "ntfs": ["ntfsfix", "--no-action"],
    "btrfs": ["btrfs", "check", "--readonly"],
}
ENCRYPTED = {"crypto_LUKS": "LUKS", "BitLocker": "BitLocker"}
NOTHING_TO_CHECK = {"swap": "swap space"}
# Partition types (GPT type GUIDs) that hold no filesystem by design.
NO_FILESYSTEM_PARTITIONS = {
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot partition (boot loader code)",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved partition",
}
EXTENDED_PARTITIONS = {"5", "f", "85"}  # MBR containers of logical partitions

CLEAN, ERRORS, NOT_CHECKED, SKIPPED = "clean", "errors", "not checked", "skipped"


@dataclass(frozen=True)
class FilesystemCheck:
    """What was found at one place of the disk, and what its read-only check said."""

    location: str           # "p1", "p5", "p3:ocivolume/root", "disk" (no table), "disk:vg/lv"
    partition: int          # 1-based partition number (of the PV for an LV), 0 for the whole device
    offset: int             # byte offset on the device (an LV that cannot be mapped: its PV's)
    size: int
    filesystem: str | None  # blkid's TYPE (ext4, xfs, ntfs, swap, crypto_LUKS, ...)
    label: str | None       # blkid's LABEL
    status: str             # "clean", "errors", "not checked" or "skipped" (nothing to check)
    detail: str             # the checker's output (its last 4000 characters), or the reason
    uuid: str | None = None      # blkid's UUID of the filesystem (how a guest's fstab may name it)
    partuuid: str | None = None  # the partition's own id (GPT partition GUID; MBR disk id-number)

    @property
    def failed(self) -> bool:
        return self.status == ERRORS

    @property
    def unchecked(self) -> bool:
        return self.status == NOT_CHECKED

    def describe(self) -> str:
        """``p3:ocivolume/root (xfs)``: where, and what, for messages."""
        return f"{self.location} ({self.filesystem or 'unknown'})"


def refuse(results: Sequence[FilesystemCheck], unchecked_filesystems: str = "allow") -> None:
    """Fail the import for a filesystem with errors (``filesystem-errors``) and, when
    ``unchecked_filesystems`` is ``"fail"``, for anything not checked (``unchecked-filesystems``);
    each message names the locations."""
    failed = [r for r in results if r.failed]
    if failed:
        raise FilesystemErrors("filesystem-errors", "filesystem check failed:\n" + "\n".join(
            f"{r.describe()}: {r.detail}" for r in failed))
    unchecked = [r for r in results if r.unchecked]
    if unchecked and unchecked_filesystems == "fail":
        raise FilesystemErrors("unchecked-filesystems", "not every filesystem could be checked "
                               "(unchecked_filesystems is 'fail'): " + "; ".join(
                                   f"{r.describe()}: {r.detail}" for r in unchecked))


@dataclass(frozen=True)
class Partition:
    number: int
    offset: int
    size: int
    type: str  # sfdisk's type: an MBR type code ("83", "5") or a GPT type GUID
    uuid: str | None = None  # PARTUUID: the GPT partition GUID, or the MBR disk id and number


def partition_table(runner: CommandRunner, device: str) -> list[Partition] | None:
    """The partitions of the device's table, or None when it has no partition table."""
    result = runner.run(["sfdisk", "--json", device])
    if result.returncode != 0:
        return None
    table = json.loads(result.stdout).get("partitiontable", {})
    sector = int(table.get("sectorsize", 512))
    disk_id = str(table.get("id", "")).lower()
    found = []
    for index, part in enumerate(table.get("partitions", []), start=1):
        if int(part.get("size", 0)) > 0:
            number = _partition_number(part.get("node", ""), index)
            uuid = part.get("uuid") or (f"{disk_id[2:]:0>8}-{number:02x}" if table.get("label") == "dos"
                                        and disk_id.startswith("0x") else None)
            found.append(Partition(number, int(part["start"]) * sector, int(part["size"]) * sector,
                                   str(part.get("type", "")).upper(), str(uuid).lower() if uuid else None))
    return found


def _partition_number(node: str, fallback: int) -> int:
    """The number in sfdisk's node name (``/dev/sdb5``, ``/dev/nvme0n1p5``, ``disk.raw5``)."""
    match = re.search(r"(\d+)$", node)
    return int(match.group(1)) if match else fallback


@dataclass(frozen=True)
class _Probe:
    type: str | None
    label: str | None
    ambivalent: bool
    unrecognised: bool = False  # blkid found nothing; ``type`` is what the magic claims
    uuid: str | None = None


def _identify(runner: CommandRunner, device: str, offset: int, size: int) -> _Probe:
    """What blkid finds at the range, or failing that, what its magic number claims."""
    probe = _blkid(runner, device, offset, size)
    if probe.type is None and not probe.ambivalent:
        claimed = _sniff(read_range(runner, device, offset, min(size, SNIFF_BYTES)))
        if claimed is not None:
            return _Probe(claimed, None, False, unrecognised=True)
    return probe


def _blkid(runner: CommandRunner, device: str, offset: int, size: int) -> _Probe:
    result = runner.run(["blkid", "--probe", "--offset", str(offset), "--size", str(size),
                         "--output", "export", device])
    values = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = re.sub(r"\\(.)", r"\1", value)  # export format escapes with backslashes
    # blkid exits 8 when several signatures compete ("ambivalent result").
    return _Probe(values.get("TYPE"), values.get("LABEL"), result.returncode == 8, uuid=values.get("UUID"))


SNIFF_BYTES = 65536 + 4096  # reaches btrfs's superblock at 64 KiB


def _sniff(head: bytes) -> str | None:
    """The filesystem a region's first bytes claim, by its primary magic alone.

    blkid also validates what follows the magic: a filesystem damaged there (an NTFS whose
    ``$MFT`` is broken, say) is not recognised at all. Its checker must still run, or the
    damage would pass as "no filesystem"."""
    if head[3:11] == b"NTFS    ":
        return "ntfs"
    if head[:4] == b"XFSB":
        return "xfs"
    if head[1080:1082] == b"\x53\xef":
        compat, incompat = int.from_bytes(head[1116:1120], "little"), int.from_bytes(head[1120:1124], "little")
        return "ext4" if incompat & 0x2C0 else "ext3" if compat & 0x4 else "ext2"
    if head[65536 + 64:65536 + 72] == b"_BHRfS_M":
        return "btrfs"
    if head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32":
        return "vfat"
    if any(head[n * 512:n * 512 + 8] == b"LABELONE" for n in range(4)):
        return "LVM2_member"
    return None


def _installed(runner: CommandRunner, tools: Sequence[str]) -> set[str]:
    probe = runner.run(["sh", "-c", 'for t in "$@"; do command -v "$t" >/dev/null && echo "$t"; done', "sh", *tools])
    return set(probe.stdout.split())


def check_device(runner: CommandRunner, device: str, device_size: int) -> list[FilesystemCheck]:
    """Check every partition's filesystem, and every logical volume's, read-only."""
    tools = _installed(runner, sorted({checker[0] for checker in CHECKERS.values()}))
    table = partition_table(runner, device)
    if table is None:
        return _check_region(runner, device, tools, "disk", 0, 0, device_size, None)
    results = []
    for part in table:
        if part.type not in EXTENDED_PARTITIONS:
            results += _check_region(runner, device, tools, f"p{part.number}", part.number, part.offset,
                                     part.size, part.type, part.uuid)
    return results


def _check_region(runner: CommandRunner, device: str, tools: set[str], location: str, number: int,
                  offset: int, size: int, part_type: str | None, partuuid: str | None = None) -> list[FilesystemCheck]:
    probe = _identify(runner, device, offset, size)
    if probe.type == "LVM2_member" and not probe.ambivalent:
        return _check_physical_volume(runner, device, tools, location, number, offset, size)
    return [_check_filesystem(runner, device, tools, location, number, offset, size, probe, part_type, partuuid)]


def _check_physical_volume(runner: CommandRunner, device: str, tools: set[str], location: str, number: int,
                           offset: int, size: int) -> list[FilesystemCheck]:
    def found(status: str, detail: str) -> FilesystemCheck:
        return FilesystemCheck(location, number, offset, size, "LVM2_member", None, status, detail)

    try:
        pv = lvm.read_physical_volume(lambda start, length: read_range(runner, device, offset + start, length), size)
    except lvm.LvmError as exc:
        return [found(NOT_CHECKED, f"LVM physical volume whose metadata cannot be read: {exc}")]
    if not pv.logical_volumes:
        return [found(SKIPPED, f"LVM physical volume of volume group {pv.vg}, holding no logical volume")]
    results = []
    for lv in pv.logical_volumes:
        where = f"{location}:{lv.vg}/{lv.name}"
        if lv.offset is None:
            results.append(FilesystemCheck(where, number, offset, lv.size, None, None, NOT_CHECKED,
                                           f"logical volume not checked: {lv.reason}"))
            continue
        start = offset + lv.offset
        probe = _identify(runner, device, start, lv.size)
        results.append(_check_filesystem(runner, device, tools, where, number, start, lv.size, probe, None))
    return results


def _check_filesystem(runner: CommandRunner, device: str, tools: set[str], location: str, number: int,
                      offset: int, size: int, probe: _Probe, part_type: str | None,
                      partuuid: str | None = None) -> FilesystemCheck:
    fs = probe.type

    def found(status: str, detail: str) -> FilesystemCheck:
        return FilesystemCheck(location, number, offset, size, fs, probe.label, status, detail, probe.uuid, partuuid)

    if probe.ambivalent:
        return found(NOT_CHECKED, "several filesystem signatures found (blkid: ambivalent result)")
    if fs is None:
        if part_type in NO_FILESYSTEM_PARTITIONS:
            return found(SKIPPED, NO_FILESYSTEM_PARTITIONS[part_type])
        return found(NOT_CHECKED, "no filesystem signature found")
    if fs in NOTHING_TO_CHECK:
        return found(SKIPPED, NOTHING_TO_CHECK[fs])
    if fs in ENCRYPTED:
        return found(NOT_CHECKED, f"encrypted ({ENCRYPTED[fs]}): its content cannot be checked")
    checker = CHECKERS.get(fs)
    if checker is None:
        return found(NOT_CHECKED, f"no read-only checker for {fs}")
    if checker[0] not in tools:
        return found(NOT_CHECKED, f"{checker[0]} is not installed on the worker")
    attach = runner.run(["losetup", "--read-only", "--find", "--show", "--offset", str(offset),
                         "--sizelimit", str(size), device])
    if attach.returncode != 0:
        raise CommandFailed(attach, "losetup")
    loop = attach.stdout.strip()
    try:
        result = runner.run([*checker, loop])
    finally:
        runner.run(["losetup", "--detach", loop])
    output = (result.stdout + result.stderr).strip()[-4000:]
    if probe.unrecognised:
        output = f"blkid does not recognise this {fs} filesystem (only its magic number is there)\n{output}"
    return found(CLEAN if result.returncode == 0 else ERRORS, output)
