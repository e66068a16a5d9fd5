"""Inspection on the worker after the write: the device must hold a disk, not another image format.

A raw upload whose content is a qcow2 (or any container) would otherwise land on the
volume as an image nobody can boot, and would be parsed as an image by whatever reads it
next. The head and tail of the written device are read on the worker and inspected
with the same format inspector as the upload.
"""

from __future__ import annotations

from ..worker_vm.commands import CommandRunner, read_range
from ..errors import ImageRejected
from .inspection import inspect


def check_not_nested(runner: CommandRunner, device: str, size: int) -> None:
    """Refuse a written device whose content is itself an image container (e.g. qcow2 in raw)."""
    try:
        found = inspect(lambda start, end: read_range(runner, device, start, end - start), size, None,
                        max_virtual_size=2**63)
    except ImageRejected as exc:
        raise ImageRejected("nested-image", f"the written disk is not a plain disk: {exc}") from None
    if found.format != "raw":
        raise ImageRejected("nested-image", f"the written disk is itself a {found.detected_as} image (a nested image)")


