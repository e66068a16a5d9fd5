"""A streamOptimized VMDK decoded in order as it arrives, its grains written onto the device."""

import array
import hashlib
import struct
import sys
import threading
import time
import zlib

from .completion import Outcome
from .device import DIRECT_ALIGN, SECTOR, DeviceWriter
from .digest import check_digest
from .events import Refused, TransferFailed, stop_requested
from .fetch import in_order
from .files import PIECE

VMDK_COMPRESSED, VMDK_MARKERS = 1 << 16, 1 << 17
VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
GTE_ZEROED = 1  # a grain table entry for a grain that reads as zeros
MAX_VMDK_TABLES = 512 * 1024 * 1024  # the header's overhead, or one metadata marker's body, at most


def vmdk_invalid(message):
    return Refused("vmdk-stream-invalid", message)


class VmdkHeader(object):
    """A streamOptimized VMDK's sparse extent header (the first sector, or the footer's copy)."""

    def __init__(self, data):
        if len(data) < SECTOR or data[:4] != b"KDMV":
            raise vmdk_invalid("the VMDK does not start with a sparse extent header")
        (_, self.flags, capacity, grain, _, _, self.gtes_per_gt, _, self.gd_offset,
         overhead) = struct.unpack_from("<IIQQQQIQQQ", data, 4)
        (self.compression,) = struct.unpack_from("<H", data, 77)
        self.capacity, self.grain, self.overhead = capacity * SECTOR, grain * SECTOR, overhead * SECTOR

    def check(self, capacity, size):
        """Refuse what this decoder (and qemu's vmdk driver) would not read as the inspection did."""
        if not (self.flags & VMDK_COMPRESSED and self.flags & VMDK_MARKERS and self.compression == 1):
            raise vmdk_invalid("the VMDK is not stream-optimized (deflated grains with markers)")
        if self.capacity != capacity:
            raise vmdk_invalid("the VMDK header says %d bytes of disk, the inspection %d" % (self.capacity, capacity))
        if not (DIRECT_ALIGN <= self.grain <= 2 * PIECE) or self.grain & (self.grain - 1):
            raise vmdk_invalid("the VMDK's grain of %d bytes is not a power of two from 4 KiB to 2 MiB" % self.grain)
        if not (1 <= self.gtes_per_gt <= 512):  # as qemu's vmdk driver requires
            raise vmdk_invalid("the VMDK has %d entries per grain table, not 1 to 512" % self.gtes_per_gt)
        if not (SECTOR <= self.overhead <= min(size, MAX_VMDK_TABLES)):
            raise vmdk_invalid("the VMDK's grains start at byte %d, not within the first %d bytes of its %d"
                               % (self.overhead, MAX_VMDK_TABLES, size))


class InOrder(object):
    """The image's bytes, read once front to back as they arrive (memoryviews), hashed as they go.

    Bytes the importer wrote beforehand (``present``) come from the staging file, the rest
    from the download's buffers, each released once the reader has moved past it.
    """

    def __init__(self, download, fd, size, hasher):
        self.size, self.hasher = size, hasher
        self.pieces = in_order(download, fd, size)
        self.view = memoryview(b"")
        self.at = 0   # in view
        self.pos = 0  # in the image

    def _next(self):
        view = next(self.pieces, None)
        if view is None:
            raise vmdk_invalid("the VMDK ends at byte %d, inside what its markers describe" % self.pos)
        if self.hasher is not None:
            self.hasher.update(view)
        self.view, self.at = view, 0

    def read(self, n):
        """The next ``n`` bytes (a view valid until the next call)."""
        if self.at + n <= len(self.view):
            out = self.view[self.at:self.at + n]
            self.at += n
            self.pos += n
            return out
        out = bytearray()
        while len(out) < n:
            if self.at == len(self.view):
                self._next()
            k = min(n - len(out), len(self.view) - self.at)
            out += self.view[self.at:self.at + k]
            self.at += k
        self.pos += n
        return memoryview(out)

    def skip(self, n):
        while n:
            if self.at == len(self.view):
                self._next()
            k = min(n, len(self.view) - self.at)
            self.at += k
            self.pos += k
            n -= k

    def drain(self):
        """Read (and hash) the rest of the image."""
        self.skip(self.size - self.pos)


