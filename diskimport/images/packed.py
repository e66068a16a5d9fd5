"""Compressed and packed uploads: find the disk image inside, check it and size it, from the
object's head and tail, before anything is created.

An object named ``disk.raw.gz``, ``web.img.xz``, ``db.qcow2.zst`` or ``old.vhd.bz2`` is one
image compressed; ``vm.tar``, ``vm.tar.gz`` or ``vm.tgz`` is a tar holding exactly one image
(:func:`diskimport.contract.split_name`). The inspection's head (the object's first 4 MiB)
is decompressed here, at most :data:`INNER_HEAD_BYTES` of output whatever the ratio, and the
inner image's head gets every check a plain upload gets (:mod:`diskimport.images.inspection`).

Sizes. The volume is sized from the inner virtual size: a format's own header, or for raw
data the container's record of the decompressed length, which is also what the worker's
staging copy holds (:mod:`diskimport.agent.stream`):

- xz: the index at the end of each stream (the stream footer's backward size points at it)
  lists every block's uncompressed size; exact;
- zstd: the first frame's content size, when the compressor wrote it (``zstd FILE`` does,
  ``zstd < FILE`` does not); a frame that ends within the head with more data after it
  makes the size unknown (several frames);
- gzip: ISIZE, the last 4 bytes, is the length modulo 2^32; trusted only when the object is
  under 4 GiB and the value is consistent (a whole number of sectors, not below the head's
  output, not below the compressed size less deflate's overhead). A wrong guess cannot
  pass: the worker stops when the output runs past it; an ``opc-meta-virtual-size`` equal to
  ISIZE modulo 4 GiB wins over it;
- bzip2: no record;
- tar: the member's size in its header (ustar, pax, GNU long names); its data is a
  512-byte aligned byte range of the object, fetched alone with no decompression.

When the whole object fits in the head and decompresses to its end, its length is exact.
``opc-meta-virtual-size`` (:class:`~diskimport.contract.ImportOptions.virtual_size`) gives
the size when the container does not; when both are known they must agree
(``virtual-size-mismatch``). When neither is, the import is refused
(``virtual-size-unknown``). Other refusals: ``decompression-failed`` (not the named
compression, or corrupt), ``decompression-bomb`` (more data than declared or than the
maximum virtual size), ``tar-not-one-image`` (no regular file, or more than one, or links,
devices or sparse members).
"""

from __future__ import annotations

import bz2
import io
import lzma
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

from . import inspection
from ..contract import FORMAT_NAMES, split_name
from ..errors import ImageRejected
from .inspection import HEAD_BYTES, TAIL_BYTES, Inspection, ReadRange

INNER_HEAD_BYTES = HEAD_BYTES
TAR_HEADERS_BYTES = 1024 * 1024   # room for the headers before a .tar.gz's member
GIB4 = 1 << 32
BLOCK = 512


@dataclass(frozen=True)
class Packed:
    """What the worker needs to bring a compressed or packed object's inner image onto its disk."""

    container: str        # contract.CONTAINERS
    inner_offset: int     # where the image starts: in the object (tar) or in the decompressed data (tar.gz)
    inner_size: int       # the image file's length in bytes: what the staging copy holds


def inspect_object(read_range: ReadRange, size: int, object_name: str, metadata_format: str | None,
                   declared_size: int | None, max_virtual_size: int) -> tuple[Inspection, Packed | None]:
    """Inspect a plain, compressed or packed object: its image's format and virtual size."""
    inner_claim, container = split_name(object_name)
    if container is None:
        claimed = inspection.claimed_format(object_name, metadata_format)
        found = inspection.inspect(read_range, size, claimed, max_virtual_size, allow_delta=True)
        _check_declared(declared_size, found.virtual_size, "the image's header")
        return found, None
    if size == 0:
        raise ImageRejected("empty", "the object is empty (0 bytes)")
    claimed = inspection.claimed_format(object_name, metadata_format) if metadata_format else inner_claim
    reader = _Bytes(read_range, size)
    if container == "tar":
        return _plain_tar(reader, claimed, declared_size, max_virtual_size)
    limit = INNER_HEAD_BYTES + (TAR_HEADERS_BYTES if container == "tar.gz" else 0)
    inflated, whole = inflate_head("gzip" if container == "tar.gz" else container, reader.head, limit,
                                   reader.head_is_all)
    if container == "tar.gz":
        offset, length, name = tar_member(lambda lo, hi: inflated[lo:hi] if hi <= len(inflated) else None)
        claimed = claimed or _claim_of(name)
        record: int | None = length
        inner_head = inflated[offset:offset + min(length, INNER_HEAD_BYTES)]
    else:
        offset = 0
        record = len(inflated) if whole else _record(container, reader, inflated)
        if container == "gzip" and not whole and record is not None and declared_size is not None \
                and declared_size % GIB4 == record:
            record = declared_size  # ISIZE is the size modulo 4 GiB: the uploader's size agrees with it
        inner_head = inflated
    return _inner(container, offset, inner_head, record, claimed, declared_size, max_virtual_size)


