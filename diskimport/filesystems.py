"""Read-only filesystem checks of every partition on a device, run on the worker.

Each partition is exposed as a read-only loop device at its offset (``losetup -r -o``),
so the same commands work on a block device and on a file. ext2/3/4 get
``e2fsck -fn``, xfs ``xfs_repair -n``, vfat ``fsck.vfat -n``; any other filesystem is
reported as not checked, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .commands import CommandFailed, CommandRunner

CHECKERS = {
    "ext2": ["e2fsck", "-f", "-n"],
    "ext3": ["e2fsck", "-f", "-n"],
    "ext4": ["e2fsck", "-f", "-n"],
    "xfs": ["xfs_repair", "-n"],
    "vfat": ["fsck.vfat", "-n"],
}


@dataclass(frozen=True)
class FilesystemCheck:
    partition: int          # 1-based partition number, 0 for a whole-disk filesystem
    offset: int
    size: int
    filesystem: str | None
    status: str             # "clean", "errors" or "not checked"
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "errors"


def partitions(runner: CommandRunner, device: str) -> list[tuple[int, int, int]]:
    """``(number, offset, size)`` of each partition in the device's table (empty if none)."""
    result = runner.run(["sfdisk", "--json", device])
    if result.returncode != 0:
        return []
    table = json.loads(result.stdout).get("partitiontable", {})
    sector = int(table.get("sectorsize", 512))
    found = []
    for number, part in enumerate(table.get("partitions", []), start=1):
        if int(part.get("size", 0)) > 0:
            found.append((number, int(part["start"]) * sector, int(part["size"]) * sector))
    return found


def _filesystem_type(runner: CommandRunner, device: str, offset: int) -> str | None:
    result = runner.run(["blkid", "--probe", "--offset", str(offset), "--output", "export", device])
    for line in result.stdout.splitlines():
        if line.startswith("TYPE="):
            return line.split("=", 1)[1]
    return None


def check_device(runner: CommandRunner, device: str, device_size: int) -> list[FilesystemCheck]:
    """Check every partition's filesystem read-only (or the whole device if it has no table)."""
    parts = partitions(runner, device) or [(0, 0, device_size)]
    return [check_partition(runner, device, number, offset, size) for number, offset, size in parts]


def check_partition(runner: CommandRunner, device: str, number: int, offset: int, size: int) -> FilesystemCheck:
    fs = _filesystem_type(runner, device, offset)
    if fs is None:
        return FilesystemCheck(number, offset, size, None, "not checked", "no filesystem signature found")
    checker = CHECKERS.get(fs)
    if checker is None:
        return FilesystemCheck(number, offset, size, fs, "not checked", f"no read-only checker for {fs}")
    attach = runner.run(["losetup", "--read-only", "--find", "--show", "--offset", str(offset),
                         "--sizelimit", str(size), device])
    if attach.returncode != 0:
        raise CommandFailed(attach, "losetup")
    loop = attach.stdout.strip()
    try:
        result = runner.run([*checker, loop])
    finally:
        runner.run(["losetup", "--detach", loop])
    output = (result.stdout + result.stderr).strip()
    status = "clean" if result.returncode == 0 else "errors"
    return FilesystemCheck(number, offset, size, fs, status, output[-4000:])