class VmdkStream(Outcome):
    """A streamOptimized VMDK decoded in order as it arrives, and written straight onto the device.

    Such an image is a header, then grains, each a marker (the grain's first sector, its
    deflated length) and its deflated bytes, with grain tables and a directory among or
    before them. Read front to back, every grain is inflated once and written where its
    marker says, in runs, each read back from the device and compared as soon as it is
    there; the rest of the disk is checked to read as zeros. So the object is neither staged
    nor read twice, and no grain is inflated twice.

    The grain tables are then checked against the markers: every grain the directory and
    its tables point to (what qemu-img and VMware read) must be the one written at that
    place, and no other grain may exist, or the import is refused (``vmdk-stream-invalid``).
    Every length, offset and inflated size is bounded before it is used.

    The device is named once the volume is attached (``device_file`` appears); the object
    is fetched meanwhile, a few chunks per connection ahead.
    """

    def __init__(self, config, download, fd):
        spec = config["vmdk_stream"]
        self.size, self.capacity = int(config["size"]), int(spec["capacity"])
        self.device_file, self.target_is_zero = spec["device_file"], bool(spec["target_is_zero"])
        self.stop_file = config["stop_file"]
        digest = config.get("digest")
        self.digest = (hashlib.new(digest[0]), digest[1], digest[2]) if digest else None
        Outcome.__init__(self, download)
        self.source = InOrder(download, fd, self.size, self.digest[0] if self.digest else None)
        self.writer = None
        self.grains = 0

    def start(self):
        threading.Thread(target=self._run, daemon=True).start()

    def progress(self):
        return {"decoded": self.source.pos}

    def account(self):
        """What the decoding did (asked once it is done)."""
        writer = self.writer
        return {"grains": self.grains, "written": writer.written, "verified": writer.verified,
                "gaps_checked": writer.gaps_checked, "batches": writer.batches}

    def _run(self):
        try:
            self._outcome(self._decode, "decoding the VMDK")
        finally:
            if self.writer is not None:
                self.writer.close()

    def _device(self):
        while True:
            try:
                with open(self.device_file) as f:
                    device = f.read().strip()
                if device:
                    return device
            except OSError:
                pass
            if stop_requested(self.stop_file) == "abort" or self.error is not None:
                raise TransferFailed("stopped before the volume was attached")
            time.sleep(0.05)

    def _decode(self):
        source = self.source
        header = VmdkHeader(source.read(SECTOR).tobytes())
        header.check(self.capacity, self.size)
        grain = header.grain
        overhead = source.read(header.overhead - SECTOR).tobytes()
        count, per = -(-self.capacity // grain), header.gtes_per_gt
        places = {}  # the sector of each grain's marker, by grain table: {table: array of its entries}
        tables, directories, footer = {}, {}, None  # metadata markers' bodies, by their first sector
        self.writer = writer = DeviceWriter(self._device(), self.capacity, self.target_is_zero)
        while source.pos < self.size:  # qemu-img ends the file after its last grain, VMware with a marker
            at = source.pos
            if at % SECTOR:
                raise vmdk_invalid("a marker at byte %d is not on a sector boundary" % at)
            value, length = struct.unpack("<QI", source.read(12))
            if length:
                index, rest = divmod(value * SECTOR, grain)
                if rest or index >= count:
                    raise vmdk_invalid("the grain at byte %d is for sector %d, not a grain's start on the disk"
                                       % (at, value))
                table = places.get(index // per)
                if table is None:
                    table = places[index // per] = array_of(per)
                if table[index % per]:
                    raise vmdk_invalid("the grain at byte %d is for sector %d, which the grain at byte %d "
                                       "already holds" % (at, value, table[index % per] * SECTOR))
                if 12 + length > 2 * grain:
                    raise vmdk_invalid("the grain at byte %d holds %d deflated bytes, more than two grains"
                                       % (at, length))
                inflater = zlib.decompressobj()
                try:
                    data = inflater.decompress(source.read(length), grain)
                except zlib.error as exc:
                    raise vmdk_invalid("the grain at byte %d does not inflate: %s" % (at, exc))
                want = min(grain, self.capacity - index * grain)
                if not inflater.eof or len(data) not in (want, grain):
                    raise vmdk_invalid("the grain at byte %d inflates to %s bytes, not a grain of %d"
                                       % (at, "more than %d" % grain if not inflater.eof else len(data), grain))
                writer.put(index * grain, memoryview(data)[:want])
                table[index % per] = at // SECTOR
                self.grains += 1
                source.skip(min(-(12 + length) % SECTOR, self.size - source.pos))  # the last may lack its padding
                continue
            (kind,) = struct.unpack("<I", source.read(4))
            source.skip(SECTOR - 16)
            body = value * SECTOR
            if kind == MARKER_EOS:
                break
            if kind not in (MARKER_GT, MARKER_GD, MARKER_FOOTER) or body > min(MAX_VMDK_TABLES, self.size - source.pos):
                raise vmdk_invalid("the marker at byte %d (type %d, %d sectors) is not a grain table, directory "
                                   "or footer the VMDK can hold" % (at, kind, value))
            where = source.pos // SECTOR
            data = source.read(body).tobytes()
            if kind == MARKER_GT:
                tables[where] = data
            elif kind == MARKER_GD:
                directories[where] = data
            else:
                footer = VmdkHeader(data)
        writer.finish()
        source.drain()
        self._check_tables(header, footer, overhead, tables, directories, places, count)
        if self.digest is not None:
            check_digest(*self.digest)

    def _check_tables(self, header, footer, overhead, tables, directories, places, count):
        """Every grain the directory and tables point to is the one written at that place, and only those."""
        gd_offset = header.gd_offset
        if gd_offset == VMDK_GD_AT_END:
            if footer is None:
                raise vmdk_invalid("the VMDK's grain directory is at its end, but it has no footer")
            gd_offset = footer.gd_offset
        per = header.gtes_per_gt
        tables_count = -(-count // per)

        def table(sector, length, what, marked):
            """``length`` bytes at ``sector``: a marker's body, or within the header's overhead."""
            if sector in marked:
                data = marked[sector]
            elif 0 < sector and (sector * SECTOR + length) <= len(overhead) + SECTOR:
                data = overhead[sector * SECTOR - SECTOR:sector * SECTOR - SECTOR + length]
            else:
                raise vmdk_invalid("the VMDK's %s at sector %d is not where the stream holds one" % (what, sector))
            if len(data) < length:
                raise vmdk_invalid("the VMDK's %s at sector %d is shorter than %d bytes" % (what, sector, length))
            return array_from(data[:length])

        gd = table(gd_offset, 4 * tables_count, "directory", directories)
        none = array_of(per)
        for g in range(tables_count):
            written = places.get(g, none)
            if gd[g] == 0:
                entries = none
            else:
                entries = table(gd[g], 4 * per, "grain table", tables)
                if GTE_ZEROED in entries:
                    entries = array.array("I", (0 if e == GTE_ZEROED else e for e in entries))
            if entries != written:
                first = next(i for i in range(per) if entries[i] != written[i])
                if g * per + first >= count:
                    raise vmdk_invalid("the VMDK's grain table %d points past the end of the disk" % g)
                raise vmdk_invalid("grain %d of the disk is at sector %d by the VMDK's grain table, by its "
                                   "markers at sector %d" % (g * per + first, entries[first], written[first]))


def array_of(count):
    return array.array("I", bytes(4 * count))


def array_from(data):
    """Little-endian 32-bit entries (a VMDK's grain directory or table)."""
    entries = array.array("I")
    entries.frombytes(bytes(data))
    if sys.byteorder != "little":
        entries.byteswap()
    return entries
