"""LVM2 logical volumes found without activating anything: the on-disk format, read as bytes.

A physical volume (PV) carries a label in one of its first four sectors (``LABELONE``,
``LVM2 001``), then a ``pv_header``: the PV's uuid, its data area (where extents start)
and its metadata areas. A metadata area starts with an ``mda_header`` (magic
`` LVM2 x[5A%r0N*>``) whose first ``raw_locn`` points at the volume group's current
metadata: text in LVM's config syntax, kept in a ring buffer after the header, so it may
wrap to the buffer's start. Every structure is little-endian and checksummed with LVM's
CRC-32 (zlib's polynomial, seed ``0xf597a6cf``, no final inversion).

The metadata lists the VG's PVs and logical volumes (LVs); a segment of type ``striped``
with one stripe (a linear segment) maps ``extent_count`` extents of the LV onto the PV at
``pe_start + extent * extent_size`` (both in 512-byte sectors). An LV whose segments all
map, in order, onto one contiguous range of this PV is a byte range of the device, and
its filesystem can be checked like a partition's. Anything else (thin, RAID, mirror,
several stripes, extents on another PV, scattered extents) needs device-mapper to be
read, and is reported with the reason instead.

Nothing here writes, activates or asks the kernel about LVM: on a worker whose own VG
has the same name (``ocivolume`` on Oracle Linux), activating the imported disk's VG
would clash, and the local machines have no device-mapper at all.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable

SECTOR = 512
LABEL_SCAN_SECTORS = 4
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1
MAX_METADATA_BYTES = 16 * 1024 * 1024
MAX_LIST_ENTRIES = 64  # disk areas in a pv_header; real ones hold one or two

# Reads ``length`` bytes at ``offset`` from the PV's first byte.
Reader = Callable[[int, int], bytes]


class LvmError(Exception):
    """The PV's label or metadata cannot be read or makes no sense; the message says why."""


def crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """LVM's ``calc_crc``: CRC-32 without zlib's inversions around it."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


@dataclass(frozen=True)
class MetadataArea:
    offset: int  # bytes from the PV's start
    size: int


@dataclass(frozen=True)
class PhysicalVolumeLabel:
    uuid: str                 # 32 characters, as in the label (metadata writes it with dashes)
    device_size: int
    data_offset: int          # where the first extent starts, in bytes (pe_start)
    metadata_areas: tuple[MetadataArea, ...]


@dataclass(frozen=True)
class LogicalVolume:
    """An LV as this PV sees it: a byte range of the PV, or the reason it is not one."""

    vg: str
    name: str
    size: int                 # bytes
    offset: int | None        # bytes from the PV's start; None when it cannot be mapped
    reason: str | None = None  # why it cannot be mapped

    @property
    def mapped(self) -> bool:
        return self.offset is not None


@dataclass(frozen=True)
class PhysicalVolume:
    label: PhysicalVolumeLabel
    vg: str
    seqno: int
    logical_volumes: tuple[LogicalVolume, ...]


# -- the label and headers --------------------------------------------------------------------

def read_label(head: bytes) -> PhysicalVolumeLabel:
    """Find and decode the PV label in the first four sectors (``head`` holds at least those)."""
    for sector in range(LABEL_SCAN_SECTORS):
        block = head[sector * SECTOR:(sector + 1) * SECTOR]
        if len(block) < SECTOR or block[:8] != LABEL_ID:
            continue
        sector_xl, crc_xl, offset_xl = struct.unpack_from("<QII", block, 8)
        if block[24:32] != LABEL_TYPE:
            raise LvmError(f"label type {block[24:32]!r} is not LVM2 001")
        if sector_xl != sector:
            raise LvmError(f"label in sector {sector} says it is in sector {sector_xl}")
        if crc(block[20:]) != crc_xl:
            raise LvmError("label checksum mismatch")
        if not 32 <= offset_xl <= SECTOR - 40:
            raise LvmError(f"pv_header offset {offset_xl} out of range")
        return _pv_header(block, offset_xl)
    raise LvmError("no LVM2 label in the first four sectors")


def _pv_header(block: bytes, at: int) -> PhysicalVolumeLabel:
    uuid = block[at:at + 32].decode("ascii", "replace")
    (device_size,) = struct.unpack_from("<Q", block, at + 32)
    pos = at + 40
    lists: list[list[tuple[int, int]]] = []
    for _ in range(2):  # data areas, then metadata areas; each list ends with (0, 0)
        entries = []
        while True:
            if pos + 16 > SECTOR or len(entries) > MAX_LIST_ENTRIES:
                raise LvmError("pv_header area list does not end within its sector")
            offset, size = struct.unpack_from("<QQ", block, pos)
            pos += 16
            if offset == 0:
                break
            entries.append((offset, size))
        lists.append(entries)
    data, metadata = lists
    if not data:
        raise LvmError("pv_header lists no data area")
    return PhysicalVolumeLabel(uuid, device_size, data[0][0],
                               tuple(MetadataArea(offset, size) for offset, size in metadata))


@dataclass(frozen=True)
class _RawLocation:
    offset: int
    size: int
    checksum: int
    flags: int


def _mda_header(block: bytes, area: MetadataArea) -> _RawLocation | None:
    """The committed metadata's location in ``area`` (None when the area holds none)."""
    if len(block) < MDA_HEADER_SIZE:
        raise LvmError("metadata area header is cut short")
    (checksum,) = struct.unpack_from("<I", block, 0)
    if block[4:20] != MDA_MAGIC:
        raise LvmError(f"metadata area at {area.offset} has no LVM2 magic")
    if crc(block[4:MDA_HEADER_SIZE]) != checksum:
        raise LvmError(f"metadata area header at {area.offset}: checksum mismatch")
    version, start, size = struct.unpack_from("<IQQ", block, 20)
    if version != 1:
        raise LvmError(f"metadata area header version {version} is not 1")
    if start != area.offset:
        raise LvmError(f"metadata area header says it starts at {start}, not {area.offset}")
    if size != area.size:
        raise LvmError(f"metadata area header says its size is {size}, the label {area.size}")
    offset, length, text_crc, flags = struct.unpack_from("<QQII", block, 40)  # slot 0: committed
    if offset == 0 and length == 0:
        return None
    if not MDA_HEADER_SIZE <= offset < size or not 0 < length <= min(size - MDA_HEADER_SIZE, MAX_METADATA_BYTES):
        raise LvmError(f"metadata location {offset}+{length} lies outside its {size}-byte area")
    return _RawLocation(offset, length, text_crc, flags)


def read_metadata_text(read: Reader, area: MetadataArea) -> str | None:
    """The committed metadata text of one metadata area (None if it holds none or is ignored)."""
    location = _mda_header(read(area.offset, MDA_HEADER_SIZE), area)
    if location is None or location.flags & RAW_LOCN_IGNORED:
        return None
    # The text sits in a ring buffer between the header and the area's end; it may wrap.
    first = min(location.size, area.size - location.offset)
    text = read(area.offset + location.offset, first)
    if first < location.size:
        text += read(area.offset + MDA_HEADER_SIZE, location.size - first)
    if len(text) != location.size:
        raise LvmError("metadata text is cut short")
    if crc(text) != location.checksum:
        raise LvmError(f"metadata text in the area at {area.offset}: checksum mismatch")
    return text.rstrip(b"\0").decode("utf-8", "replace")


