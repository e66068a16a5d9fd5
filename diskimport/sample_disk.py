"""Build partitioned disk images with populated filesystems, without root or loop devices.

Used by ``make demo`` and the tests: ``truncate`` and ``sfdisk`` lay out the partition
table; ext4 is made in place with ``mke2fs -E offset=N -d DIR``; vfat (``mkfs.vfat`` +
``mcopy``) and xfs (``mkfs.xfs -p protofile``) are made in separate files and copied
into place with ``dd conv=notrunc,sparse``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

MiB = 1024 * 1024
SIZES_MIB = {"ext4": 64, "vfat": 64, "xfs": 300}
# sfdisk type names for GPT and MBR
PART_TYPES = {"gpt": {"ext4": "L", "xfs": "L", "vfat": "U"}, "dos": {"ext4": "L", "xfs": "L", "vfat": "b"}}


@dataclass(frozen=True)
class Partition:
    filesystem: str
    offset: int
    size: int


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def build_disk(path: Path, files: dict[str, bytes], table: str = "gpt",
               filesystems: tuple[str, ...] = ("ext4", "xfs", "vfat")) -> list[Partition]:
    """Write a raw disk image at ``path``: one partition per filesystem, each holding ``files``."""
    if table not in PART_TYPES:
        raise ValueError(f"table must be 'gpt' or 'dos', not {table!r}")
    offset = MiB
    partitions = []
    for fs in filesystems:
        partitions.append(Partition(fs, offset, SIZES_MIB[fs] * MiB))
        offset += SIZES_MIB[fs] * MiB
    total = offset + MiB  # room for the backup GPT
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(total)
    script = f"label: {table}\n" + "".join(
        f"start={p.offset // 512}, size={p.size // 512}, type={PART_TYPES[table][p.filesystem]}\n" for p in partitions
    )
    _run("sfdisk", "--quiet", str(path), stdin=script)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        for name, data in files.items():
            (tree / name).write_bytes(data)
        for p in partitions:
            _make_filesystem(path, p, tree, Path(tmp))
    return partitions


def _make_filesystem(disk: Path, p: Partition, tree: Path, tmp: Path) -> None:
    if p.filesystem == "ext4":
        _run("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={p.offset}", "-d", str(tree), str(disk), f"{p.size // 1024}k")
        return
    part = tmp / f"{p.filesystem}.img"
    with open(part, "wb") as f:
        f.truncate(p.size)
    if p.filesystem == "vfat":
        _run("mkfs.vfat", "-n", "SAMPLE", str(part))
        for item in sorted(tree.iterdir()):
            _run("mcopy", "-i", str(part), str(item), f"::/{item.name}")
    elif p.filesystem == "xfs":
        proto = tmp / "xfs.proto"
        proto.write_text("/dev/null\n0 0\nd--755 0 0\n" + "".join(
            f"{item.name} ---644 0 0 {item}\n" for item in sorted(tree.iterdir())) + "$\n")
        _run("mkfs.xfs", "-q", "-f", "-p", str(proto), str(part))
    else:
        raise ValueError(f"unsupported filesystem {p.filesystem!r}")
    _run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={p.offset // MiB}", "conv=notrunc,sparse", "status=none")
    part.unlink()


def convert(raw: Path, target: Path, fmt: str, options: str | None = None) -> Path:
    """``qemu-img convert`` a raw disk into ``fmt`` (``-o options`` such as ``subformat=streamOptimized``)."""
    argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt]
    if options:
        argv += ["-o", options]
    _run(*argv, str(raw), str(target))
    return target


def tools_missing() -> list[str]:
    return [t for t in ("sfdisk", "mke2fs", "mkfs.vfat", "mcopy", "mkfs.xfs", "qemu-img") if shutil.which(t) is None]
