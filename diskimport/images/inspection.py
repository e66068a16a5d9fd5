"""Learn an image's format and virtual size from its first and last bytes, and refuse the
dangerous ones, before anything is created for it.

The inspection uses oslo.utils' ``format_inspector`` (the inspector OpenStack hardened
after CVE-2022-47951 and CVE-2024-32498). It reads only the head of the object and its
tail (Range GETs), presenting the inspectors a stream whose unread middle is skipped:
regions that live there stay incomplete, and an inspector that cannot complete counts
as not matching, so the answer errs on the side of refusal.

Fixed VHDs, which oslo does not see (its VHD inspector reads the start of the file), are
found here by their footer. A fixed VHD is the raw disk followed by a 512-byte footer:
the ``conectix`` cookie, big-endian fields, a checksum. An object whose last 512 bytes
start with the cookie and whose head is not a VHD is read as a fixed VHD *whatever it
claims*, and the footer must pass every check below, else the object is refused:

- ``vhd-footer-checksum``: the checksum (one's complement of the footer's byte sum with
  the checksum field zero) is right;
- ``vhd-differencing`` / ``vhd-not-fixed``: the disk type is 2 (fixed) and the data
  offset is all ones (the spec's 0xFFFFFFFF, or the 0xFFFFFFFFFFFFFFFF every tool writes);
  a differencing disk has a parent that is not here, and a dynamic footer at the end
  without its copy at the start is a dynamic VHD whose head is gone;
- ``vhd-size-mismatch``: the current size is a whole number of sectors and exactly the
  object's size less the footer. Tools write no padding (qemu-img, Hyper-V, Azure, whose
  page blobs hold the VHD as it is): a fixed VHD that is longer or shorter than its footer
  says was cut or appended to, and is refused rather than guessed at.

Why the cookie alone makes an object a VHD candidate: a raw disk whose last sector begins
with ``conectix`` by chance would need those 8 bytes at that exact place (a GPT disk ends
with its backup header; a file inside a filesystem cannot end there unless the filesystem
uses 512-byte blocks), and one that also carries a valid checksum, the fixed type and a
current size describing everything before it *is* a fixed VHD. Writing such an object
as raw would leave a volume whose last sector VHD readers (and the nested-image check on
the written disk, :mod:`diskimport.images.nested`) take for a footer. A fixed VHD uploaded as raw
(``.raw``, ``.img``) is refused like any other format claimed as raw
(``claimed-format-mismatch``); one with no telling suffix, or claimed ``vpc``, is accepted.

The footer's current size is the virtual size. The disk is the object's first ``current
size`` bytes, and every check of a raw upload runs on that range (its GPT/MBR, and that it
is no image itself: a fixed VHD whose data is a qcow2 is refused as ``nested-image``).

How qemu-img reads it: with the ``raw`` driver over bytes [0, current size) of the object
(``InspectedImage.driver``), not with the ``vpc`` driver. qemu's ``vpc`` driver sizes a
VHD by its CHS geometry or by its current size depending on the creator application
(``win ``, ``d2v ``, ``qem2``: current size; ``vpc ``, ``qemu``: geometry, which for a disk
made by Hyper-V or Azure is smaller than the current size) and refuses disks above
2040 GiB, which Azure's fixed VHDs may be. ``force_size_calc=current_size`` fixes the first
but not the second; a raw window is exact by construction, is the same node a raw upload
is written through (:func:`diskimport.worker_vm.slices.format_node`), and qemu refuses to open it if
it reaches past the object's end. The second opinion (:func:`diskimport.worker_vm.transfer.second_opinion`)
opens that window and, up to qemu's 2040 GiB, also has the ``vpc`` driver read the footer
with ``force_size_calc=current_size``: both must report the current size.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from oslo_utils.imageutils import format_inspector as fi

from .. import delta
from ..contract import FORMAT_NAMES, InvalidRequest
from ..errors import ImageRejected

log = logging.getLogger(__name__)

HEAD_BYTES = 4 * 1024 * 1024
TAIL_BYTES = 64 * 1024
CHUNK = 64 * 1024

# format_inspector names -> qemu-img format names
INSPECTOR_TO_QEMU = {"qcow2": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vhdx": "vhdx", "vdi": "vdi",
                     "raw": "raw", "gpt": "raw"}
RAW_NAMES = ("raw", "gpt")  # what a plain disk is detected as

ReadRange = Callable[[int, int], bytes]  # bytes [start, end) of the object


@dataclass(frozen=True)
class Inspection:
    format: str          # qemu-img format name
    virtual_size: int    # bytes
    detected_as: str     # format_inspector's name (e.g. "gpt" for a raw disk with a GPT), or "vhd-fixed"
    driver: str | None = None  # the qemu driver that reads the disk, when not ``format``'s (see module docstring)
    delta_base: str | None = None  # a delta upload: the import its backing file names (diskimport.delta)


@dataclass(frozen=True)
class _Read:
    """What the inspection read of an object of ``size`` bytes: [0, len(head)) and [tail_start, size)."""

    head: bytes
    tail: bytes
    tail_start: int
    size: int

    def last(self, count: int) -> bytes:
        """The object's last ``count`` bytes (the tail reaches back to the head when the two are short)."""
        if self.size < count:
            return b""
        return (self.tail if self.tail_start <= self.size - count else self.head + self.tail)[-count:]

    def first(self, count: int) -> "_Read":
        """The same reading of the object's first ``count`` bytes only."""
        head = self.head[:count]
        if self.tail_start >= count:
            return _Read(head, b"", len(head), count)
        return _Read(head, self.tail[:count - self.tail_start], self.tail_start, count)


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


