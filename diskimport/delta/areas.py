"""Changed areas: what the source's change tracking says was written since the last push.

Hashing the whole disk at every push is what a push costs without change tracking (minutes for
hundreds of GiB). A hypervisor that tracks changes says which areas were written since a point in
time: QEMU's persistent dirty bitmaps (read through ``qemu-nbd -B`` and ``qemu-img map``),
VMware's changed block tracking (``QueryChangedDiskAreas``), Hyper-V's resilient change tracking.
Given those areas, ``oci-disk-delta push --changed-areas`` reads and hashes only them and takes
every other block's digest from the last import's manifest.

The file is JSON: a list of ``{"start": bytes, "length": bytes}`` (other keys ignored), or an
object whose ``changedArea`` is such a list (VMware's ``DiskChangeInfo``). Areas may overlap and
come in any order; each must lie within the disk.
"""

from __future__ import annotations

import json
from pathlib import Path

MAX_FILE_BYTES = 256 * 1024 * 1024  # a list of millions of areas; more is not a change list


class AreasError(ValueError):
    """The changed areas cannot be used: the reason."""


def read(path: Path) -> list[tuple[int, int]]:
    """``[(start, length)]`` from a changed-areas file; ``AreasError`` for anything else."""
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AreasError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if len(text) > MAX_FILE_BYTES:
        raise AreasError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        found = json.loads(text)
    except ValueError as exc:
        raise AreasError(f"{path} is not JSON ({exc})") from None
    if isinstance(found, dict):
        found = found.get("changedArea")
    if not isinstance(found, list):
        raise AreasError(f"{path} holds neither a list of areas nor an object with a changedArea list")
    areas = []
    for n, area in enumerate(found):
        start = area.get("start") if isinstance(area, dict) else None
        length = area.get("length") if isinstance(area, dict) else None
        if type(start) is not int or type(length) is not int or start < 0 or length < 0:
            raise AreasError(f"{path}: area {n} is not a start and a length in bytes (whole numbers, not negative): "
                             f"{json.dumps(area)[:200]}")
        if length:
            areas.append((start, length))
    return areas


def blocks(areas: list[tuple[int, int]], disk_bytes: int, block: int) -> list[tuple[int, int]]:
    """The ``[(first block, count)]`` the areas touch, merged and in order; ``AreasError`` for an area
    that ends past the disk (the list is of another disk, or of another size of it)."""
    spans = []
    for start, length in areas:
        if start + length > disk_bytes:
            raise AreasError(f"the area of {length} bytes at {start} ends past the disk's {disk_bytes} bytes")
        spans.append((start // block, -(-(start + length) // block)))
    spans.sort()
    merged: list[list[int]] = []
    for first, end in spans:
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([first, end])
    return [(first, end - first) for first, end in merged]
