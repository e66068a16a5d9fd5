"""Learn an image's format and virtual size from its first and last bytes, and refuse the
dangerous ones, before anything is created for it.

The inspection uses oslo.utils' ``format_inspector`` (the inspector OpenStack hardened
after CVE-2022-47951 and CVE-2024-32498). It reads only the head of the object and its
tail (Range GETs), presenting the inspectors a stream whose unread middle is skipped:
regions that live there stay incomplete, and an inspector that cannot complete counts
as not matching, so the answer errs on the side of refusal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from oslo_utils.imageutils import format_inspector as fi

from .contract import FORMAT_NAMES, InvalidRequest
from .errors import ImageRejected

log = logging.getLogger(__name__)

HEAD_BYTES = 4 * 1024 * 1024
TAIL_BYTES = 64 * 1024
CHUNK = 64 * 1024

# format_inspector names -> qemu-img format names
INSPECTOR_TO_QEMU = {"qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi",
                     "raw": "raw", "gpt": "raw"}

ReadRange = Callable[[int, int], bytes]  # (start, end inclusive) -> bytes


@dataclass(frozen=True)
class Inspection:
    format: str          # qemu-img format name
    virtual_size: int    # bytes
    detected_as: str     # format_inspector's name (e.g. "gpt" for a raw disk with a GPT)


def claimed_format(object_name: str, metadata_format: str | None = None) -> str | None:
    """The format an upload claims: ``opc-meta-format`` if set, else the name's suffix."""
    if metadata_format:
        name = FORMAT_NAMES.get(metadata_format.strip().lower())
        if name is None:
            raise InvalidRequest("invalid-format", f"metadata format {metadata_format!r} is not one of: "
                                 f"{', '.join(sorted(FORMAT_NAMES))}")
        return name
    suffix = object_name.rsplit(".", 1)[-1].lower() if "." in object_name else ""
    return FORMAT_NAMES.get(suffix)


def _feed(inspectors: list[fi.FileInspector], errored: set[fi.FileInspector], data: bytes) -> None:
    for start in range(0, len(data), CHUNK):
        chunk = data[start:start + CHUNK]
        for inspector in inspectors:
            if inspector in errored:
                continue
            try:
                inspector.eat_chunk(chunk)
            except Exception as exc:  # an inspector that cannot parse the data is not a match
                log.debug("%s inspector excluded: %s", inspector.NAME, exc)
                errored.add(inspector)


def inspect(read_range: ReadRange, size: int, claimed: str | None, max_virtual_size: int) -> Inspection:
    """Detect, check and size the image whose bytes ``read_range`` serves."""
    if size == 0:
        raise ImageRejected("empty", "the object is empty (0 bytes)")
    head = read_range(0, min(size, HEAD_BYTES) - 1)
    tail_start = max(len(head), size - TAIL_BYTES)
    tail = read_range(tail_start, size - 1) if tail_start < size else b""

    inspectors = [cls() for cls in fi.ALL_FORMATS.values()]
    errored: set[fi.FileInspector] = set()
    _feed(inspectors, errored, head)
    if tail:
        for inspector in inspectors:
            inspector._total_count = tail_start  # skip the unread middle (see module docstring)
        _feed(inspectors, errored, tail)
    for inspector in inspectors:
        inspector.finish()

    candidates = [i for i in inspectors if i.NAME != "raw" and i not in errored]
    matches = [i for i in candidates if i.complete and i.format_match]
    if len(matches) > 1:
        raise ImageRejected("multiple-formats", "more than one format detected: " + ", ".join(sorted(i.NAME for i in matches)))
    if not matches:
        unsure = [i.NAME for i in candidates if not i.complete and _signature_seen(i, head)]
        if unsure:
            raise ImageRejected("incomplete-header", f"could not fully inspect the {unsure[0]} image from its header")
        inspector = next(i for i in inspectors if i.NAME == "raw")
    else:
        inspector = matches[0]

    name = inspector.NAME
    if name == "qed":
        raise ImageRejected("unsupported-format", "QED images are not accepted")
    if name == "luks":
        raise ImageRejected("encrypted", "luks images are not accepted: an encrypted disk cannot be checked")
    if name not in INSPECTOR_TO_QEMU:
        raise ImageRejected("unsupported-format", f"{name} images are not accepted")
    fmt = INSPECTOR_TO_QEMU[name]
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        # oslo names each failed check; the first one's name is the refusal's code.
        reasons = "; ".join(f"{check}: {failure}" for check, failure in exc.failures.items())
        raise ImageRejected(next(iter(exc.failures), "safety-check"),
                            f"{name} image failed safety checks: {reasons}") from None
    except fi.ImageFormatError as exc:
        raise ImageRejected("unreadable-header", f"{name} image could not be checked: {exc}") from None

    if claimed is not None and claimed != fmt:
        raise ImageRejected("claimed-format-mismatch", f"the upload claims {claimed} but the content is {fmt}"
                            + (f" ({name})" if name != fmt else ""))
    virtual_size = size if fmt == "raw" else int(inspector.virtual_size)
    if virtual_size <= 0:
        raise ImageRejected("zero-virtual-size", f"{name} image reports a virtual size of {virtual_size} bytes")
    if virtual_size > max_virtual_size:
        raise ImageRejected("too-large", f"virtual size {virtual_size} bytes exceeds the maximum of {max_virtual_size} bytes")
    return Inspection(fmt, virtual_size, name)


def _signature_seen(inspector: fi.FileInspector, head: bytes) -> bool:
    """Whether the head starts like this format, although the inspector could not complete."""
    magic = {"qcow2": b"QFI\xfb", "vmdk": b"KDMV", "vhdx": b"vhdxfile", "vhd": b"conectix", "qed": b"QED\x00"}
    return head.startswith(magic.get(inspector.NAME, b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"))