# -- the metadata text ---------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<space>\s+) | (?P<comment>\#[^\n]*) |
    (?P<string>"(?:[^"\\]|\\.)*") |
    (?P<punct>[{}\[\]=,]) |
    (?P<word>[^\s#{}\[\]=,"]+)
""", re.VERBOSE | re.DOTALL)
MAX_DEPTH = 16


def parse_config(text: str) -> dict[str, Any]:
    """Parse LVM's config syntax: ``name { ... }`` sections, ``key = value`` with numbers,
    strings and ``[lists]``, ``#`` comments. Sections become dicts (in file order)."""
    tokens = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise LvmError(f"metadata: cannot read {text[pos:pos + 20]!r}")
        pos = match.end()
        kind = match.lastgroup
        if kind in ("space", "comment"):
            continue
        tokens.append((kind, match.group()))
    parser = _Parser(tokens)
    root = parser.section(depth=0, closing=False)
    return root


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens, self.pos = tokens, 0

    def _next(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise LvmError("metadata ends unexpectedly")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def _expect(self, value: str) -> None:
        kind, text = self._next()
        if text != value or kind != "punct":
            raise LvmError(f"metadata: expected {value!r}, found {text!r}")

    def section(self, depth: int, closing: bool) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise LvmError("metadata nests too deeply")
        found: dict[str, Any] = {}
        while True:
            if self.pos >= len(self.tokens):
                if closing:
                    raise LvmError("metadata: a section is not closed")
                return found
            kind, text = self._next()
            if closing and (kind, text) == ("punct", "}"):
                return found
            if kind != "word":
                raise LvmError(f"metadata: expected a name, found {text!r}")
            kind2, text2 = self._next()
            if (kind2, text2) == ("punct", "{"):
                found[text] = self.section(depth + 1, closing=True)
            elif (kind2, text2) == ("punct", "="):
                found[text] = self.value()
            else:
                raise LvmError(f"metadata: expected '=' or '{{' after {text!r}, found {text2!r}")

    def value(self) -> Any:
        kind, text = self._next()
        if (kind, text) == ("punct", "["):
            items: list[Any] = []
            while True:
                kind, text = self._next()
                if (kind, text) == ("punct", "]"):
                    return items
                if (kind, text) == ("punct", ","):
                    continue
                items.append(self._scalar(kind, text))
        return self._scalar(kind, text)

    @staticmethod
    def _scalar(kind: str, text: str) -> Any:
        if kind == "string":
            return re.sub(r"\\(.)", r"\1", text[1:-1], flags=re.DOTALL)
        if kind == "word":
            for convert in (int, float):
                try:
                    return convert(text)
                except ValueError:
                    pass
            return text
        raise LvmError(f"metadata: unexpected {text!r} where a value belongs")


# -- from metadata to byte ranges -----------------------------------------------------------------

def _int(section: dict[str, Any], key: str, where: str) -> int:
    value = section.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LvmError(f"metadata: {where} has no valid {key}")
    return value


def volume_group(metadata: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The one VG section of a PV's metadata (the other top-level entries are comments on it)."""
    sections = [(name, value) for name, value in metadata.items() if isinstance(value, dict)]
    if len(sections) != 1:
        raise LvmError(f"metadata holds {len(sections)} volume groups, not one")
    return sections[0]


def map_logical_volumes(metadata: dict[str, Any], pv_uuid: str, pv_size: int) -> tuple[str, list[LogicalVolume]]:
    """The VG's name and its visible LVs as byte ranges of the PV whose uuid is ``pv_uuid``."""
    vg_name, vg = volume_group(metadata)
    extent = _int(vg, "extent_size", f"VG {vg_name}") * SECTOR
    if extent == 0:
        raise LvmError(f"metadata: VG {vg_name} has extent_size 0")
    pvs = vg.get("physical_volumes") or {}
    this = None
    for key, pv in pvs.items():
        if isinstance(pv, dict) and str(pv.get("id", "")).replace("-", "") == pv_uuid:
            this = key
    if this is None:
        raise LvmError(f"this PV ({pv_uuid}) is not among VG {vg_name}'s physical volumes")
    pe_start = _int(pvs[this], "pe_start", f"PV {this}") * SECTOR
    pe_count = _int(pvs[this], "pe_count", f"PV {this}")
    lvs = vg.get("logical_volumes") or {}
    cow_stores = {seg.get("cow_store"): seg.get("origin") for lv in lvs.values() if isinstance(lv, dict)
                  for seg in _segments(lv) if seg.get("type") == "snapshot"}
    found = []
    for name, lv in lvs.items():
        if not isinstance(lv, dict) or "VISIBLE" not in (lv.get("status") or []):
            continue
        segments = _segments(lv)
        size = sum(_int(seg, "extent_count", f"LV {name}") for seg in segments) * extent
        if name in cow_stores:
            reason = f"snapshot of {cow_stores[name]} (a copy-on-write store, not a filesystem)"
        else:
            reason = _unmappable(segments, this, pe_count, f"LV {name}")
        if reason is not None:
            found.append(LogicalVolume(vg_name, name, size, None, reason))
            continue
        first_pe = min(segments, key=lambda seg: seg["start_extent"])["stripes"][1]
        offset = pe_start + first_pe * extent
        if offset + size > pv_size:
            found.append(LogicalVolume(vg_name, name, size, None,
                                       f"its extents end at byte {offset + size}, beyond the PV's {pv_size}"))
            continue
        found.append(LogicalVolume(vg_name, name, size, offset))
    return vg_name, found


def _segments(lv: dict[str, Any]) -> list[dict[str, Any]]:
    return [value for key, value in lv.items() if key.startswith("segment") and isinstance(value, dict)]


def _unmappable(segments: list[dict[str, Any]], this_pv: str, pe_count: int, where: str) -> str | None:
    """Why these segments are not one contiguous range of ``this_pv``; None if they are."""
    if not segments:
        return "it has no segments"
    next_extent, next_pe = 0, None
    for seg in sorted(segments, key=lambda s: _int(s, "start_extent", where)):
        kind = seg.get("type")
        if kind == "thin":
            return f"thin volume in pool {seg.get('thin_pool')}: only device-mapper can read it"
        if kind not in ("striped", "linear"):
            return f"{kind} volume: only device-mapper can read it"
        stripes = seg.get("stripes") or []
        if seg.get("stripe_count", 1) != 1 or len(stripes) != 2:
            return f"striped over {seg.get('stripe_count')} stripes: only device-mapper can read it"
        pv, pe = stripes
        start, count = _int(seg, "start_extent", where), _int(seg, "extent_count", where)
        if not isinstance(pe, int) or pe < 0:
            raise LvmError(f"metadata: {where} has an invalid stripe start")
        if pv != this_pv:
            return f"its extents are (partly) on physical volume {pv}, which is not this one"
        if start != next_extent or (next_pe is not None and pe != next_pe):
            return f"its {len(segments)} segments are not contiguous on the physical volume"
        if pe + count > pe_count:
            return f"its extents {pe}-{pe + count - 1} lie beyond the PV's {pe_count} extents"
        next_extent, next_pe = start + count, pe + count
    return None


def read_physical_volume(read: Reader, pv_size: int) -> PhysicalVolume:
    """Read the PV at the start of ``read``'s range: label, newest metadata, its LVs mapped."""
    label = read_label(read(0, LABEL_SCAN_SECTORS * SECTOR))
    best: tuple[int, str, dict[str, Any]] | None = None
    errors = []
    for area in label.metadata_areas:
        if area.offset + area.size > pv_size or area.size <= MDA_HEADER_SIZE:
            errors.append(f"metadata area {area.offset}+{area.size} does not fit the PV")
            continue
        try:
            text = read_metadata_text(read, area)
            if text is None:
                continue
            metadata = parse_config(text)
            _, vg = volume_group(metadata)
            seqno = _int(vg, "seqno", "VG")
        except LvmError as exc:
            errors.append(str(exc))
            continue
        if best is None or seqno > best[0]:
            best = (seqno, text, metadata)
    if best is None:
        if errors:
            raise LvmError("; ".join(errors))
        raise LvmError("the PV holds no metadata (its VG is described on another PV)")
    seqno, _, metadata = best
    vg_name, lvs = map_logical_volumes(metadata, label.uuid, pv_size)
    return PhysicalVolume(label, vg_name, seqno, tuple(lvs))