def inspect(read_range: ReadRange, size: int, claimed: str | None, max_virtual_size: int,
            allow_delta: bool = False) -> Inspection:
    """Detect, check and size the image whose bytes ``read_range`` serves.

    With ``allow_delta``, a qcow2 whose only fault is a backing file named ``oci-import:<import
    id>`` is a delta upload (:mod:`diskimport.delta`): accepted, the import named in ``delta_base``.
    Every other backing file is refused (``backing_file``), as without it.
    """
    if size == 0:
        raise ImageRejected("empty", "the object is empty (0 bytes)")
    head = read_range(0, min(size, HEAD_BYTES))
    tail_start = max(len(head), size - TAIL_BYTES)
    tail = read_range(tail_start, size) if tail_start < size else b""
    read = _Read(head, tail, tail_start, size)
    footer = VhdFooter.parse(read.last(VhdFooter.SIZE))
    if footer is not None and not read.head.startswith(VhdFooter.COOKIE):
        return _fixed_vhd(read, footer, claimed, max_virtual_size)
    return _inspect_image(read, claimed, max_virtual_size, allow_delta)


def _inspect_image(read: _Read, claimed: str | None, max_virtual_size: int, allow_delta: bool = False) -> Inspection:
    """The format oslo's inspectors find in ``read``, checked and sized."""
    inspector = _detect(read)
    name = inspector.NAME
    fmt = _accepted_format(name)
    delta_base = _delta_base(inspector, read.head) if allow_delta else None
    if delta_base is None:
        _safety_check(inspector)
    if name == "vhd":
        _check_not_differencing(VhdFooter.parse(read.head[:VhdFooter.SIZE]))
    _check_claimed(claimed, fmt, name)
    virtual_size = read.size if fmt == "raw" else int(inspector.virtual_size)
    _check_virtual_size(virtual_size, name, max_virtual_size)
    return Inspection(fmt, virtual_size, name, delta_base=delta_base)


def _delta_base(inspector: fi.FileInspector, head: bytes) -> str | None:
    """The import a delta upload's backing file names, when that name is its only fault
    (oslo's every other check still passes); None otherwise."""
    if inspector.NAME != "qcow2" or len(head) < 20:
        return None
    offset, length = struct.unpack(">QI", head[8:20])
    if not 0 < length <= 1023 or offset + length > len(head):
        return None
    ref = delta.base_import(head[offset:offset + length].decode("ascii", "replace"))
    if ref is None:
        return None
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        return ref if set(exc.failures) == {"backing_file"} else None
    except fi.ImageFormatError:
        return None
    return None