def _inner(container: str, offset: int, head: bytes, record: int | None, claimed: str | None,
           declared: int | None, max_virtual_size: int) -> tuple[Inspection, Packed]:
    """Check the inner image's head and size it (see the module docstring)."""
    if not head:
        raise ImageRejected("empty", f"the {container} holds no data")
    length = record if record is not None else declared
    read = inspection._Read(head, b"", len(head), max(length or 0, len(head)))
    found = inspection._inspect_image(read, claimed, max_virtual_size)
    if found.format == "raw":
        if record is not None and declared is not None and record != declared:
            raise ImageRejected("virtual-size-mismatch", f"opc-meta-virtual-size says {declared} bytes, the "
                                f"{container} records {record} bytes of disk")
        if length is None:
            raise ImageRejected("virtual-size-unknown", f"the {container} does not record the size of the raw disk "
                                "it holds, and it cannot be known before writing: set opc-meta-virtual-size to the "
                                "disk's size in bytes (or compress with xz, or zstd from a file, which record it)")
        _check_size(length, found.detected_as, max_virtual_size)
        return Inspection("raw", length, found.detected_as), Packed(container, offset, length)
    _check_declared(declared, found.virtual_size, f"the {found.format} header")
    if record is None:
        raise ImageRejected("virtual-size-unknown", f"the {container} does not record the length of the "
                            f"{found.format} image it holds, so it cannot be streamed: compress it with xz or "
                            "zstd from a file (opc-meta-virtual-size gives a raw disk's size only)")
    if record > max_virtual_size + found.virtual_size // 8 + 64 * 1024 * 1024:
        raise ImageRejected("decompression-bomb", f"the {container} records {record} bytes for a {found.format} "
                            f"image of {found.virtual_size} bytes")
    return found, Packed(container, offset, record)


def _check_size(length: int, name: str, max_virtual_size: int) -> None:
    if length > max_virtual_size:
        raise ImageRejected("decompression-bomb", f"the disk inside is {length} bytes, more than the maximum "
                            f"virtual size of {max_virtual_size} bytes")
    if length <= 0:
        raise ImageRejected("zero-virtual-size", f"{name} disk of {length} bytes")


def _check_declared(declared: int | None, virtual_size: int, where: str) -> None:
    if declared is not None and declared != virtual_size:
        raise ImageRejected("virtual-size-mismatch", f"opc-meta-virtual-size says {declared} bytes, {where} "
                            f"{virtual_size}")


def _claim_of(member_name: str) -> str | None:
    suffix = member_name.rsplit(".", 1)[-1].lower() if "." in member_name else ""
    return FORMAT_NAMES.get(suffix)


# -- the object's bytes: the inspection's head and tail, and more ranges when needed ---------

class _Bytes:
    def __init__(self, read_range: ReadRange, size: int) -> None:
        self.read_range, self.size = read_range, size
        self.head = read_range(0, min(size, HEAD_BYTES))
        self.tail_start = max(len(self.head), size - TAIL_BYTES)
        self.tail = read_range(self.tail_start, size) if self.tail_start < size else b""
        self.head_is_all = len(self.head) == size

    def get(self, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) of the object."""
        lo, hi = max(0, lo), min(self.size, hi)
        if hi <= lo:
            return b""
        if hi <= len(self.head):
            return self.head[lo:hi]
        if lo >= self.tail_start:
            return self.tail[lo - self.tail_start:hi - self.tail_start]
        return self.read_range(lo, hi)


# -- decompressing the head ------------------------------------------------------------------

def inflate_head(container: str, data: bytes, limit: int, data_is_all: bool) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of ``data`` decompressed, and whether that is all of it (the
    data was the whole object and decompressed to its end within the limit)."""
    try:
        if container == "zstd":
            return _inflate_zstd(data, limit, data_is_all)
        out = bytearray()
        pending = data
        ended = False
        while pending and len(out) < limit:
            if container == "gzip":
                d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                out += d.decompress(pending, limit - len(out))
                ended, rest = d.eof, d.unused_data
            else:
                d = lzma.LZMADecompressor(lzma.FORMAT_XZ) if container == "xz" else bz2.BZ2Decompressor()
                out += d.decompress(pending, max_length=limit - len(out))
                ended, rest = d.eof, d.unused_data
            if not ended:
                break
            pending = rest.lstrip(b"\0") if container == "xz" else rest  # xz streams may be padded
        if not out and not ended:
            raise ImageRejected("decompression-failed", f"the object's first bytes do not decompress as {container}")
        return bytes(out[:limit]), bool(data_is_all and ended and not pending and len(out) <= limit)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
        raise ImageRejected("decompression-failed", f"the object does not decompress as {container}: {exc}") from None


