"""Inspection on the worker after the write: the device must hold a disk, not another image format.

A raw upload whose content is a qcow2 (or any container) would otherwise land on the
volume as an image nobody can boot, and would be parsed as an image by whatever reads it
next. The head and tail of the written device are read on the worker and inspected
with the same format inspector as the upload.
"""

from __future__ import annotations

from .commands import CommandRunner
from .errors import ImageRejected
from .inspection import inspect


def _read(runner: CommandRunner, device: str, start: int, length: int) -> bytes:
    return runner.read_bytes(["dd", f"if={device}", "iflag=skip_bytes,count_bytes", f"skip={start}",
                              f"count={length}", "bs=65536", "status=none"])


def check_not_nested(runner: CommandRunner, device: str, size: int) -> None:
    """Refuse a written device whose content is itself an image container (e.g. qcow2 in raw)."""
    def read_range(start: int, end: int) -> bytes:
        return _read(runner, device, start, end - start + 1)

    try:
        found = inspect(read_range, size, None, max_virtual_size=2**63)
    except ImageRejected as exc:
        raise ImageRejected("nested-image", f"the written disk is not a plain disk: {exc}") from None
    if found.format != "raw":
        raise ImageRejected("nested-image", f"the written disk is itself a {found.detected_as} image (a nested image)")