def _detect(read: _Read) -> fi.FileInspector:
    """The one inspector whose format ``read`` holds (raw's when none); refuse ambiguous and partial headers."""
    inspectors = [cls() for cls in fi.ALL_FORMATS.values()]
    errored: set[fi.FileInspector] = set()
    _feed(inspectors, errored, read.head)
    if read.tail:
        for inspector in inspectors:
            inspector._total_count = read.tail_start  # skip the unread middle (see module docstring)
        _feed(inspectors, errored, read.tail)
    for inspector in inspectors:
        inspector.finish()

    candidates = [i for i in inspectors if i.NAME != "raw" and i not in errored]
    matches = [i for i in candidates if i.complete and i.format_match]
    if len(matches) > 1:
        raise ImageRejected("multiple-formats", "more than one format detected: " + ", ".join(sorted(i.NAME for i in matches)))
    if not matches:
        unsure = [i.NAME for i in candidates if not i.complete and _signature_seen(i, read.head)]
        if unsure:
            raise ImageRejected("incomplete-header", f"could not fully inspect the {unsure[0]} image from its header")
        return next(i for i in inspectors if i.NAME == "raw")
    return matches[0]


def _accepted_format(name: str) -> str:
    """The qemu-img format of an inspector's format name; refuse the formats not accepted."""
    if name == "qed":
        raise ImageRejected("unsupported-format", "QED images are not accepted")
    if name == "luks":
        raise ImageRejected("encrypted", "luks images are not accepted: an encrypted disk cannot be checked")
    if name not in INSPECTOR_TO_QEMU:
        raise ImageRejected("unsupported-format", f"{name} images are not accepted")
    return INSPECTOR_TO_QEMU[name]


def _safety_check(inspector: fi.FileInspector) -> None:
    try:
        inspector.safety_check()
    except fi.SafetyCheckFailed as exc:
        # oslo names each failed check; the first one's name is the refusal's code.
        reasons = "; ".join(f"{check}: {failure}" for check, failure in exc.failures.items())
        raise ImageRejected(next(iter(exc.failures), "safety-check"),
                            f"{inspector.NAME} image failed safety checks: {reasons}") from None
    except fi.ImageFormatError as exc:
        raise ImageRejected("unreadable-header", f"{inspector.NAME} image could not be checked: {exc}") from None


def _check_claimed(claimed: str | None, fmt: str, name: str) -> None:
    if claimed is not None and claimed != fmt:
        raise ImageRejected("claimed-format-mismatch", f"the upload claims {claimed} but the content is {fmt}"
                            + (f" ({name})" if name != fmt else ""))


def _check_virtual_size(virtual_size: int, name: str, max_virtual_size: int) -> None:
    if virtual_size <= 0:
        raise ImageRejected("zero-virtual-size", f"{name} image reports a virtual size of {virtual_size} bytes")
    if virtual_size > max_virtual_size:
        raise ImageRejected("too-large", f"virtual size {virtual_size} bytes exceeds the maximum of {max_virtual_size} bytes")