def _inflate_zstd(data: bytes, limit: int, data_is_all: bool) -> tuple[bytes, bool]:
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
        out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise ImageRejected("decompression-failed", f"the object does not decompress as zstd: {exc}") from None
    if not out:
        try:
            zstandard.get_frame_parameters(data)
        except zstandard.ZstdError as exc:
            raise ImageRejected("decompression-failed", f"the object is not zstd: {exc}") from None
    whole = data_is_all and len(out) <= limit
    if whole:
        try:  # the whole object was given: it must decompress completely
            zstandard.ZstdDecompressor().decompressobj().decompress(data)
        except zstandard.ZstdError as exc:
            raise ImageRejected("decompression-failed", f"the object does not decompress as zstd: {exc}") from None
    return out[:limit], whole


# -- the containers' records of the decompressed length ---------------------------------------

def _record(container: str, reader: _Bytes, inflated: bytes) -> int | None:
    if container == "xz":
        return xz_size(reader.get, reader.size)
    if container == "zstd":
        return zstd_size(reader.head)
    if container == "gzip":
        return gzip_size(reader.get(reader.size - 4, reader.size), reader.size, len(inflated))
    return None


def xz_size(get: Callable[[int, int], bytes], size: int) -> int:
    """The uncompressed length of the xz streams ending at ``size``, from their indexes."""
    total, end = 0, size
    streams = 0
    while end > 0:
        while end >= 4 and get(end - 4, end) == b"\0\0\0\0":  # stream padding
            end -= 4
        footer = get(end - 12, end)
        if len(footer) != 12 or footer[10:12] != b"YZ" or zlib.crc32(footer[4:10]) != struct.unpack("<I", footer[:4])[0]:
            raise ImageRejected("decompression-failed", "the xz stream footer at the object's end is missing or damaged")
        backward = (struct.unpack("<I", footer[4:8])[0] + 1) * 4
        index_start = end - 12 - backward
        index = get(index_start, end - 12)
        if index_start < 12 or len(index) != backward or index[0] != 0:
            raise ImageRejected("decompression-failed", "the xz index is missing or damaged")
        if zlib.crc32(index[:-4]) != struct.unpack("<I", index[-4:])[0]:
            raise ImageRejected("decompression-failed", "the xz index fails its CRC32")
        count, pos = _varint(index, 1)
        if count > len(index):
            raise ImageRejected("decompression-failed", "the xz index lists more blocks than it can hold")
        blocks = 0
        for _ in range(count):
            unpadded, pos = _varint(index, pos)
            uncompressed, pos = _varint(index, pos)
            blocks += (unpadded + 3) & ~3
            total += uncompressed
        end = index_start - blocks - 12
        streams += 1
        if end < 0 or streams > 10000:
            raise ImageRejected("decompression-failed", "the xz index describes more data than the object holds")
    return total


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(9):
        if pos >= len(data):
            break
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise ImageRejected("decompression-failed", "the xz index holds a malformed number")


def zstd_size(head: bytes) -> int | None:
    """The first frame's content size when it is written and the object holds that one frame (as far
    as the head shows)."""
    import zstandard

    try:
        params = zstandard.get_frame_parameters(head)
    except zstandard.ZstdError as exc:
        raise ImageRejected("decompression-failed", f"the object is not zstd: {exc}") from None
    if params.content_size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        return None
    # Walk the first frame's block headers through the head: a frame that ends inside it with
    # more data after it means several frames, whose sizes only decompression tells.
    try:
        pos = zstandard.frame_header_size(head)
    except zstandard.ZstdError:
        return None
    while pos + 3 <= len(head):
        block = int.from_bytes(head[pos:pos + 3], "little")
        pos += 3 + (1 if (block >> 1) & 3 == 1 else block >> 3)
        if block & 1:
            pos += 4 if params.has_checksum else 0
            if pos < len(head):
                return None
            break
    return int(params.content_size)


