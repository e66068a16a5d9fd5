"""The file names inside a Linux initramfs, read the way the kernel unpacks it.

An initramfs is one or more cpio archives (``newc``, magic ``070701`` or ``070702``) one after
another, each either plain or compressed: dracut and initramfs-tools put the CPU microcode in
a plain one first, then everything else compressed (gzip, xz, lzma, bzip2 by the standard
library; zstd, lz4 and lzop by the worker's own tool when it has one). Only the names are
kept; the contents are read past. Everything is bounded: names, entry counts, the bytes
decompressed.
"""

import bz2
import lzma
import os
import shutil
import subprocess
import zlib

MAX_NAME = 4096
MAX_ENTRIES = 500000
MAX_BYTES = 4 * 1024 ** 3  # decompressed, all archives together
CHUNK = 1024 * 1024
HEADER = 110
MAGICS = (b"070701", b"070702")
# compression: (magic, tool that decompresses it to stdout when the standard library cannot)
COMPRESSIONS = (
    ("gzip", b"\x1f\x8b", None),
    ("gzip", b"\x1f\x9e", None),
    ("xz", b"\xfd7zXZ\x00", None),
    ("zstd", b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"]),
    ("bzip2", b"BZh", None),
    ("lz4", b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    ("lzop", b"\x89LZO", ["lzop", "-dc"]),
    ("lzma", b"\x5d\x00\x00", None),
)


class InitramfsError(Exception):
    pass


class _Stream:
    """Exact reads from a file object, counting the bytes consumed, with bytes put back."""

    def __init__(self, f, budget=MAX_BYTES):
        self.f, self.consumed, self.budget, self.back = f, 0, budget, b""

    def read(self, n):
        data, self.back = self.back[:n], self.back[n:]
        while len(data) < n:
            more = self.f.read(n - len(data))
            if not more:
                break
            data += more
        self.consumed += len(data)
        if self.consumed > self.budget:
            raise InitramfsError("more than %d bytes decompressed" % self.budget)
        return data

    def unread(self, data):
        self.back = data + self.back
        self.consumed -= len(data)

    def skip(self, n):
        while n > 0:
            got = len(self.read(min(n, CHUNK)))
            if not got:
                raise InitramfsError("the archive ends inside an entry")
            n -= got

    def skip_zeros(self):
        """Read past zero padding; False at the end of the data."""
        while True:
            block = self.read(512)
            if not block:
                return False
            rest = block.lstrip(b"\0")
            if rest:
                self.unread(rest)
                return True


class _Decompressed:
    """A file-like view of ``source`` decompressed by the standard library, a bounded piece at a time."""

    def __init__(self, source, kind):
        self.source, self.kind, self.buffer, self.done, self.pending = source, kind, b"", False, b""
        if kind == "gzip":
            self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif kind == "xz":
            self.d = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        elif kind == "lzma":
            self.d = lzma.LZMADecompressor(lzma.FORMAT_ALONE)
        else:
            self.d = bz2.BZ2Decompressor()

    def read(self, n):
        try:
            while len(self.buffer) < n and not self.done:
                if self.kind == "gzip":
                    data = self.pending or self.source.read(CHUNK)
                    out = self.d.decompress(data, CHUNK) if data else b""
                    self.pending = self.d.unconsumed_tail
                else:
                    data = self.source.read(CHUNK) if self.d.needs_input else b""
                    out = self.d.decompress(data, CHUNK) if data or not self.d.needs_input else b""
                self.done = self.d.eof or (not data and not out)
                self.buffer += out
        except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
            raise InitramfsError("the compressed archive is damaged: %s" % exc)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


def _entries(stream, names):
    """Read one cpio archive from ``stream`` up to its trailer, adding each name to ``names``."""
    while True:
        header = stream.read(HEADER)
        if len(header) < HEADER:
            raise InitramfsError("the archive ends without its trailer")
        if header[:6] not in MAGICS:
            raise InitramfsError("not a newc cpio entry at byte %d" % (stream.consumed - HEADER))
        try:
            fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise InitramfsError("a cpio header with fields that are not hexadecimal")
        size, name_size = fields[6], fields[11]
        if not 0 < name_size <= MAX_NAME:
            raise InitramfsError("a cpio entry name of %d bytes" % name_size)
        name = stream.read(name_size)[:-1].decode("utf-8", "replace")
        stream.skip((-(HEADER + name_size)) % 4)
        if name == "TRAILER!!!":
            return
        if len(names) >= MAX_ENTRIES:
            raise InitramfsError("more than %d entries" % MAX_ENTRIES)
        names.append(name[2:] if name.startswith("./") else name)
        stream.skip(size + (-size) % 4)


def read_names(path):
    """``(names, compressions)``: every file name in the initramfs at ``path`` (a worker path) and
    how each of its archives is compressed (``none``, ``zstd``...)."""
    names, kinds = [], []
    with open(path, "rb") as f:
        stream = _Stream(f)
        while stream.skip_zeros():
            head = stream.read(8)
            stream.unread(head)
            if head[:6] in MAGICS:
                _entries(stream, names)
                kinds.append("none")
                continue
            kind, tool = _compression(head)
            if kind is None:
                raise InitramfsError("unknown data at byte %d of the initramfs (%s)" % (stream.consumed, head.hex()))
            kinds.append(kind)
            f.seek(stream.consumed)
            if tool is None:
                _compressed_entries(_Decompressed(f, kind), names)
            else:
                os.lseek(f.fileno(), stream.consumed, os.SEEK_SET)  # the tool reads the descriptor, not f's buffer
                _tool_entries(tool, f, names)
            break  # a compressed archive runs to the end of the file
    return names, kinds


def _compression(head):
    for kind, magic, tool in COMPRESSIONS:
        if head.startswith(magic):
            return kind, tool
    return None, None


def _compressed_entries(source, names):
    """Every archive of a decompressed stream (more than one may follow, zero-padded)."""
    stream = _Stream(source)
    while True:
        _entries(stream, names)
        if not stream.skip_zeros():
            return
        head = stream.read(6)
        stream.unread(head)
        if head not in MAGICS:
            return


def _tool_entries(tool, f, names):
    if shutil.which(tool[0]) is None:
        raise InitramfsError("the initramfs is compressed with %s, which is not installed here" % tool[0])
    process = subprocess.Popen(tool, stdin=f, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        _compressed_entries(process.stdout, names)
    finally:
        process.stdout.close()
        process.kill()
        process.wait()


def module_names(names):
    """The kernel modules among ``names``: ``{version: {module, ...}}`` (``virtio_blk`` for
    ``usr/lib/modules/6.1.0-57-cloud-amd64/kernel/drivers/block/virtio_blk.ko.zst``)."""
    found = {}
    for name in names:
        parts = name.split("/")
        if "modules" not in parts or ".ko" not in parts[-1]:
            continue
        at = parts.index("modules")
        if at + 1 >= len(parts) - 1:
            continue
        base = parts[-1]
        module = base[:base.index(".ko")].replace("-", "_")
        found.setdefault(parts[at + 1], set()).add(module)
    return found