def _signature_seen(inspector: fi.FileInspector, head: bytes) -> bool:
    """Whether the head starts like this format, although the inspector could not complete."""
    magic = {"qcow2": b"QFI\xfb", "vmdk": b"KDMV", "vhdx": b"vhdxfile", "vhd": b"conectix", "qed": b"QED\x00"}
    return head.startswith(magic.get(inspector.NAME, b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"))


# -- fixed VHD ------------------------------------------------------------------------------

@dataclass(frozen=True)
class VhdFooter:
    """The 512-byte VHD footer (big-endian): what the checks and the sizing read of it."""

    COOKIE = b"conectix"
    SIZE = 512
    FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
    FIXED_DATA_OFFSETS = (0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF)  # what tools write; the spec says 0xFFFFFFFF

    data_offset: int
    creator: bytes       # e.g. b"win " (Hyper-V, Azure), b"qemu", b"qem2", b"vpc ", b"d2v "
    current_size: int
    cylinders: int
    heads: int
    sectors: int
    disk_type: int
    checksum: int
    computed_checksum: int

    @classmethod
    def parse(cls, sector: bytes) -> "VhdFooter | None":
        """The footer in ``sector``, or ``None`` when it does not start with the cookie."""
        if len(sector) != cls.SIZE or not sector.startswith(cls.COOKIE):
            return None
        data_offset, = struct.unpack_from(">Q", sector, 16)
        current_size, cylinders, heads, sectors, disk_type, checksum = struct.unpack_from(">QHBBII", sector, 48)
        computed = ~sum(sector[:64] + bytes(4) + sector[68:]) & 0xFFFFFFFF
        return cls(data_offset, sector[28:32], current_size, cylinders, heads, sectors, disk_type, checksum, computed)

    @property
    def geometry_size(self) -> int:
        """The size CHS geometry describes: what qemu's ``vpc`` driver uses for some creators."""
        return self.cylinders * self.heads * self.sectors * 512


def _fixed_vhd(read: _Read, footer: VhdFooter, claimed: str | None, max_virtual_size: int) -> Inspection:
    """A fixed VHD, found by its footer: every check on the footer, then on its data as on a raw disk."""
    _check_footer_checksum(footer)
    _check_not_differencing(footer)
    _check_fixed(footer)
    data_size = _check_footer_size(footer, read.size)
    _check_claimed(claimed, "vpc", "fixed VHD")
    _check_virtual_size(data_size, "fixed VHD", max_virtual_size)
    _check_plain_disk(read.first(data_size))
    return Inspection("vpc", data_size, "vhd-fixed", driver="raw")


def _check_footer_checksum(footer: VhdFooter) -> None:
    if footer.checksum != footer.computed_checksum:
        raise ImageRejected("vhd-footer-checksum", f"the VHD footer at the end of the object has checksum "
                            f"{footer.checksum:#010x}, its bytes sum to {footer.computed_checksum:#010x}")


def _check_not_differencing(footer: VhdFooter | None) -> None:
    if footer is not None and footer.disk_type == VhdFooter.DIFFERENCING:
        raise ImageRejected("vhd-differencing", "a differencing VHD is not accepted: it holds only the changes "
                            "to a parent disk that is not uploaded")


def _check_fixed(footer: VhdFooter) -> None:
    if footer.disk_type == VhdFooter.DYNAMIC:
        raise ImageRejected("vhd-not-fixed", "the VHD footer at the end describes a dynamic disk, but the object "
                            "does not start with the footer's copy (a dynamic VHD whose head is missing)")
    if footer.disk_type != VhdFooter.FIXED:
        raise ImageRejected("vhd-not-fixed", f"the VHD footer at the end has disk type {footer.disk_type}, "
                            "not 2 (fixed)")
    if footer.data_offset not in VhdFooter.FIXED_DATA_OFFSETS:
        raise ImageRejected("vhd-not-fixed", f"the fixed VHD footer points at a next structure "
                            f"({footer.data_offset:#x}); a fixed disk has none")


def _check_footer_size(footer: VhdFooter, size: int) -> int:
    """The data's size: the footer's current size, which must be all of the object but the footer."""
    data_size = size - VhdFooter.SIZE
    if footer.current_size != data_size or footer.current_size % 512:
        raise ImageRejected("vhd-size-mismatch", f"the fixed VHD footer says the disk is {footer.current_size} "
                            f"bytes, but the object holds {data_size} bytes before its footer")
    return data_size


def _check_plain_disk(data: _Read) -> None:
    """The fixed VHD's data gets a raw upload's inspection, and must be a plain disk, not another image."""
    inner = VhdFooter.parse(data.last(VhdFooter.SIZE))
    if inner is not None:
        raise ImageRejected("nested-image", "the fixed VHD's data ends with another VHD footer (a nested image)")
    inspector = _detect(data)
    if inspector.NAME not in RAW_NAMES:
        _accepted_format(inspector.NAME)  # QED, LUKS, ISO: refused as they are when uploaded alone
        raise ImageRejected("nested-image", f"the fixed VHD's data is itself a {inspector.NAME} image (a nested image)")
    _safety_check(inspector)  # a GPT's or MBR's own checks