def gzip_size(isize_bytes: bytes, object_size: int, head_output: int) -> int | None:
    """ISIZE when it can be trusted (see the module docstring), else ``None``."""
    if object_size >= GIB4 or len(isize_bytes) != 4:
        return None
    isize = struct.unpack("<I", isize_bytes)[0]
    # deflate never grows data by more than 5 bytes per 16 KiB stored block, plus the gzip header
    floor = (object_size - 18 - 1024) * 16384 // 16389
    if isize == 0 or isize % BLOCK or isize < head_output or isize < floor:
        return None
    return isize


# -- tar --------------------------------------------------------------------------------------

def tar_members(get: Callable[[int, int], bytes | None], code: str = "tar-not-one-image",
                what: str = "the object") -> Iterator[tuple[int, int, str]]:
    """(data offset, size, name) of each regular file in the tar whose bytes ``get`` serves,
    reading only headers (``None`` past what is known ends the walk). Links, devices, FIFOs
    and sparse members are refused with ``code``."""
    pos, pax_size, long_name = 0, None, None
    while True:
        header = get(pos, pos + BLOCK)
        if not header or len(header) < BLOCK or header == bytes(BLOCK):
            return
        stored = _octal(header[148:156])
        if stored is None or stored != sum(header[:148]) + 256 + sum(header[156:]):
            raise ImageRejected(code, f"the tar header at byte {pos} of {what} is damaged (bad checksum)"
                                if pos else f"{what} is not a tar archive")
        kind = header[156:157]
        size = _tar_number(header[124:136], code)
        data = pos + BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            if size > 1024 * 1024:
                raise ImageRejected(code, f"a tar extended header of {size} bytes in {what}")
            body = get(data, data + size)
            if body is None:
                raise ImageRejected("incomplete-header", f"the extended headers of {what} run past what was read")
            if kind == b"x":
                records = _pax(body, code)
                pax_size = int(records["size"]) if "size" in records else None
                long_name = records.get("path", long_name)
            elif kind == b"L":
                long_name = body.rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            if pax_size is not None:
                size = pax_size
            yield data, size, long_name or _tar_name(header)
            pax_size = long_name = None
        elif kind == b"5":
            pax_size = long_name = None
        else:
            kind_name = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
                         b"4": "a block device", b"6": "a FIFO", b"S": "a sparse file"}.get(kind,
                                                                                          f"a member of type {kind!r}")
            raise ImageRejected(code, f"{what} holds {kind_name} ({_tar_name(header)!r}): only regular files, "
                                "such as one disk image, are accepted")
        pos = data + (size + BLOCK - 1) // BLOCK * BLOCK


def tar_member(get: Callable[[int, int], bytes | None]) -> tuple[int, int, str]:
    """(data offset, size, name) of the one regular file in the tar whose bytes ``get`` serves
    (``None`` past what is known: the walk stops there, having found the member)."""
    found = None
    for member in tar_members(get):
        if found is not None:
            raise ImageRejected("tar-not-one-image", "the tar holds more than one file: upload one disk image "
                                "per tar")
        found = member
    if found is None:
        raise ImageRejected("tar-not-one-image", "the tar holds no file")
    return found


def _octal(field: bytes) -> int | None:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


def _tar_number(field: bytes, code: str) -> int:
    if field[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    value = _octal(field)
    if value is None:
        raise ImageRejected(code, "a tar header holds a malformed size")
    return value


def _tar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "replace")


def _pax(body: bytes, code: str) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(body):
        space = body.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(body[pos:space])
        except ValueError:
            raise ImageRejected(code, "a malformed pax header") from None
        if length <= 0:
            break
        key, _, value = body[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def _plain_tar(reader: _Bytes, claimed: str | None, declared: int | None,
               max_virtual_size: int) -> tuple[Inspection, Packed]:
    """A tar: the member's data is a byte range of the object, inspected like a plain upload."""
    offset, length, name = tar_member(reader.get)
    if offset + length > reader.size:
        raise ImageRejected("tar-not-one-image", f"the tar member {name!r} runs past the object's end")
    claimed = claimed or _claim_of(name)
    found = inspection.inspect(lambda lo, hi: reader.get(offset + lo, offset + hi), length, claimed,
                               max_virtual_size)
    _check_declared(declared, found.virtual_size, f"the {found.format} image in the tar")
    return found, Packed("tar", offset, length)
