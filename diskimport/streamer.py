#!/usr/bin/env python3
"""Runs on the worker: fetch one object into a local file with parallel ranged GETs, and
serve that file over NBD (read-only, on a unix socket) while it fills.

qemu-img reads the image through NBD as it arrives: a read waits until its bytes are on
the worker's disk, and moves the chunks it needs to the front of the download queue.
So the conversion runs alongside the download, every byte crosses the network once, and
the finished file is what the write is verified against, with no second download.

The importer copies this file to the worker and runs it with the worker's ``python3``
(standard library only, Python 3.6 or newer). It reads a JSON configuration file, which
holds the PAR URL (a bearer secret) and is readable by the worker user alone:

    url          the object's PAR URL
    etag         sent as If-Match with every request: a replaced object fails the transfer
    size         the object's size in bytes
    path         the local file to fill (bytes already present may be listed in ``present``)
    present      [[start, end), ...] byte ranges already in ``path`` (the importer writes the
                 head and tail it inspected, so they are not fetched again)
    socket       the NBD unix socket to serve ``path`` on
    stop_file    once this file exists and the download is complete, the program exits
    directory    the staging directory; removed if the importer goes away (its SSH session
                 ends, or SIGTERM/SIGHUP arrives) so a crashed run leaves no copy of the image
    connections  parallel HTTP connections (each a persistent keep-alive connection)
    chunk_bytes  the unit of download and of scheduling
    bind         "ssh" (the address this SSH session arrived on), an address, or null
    digest       [hashlib name, hex digest, what]: the fetched bytes (a tar's member; a compressed
                 object's own bytes) must hash to it, or the transfer fails with code
                 ``ova-digest-mismatch`` (an OVA's manifest); hashed in order as they arrive

    window       {"behind": bytes, "ahead": bytes}: ``path`` holds only a window of the image, the
                 bytes its readers passed punched out of it (see :class:`Window`)

    vmdk_stream  {"capacity": bytes, "device_file": path, "target_is_zero": bool}: the image is
                 a streamOptimized VMDK, decoded as it arrives and written onto the device whose
                 path the importer writes into ``device_file`` once the volume is attached (see
                 :class:`VmdkStream`); it is fetched into memory, in order, and nothing is served
                 over NBD. Progress events then carry ``decoded`` (bytes of the image read), and
                 a ``decoded`` event follows ``fetched``: grains, bytes written and verified,
                 runs written, bytes between the runs checked to read as zeros. A stream the
                 decoder refuses ends the transfer with code ``vmdk-stream-invalid``.

    base         (a tar's member) the object offset of ``path``'s byte 0: only the object's
                 bytes [base, base + size) are fetched, and ``present`` is given in ``path``'s
                 offsets
    container    (compressed uploads) "gzip", "xz", "zstd", "bzip2" or "tar.gz": the object
                 (``object_size`` bytes) is fetched into memory, a few chunks per connection
                 ahead of the decompression, and decompressed in order as it arrives by the
                 worker's ``gzip``/``xz``/``zstd``/``bzip2 -dc`` (a process of its own, so it
                 runs beside the fetching); its output from byte ``skip`` (a tar.gz's member)
                 fills ``path``, whose ``size`` is the image's length. ``present`` is then
                 given in the object's offsets, and its bytes are in ``object_path``.
                 Decompressed zeros stay holes in ``path``, and the NBD export reports them
                 (``base:allocation``), so qemu-img does not read them.

Every transient failure (a 429 or 5xx reply, a reset connection, a short body) is retried
with backoff, and a retried chunk resumes from its last written byte. A 412 (the object
changed) or 404 (the PAR is gone) ends the transfer. Progress goes to stdout as JSON lines.

A decompression that yields more than ``size`` bytes (a bomb, or a wrong size record) ends
the transfer with code ``decompression-bomb``; one that fails or ends short with
``decompression-failed``; a tar.gz with more than zeros after its member with
``tar-not-one-image``. The ``failed`` event carries the code; NBD reads then get EIO.
"""

import array
import bisect
import errno
import fcntl
import hashlib
import http.client
import json
import mmap
import os
import queue
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

PIECE = 1024 * 1024

# NBD protocol constants (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID = 0x80000001, 0x80000003
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_CAN_MULTI_CONN = 1, 2, 1 << 8
CMD_READ, CMD_DISC, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 2, 3, 7
CMD_FLAG_REQ_ONE = 1 << 3
REPLY_FLAG_DONE = 1
REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR = 1, 2, 5, (1 << 15) | 1
STATE_HOLE, STATE_ZERO = 1, 2
BASE_ALLOCATION, BASE_ALLOCATION_ID = b"base:allocation", 1
MAX_EXTENTS = 1024  # descriptors in one block status reply
EPERM, EIO, EINVAL = 1, 5, 22
MAX_READ = 32 * 1024 * 1024
F_SETPIPE_SZ = 1031


class TransferFailed(Exception):
    """The object cannot be fetched (changed, gone, or failing beyond the retry budget)."""

    code = None


class Refused(TransferFailed):
    """The object's data is not what the inspection said (a ``code`` the importer refuses with)."""

    def __init__(self, code, message):
        TransferFailed.__init__(self, message)
        self.code = code


def emit(event, **fields):
    fields["event"] = event
    sys.stdout.write(json.dumps(fields, sort_keys=True) + "\n")
    sys.stdout.flush()


def missing_intervals(size, present):
    """[0, size) minus the ``present`` ranges, as sorted [start, end) pairs."""
    gaps, pos = [], 0
    for start, end in sorted((max(0, s), min(size, e)) for s, e in present):
        if start > pos:
            gaps.append((pos, start))
        pos = max(pos, end)
    if pos < size:
        gaps.append((pos, size))
    return gaps


class Chunk(object):
    __slots__ = ("lo", "hi", "pos", "state", "buf", "pins")

    def __init__(self, lo, hi):
        self.lo, self.hi, self.pos, self.state, self.buf = lo, hi, lo, "todo", None
        self.pins = 0  # (a Window) NBD replies sending its bytes: it stays in the file until they are sent


class Download(object):
    """The chunks still to fetch, which of them readers wait for, and what has arrived.

    With ``buffers``, the chunks are received into memory (a pool of that many chunk-sized
    buffers, reused) instead of a file: for an object that is only read once, in order (a
    compressed one), the fetchers then run at most that many chunks ahead of the reader,
    and no byte of the object goes through the page cache.
    """

    def __init__(self, size, present, chunk_bytes, buffers=0):
        self.size = size
        self.chunks = []
        for start, end in missing_intervals(size, present):
            for lo in range(start, end, chunk_bytes):
                self.chunks.append(Chunk(lo, min(end, lo + chunk_bytes)))
        self.starts = [c.lo for c in self.chunks]
        self.cond = threading.Condition()
        self.next_index = 0
        self.wanted = []
        self.remaining = len(self.chunks)
        self.fetched = 0
        self.error = None
        self.in_memory = buffers > 0
        self.pool = [bytearray(chunk_bytes) for _ in range(min(buffers, len(self.chunks)))]
        self.limit = None  # (a window) chunks starting at or after this offset wait: see Window

    def take(self):
        """The next chunk to fetch: one a reader waits for, else the next in file order.

        In memory, the next in file order once a buffer is free for it (None once failed)."""
        with self.cond:
            if self.in_memory:
                while self.next_index < len(self.chunks) and not self.pool and self.error is None:
                    self.cond.wait(1.0)
                if self.next_index >= len(self.chunks) or self.error is not None:
                    return None
                chunk = self.chunks[self.next_index]
                self.next_index += 1
                chunk.state, chunk.buf = "active", self.pool.pop()
                return chunk
            while True:
                while self.wanted:
                    chunk = self.wanted.pop(0)
                    if chunk.state == "todo":
                        chunk.state = "active"
                        return chunk
                while self.next_index < len(self.chunks):
                    chunk = self.chunks[self.next_index]
                    if self.limit is not None and chunk.lo >= self.limit:
                        break  # (a window) not until the readers come closer
                    self.next_index += 1
                    if chunk.state == "todo":
                        chunk.state = "active"
                        return chunk
                if self.next_index >= len(self.chunks) or self.error is not None:
                    return None
                self.cond.wait(1.0)

    def chunk_at(self, pos):
        """The chunk holding object byte ``pos``, or None (a ``present`` byte)."""
        i = bisect.bisect_right(self.starts, pos) - 1
        if i >= 0 and self.chunks[i].hi > pos:
            return self.chunks[i]
        return None

    def release(self, chunk):
        """The reader is done with an in-memory chunk: its buffer goes back to the pool."""
        with self.cond:
            if chunk.buf is not None:
                self.pool.append(chunk.buf)
                chunk.buf = None
                self.cond.notify_all()

    def advance(self, chunk, n):
        with self.cond:
            chunk.pos += n
            self.fetched += n
            if chunk.pos >= chunk.hi:
                chunk.state = "done"
                self.remaining -= 1
                self.cond.notify_all()
            elif not self.in_memory:  # readers of a file may wait for part of a chunk
                self.cond.notify_all()

    def fail(self, error):
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def complete(self):
        with self.cond:
            return self.remaining == 0

    def wait_complete(self, timeout):
        with self.cond:
            if self.remaining and self.error is None:
                self.cond.wait(timeout)
            if self.error is not None:
                raise self.error
            return self.remaining == 0

    def _blocking(self, start, end):
        """Chunks whose bytes in [start, end) have not all arrived."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        out = []
        while i < len(self.chunks) and self.chunks[i].lo < end:
            chunk = self.chunks[i]
            if chunk.hi > start and chunk.pos < min(chunk.hi, end):
                out.append(chunk)
            i += 1
        return out

    def ready(self, start, end):
        """``[(None, (start, length), None)]`` if [start, end) is on disk now, else None (see NbdExport)."""
        with self.cond:
            if self.error is None and not self.in_memory and not self._blocking(start, end):
                return [(None, (start, end - start), None)]
        return None

    def wait_for(self, start, end):
        """Block until [start, end) is on disk; ask for its chunks first."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                blocking = self._blocking(start, end)
                if not blocking:
                    return
                if self.in_memory:  # fetched in order anyway
                    self.cond.wait(1.0)
                    continue
                urgent = [c for c in blocking if c.state == "todo" and c not in self.wanted]
                self.wanted[0:0] = urgent
                self.cond.wait(1.0)


class Fetcher(object):
    """One persistent HTTP connection fetching chunks until none are left."""

    def __init__(self, config, download, fd):
        self.url = urlsplit(config["url"])
        self.etag = config.get("etag")
        self.base = int(config.get("base", 0))
        self.download = download
        self.fd = fd
        self.bind = config.get("bind_address")
        self.max_attempts = int(config.get("max_attempts", 10))
        self.timeout = float(config.get("timeout_seconds", 60))
        self.conn = None
        self.view = memoryview(bytearray(PIECE))  # one receive buffer, reused: no copy per piece

    def _connect(self):
        conn = self._connection((self.bind, 0) if self.bind else None)
        try:
            conn.connect()
        except OSError as exc:
            if not self.bind or exc.errno != errno.EADDRNOTAVAIL:
                raise
            emit("unbound", address=self.bind, error=str(exc))  # not an address of this host: let routing choose
            self.bind = None
            conn = self._connection(None)
        return conn

    def _connection(self, source):
        if self.url.scheme == "https":
            return http.client.HTTPSConnection(self.url.hostname, self.url.port or 443, timeout=self.timeout,
                                               source_address=source, context=ssl.create_default_context())
        return http.client.HTTPConnection(self.url.hostname, self.url.port or 80, timeout=self.timeout,
                                          source_address=source)

    def _close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def run(self):
        try:
            while self.download.error is None:
                chunk = self.download.take()
                if chunk is None:
                    return
                self._fetch(chunk)
        except TransferFailed as exc:
            self.download.fail(exc)
        except Exception as exc:  # a bug must not leave readers waiting forever
            self.download.fail(TransferFailed("unexpected error: %r" % (exc,)))
        finally:
            self._close()

    def _fetch(self, chunk):
        failures = 0
        while chunk.pos < chunk.hi:
            before = chunk.pos
            try:
                self._get(chunk)
                continue
            except TransferFailed:
                raise
            except (OSError, http.client.HTTPException, _Retryable) as exc:
                self._close()
                failures = 0 if chunk.pos > before else failures + 1
                if failures >= self.max_attempts:
                    raise TransferFailed("bytes %d-%d failed %d times in a row, last: %s"
                                         % (chunk.pos, chunk.hi - 1, failures, exc))
                emit("retry", start=chunk.pos, end=chunk.hi, attempt=failures, error=str(exc)[:200])
                time.sleep(min(8.0, 0.25 * 2 ** (failures - 1)))

    def _get(self, chunk):
        if self.conn is None:
            self.conn = self._connect()
        path = self.url.path + ("?" + self.url.query if self.url.query else "")
        headers = {"Range": "bytes=%d-%d" % (self.base + chunk.pos, self.base + chunk.hi - 1)}
        if self.etag:
            headers["If-Match"] = self.etag
        self.conn.request("GET", path, headers=headers)
        reply = self.conn.getresponse()
        if reply.status != 206:
            body = reply.read(4096)
            if reply.status in (404, 412) or (400 <= reply.status < 500 and reply.status != 429):
                raise TransferFailed("GET bytes %d-%d: HTTP %d %s" % (chunk.pos, chunk.hi - 1, reply.status,
                                                                    body.decode("utf-8", "replace")[:300]))
            raise _Retryable("HTTP %d" % reply.status)
        expected = chunk.hi - chunk.pos
        view = self.view
        while expected:
            if chunk.buf is not None:  # straight into the chunk's buffer
                at = chunk.pos - chunk.lo
                n = reply.readinto(memoryview(chunk.buf)[at:at + min(PIECE, expected)])
            else:
                n = reply.readinto(view[:min(PIECE, expected)])
            if not n:
                raise _Retryable("connection closed with %d bytes of the range unread" % expected)
            written = n if chunk.buf is not None else 0
            while written < n:
                written += os.pwrite(self.fd, view[written:n], chunk.pos + written)
            expected -= n
            self.download.advance(chunk, n)
        if reply.will_close:
            self._close()


class _Retryable(Exception):
    pass


class Digest(object):
    """The fetched bytes hashed in order as they arrive, against the digest the importer was
    given (an OVA's manifest): a mismatch fails the transfer (``ova-digest-mismatch``).

    It follows the file as the download fills it (page cache, no second fetch); readers are
    not held back by it, but the transfer ends only once the digest is known to match.
    """

    STEP = 8 * PIECE

    def __init__(self, spec, source, fd, size):
        self.algorithm, self.expected, self.what = spec
        self.source, self.fd, self.size = source, fd, size
        self.matched = threading.Event()
        self.hashed_to = 0  # the bytes before this offset are hashed
        self.on_hashed = None  # called as it moves on (a Window lets the bytes go)

    def start(self):
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        hasher = hashlib.new(self.algorithm)
        pos = 0
        buf = memoryview(bytearray(self.STEP))  # reused: no fresh pages per step
        try:
            while pos < self.size:
                end = min(self.size, pos + self.STEP)
                self.source.wait_for(pos, end)
                got = pread_into(self.fd, buf[:end - pos], pos)
                if got != end - pos:
                    raise TransferFailed("the staging file ends at %d while hashing it" % (pos + got))
                hasher.update(buf[:got])
                pos = self.hashed_to = end
                if self.on_hashed is not None:
                    self.on_hashed()
            check_digest(hasher, self.expected, self.what)
        except TransferFailed as exc:
            self.source.fail(exc)
            return
        except Exception as exc:  # a bug must not leave the transfer waiting forever
            self.source.fail(TransferFailed("hashing failed: %r" % (exc,)))
            return
        self.matched.set()

    def wait_complete(self, timeout):
        return self.source.wait_complete(timeout) and self.matched.wait(timeout)


class _Aside(object):
    """What a :class:`Fetcher` reports a side fetch's bytes to: a count, apart from the download's."""

    error = None

    def __init__(self):
        self.bytes = 0

    def advance(self, chunk, n):
        chunk.pos += n
        self.bytes += n


class Window(object):
    """The staging file kept to a bounded window of the image: bytes its readers have passed
    are punched out of it, so it never holds the whole image.

    For an image whose readers go through it front to back, each pass close behind the one
    before (a streamOptimized VMDK: qemu-img writes a slice over NBD, then compares it,
    reading the file, while the next slice is written): chunks are fetched in order, at most
    ``ahead`` bytes past the furthest byte read over NBD, and a chunk is punched out of the
    file (``FALLOC_FL_PUNCH_HOLE``) once that read is ``behind`` bytes past it and the
    digest, if any, has hashed it. The file's pages are then reused for the chunks that
    follow, instead of the image growing the worker's memory (or disk) by its whole size.

    Reads over NBD far ahead of the window (a few KiB: the grain tables VMware keeps across
    the file) are fetched on their own and leave the window where it is; an NBD read of bytes
    already punched out is fetched again. Both are counted (``refetched``): for the layouts
    VMware, VirtualBox and qemu-img write, and with ``behind`` covering two slices, it stays 0.
    A reader of the file itself finds zeros where bytes were punched out, which a comparison
    reports as a difference (the importer then looks again over NBD).
    """

    SIDE_READ = 1024 * 1024  # NBD reads up to this size, ahead of the window, are fetched on their own
    PUNCH_STEP = 64 * PIECE  # holes are punched in runs of at least this much

    def __init__(self, config, download, fd, digest=None):
        window = config["window"]
        self.behind, self.ahead = int(window["behind"]), int(window["ahead"])
        self.download, self.fd, self.size = download, fd, int(config["size"])
        self.digest = digest  # a Digest following the file: a chunk goes only once it is hashed
        self.reach = 0      # the furthest byte read over NBD
        self.low = 0        # the first chunk still in the file
        self.unpunched = None  # [start, end): chunks gone from the window, still to punch out
        download.limit = self.ahead
        self.aside = _Aside()
        self.side_lock = threading.Lock()
        self.side = Fetcher(config, self.aside, None)

    @property
    def refetched(self):
        return self.aside.bytes

    def _let_go(self):
        """Punch out the chunks the window has passed (with ``download.cond`` held)."""
        chunks = self.download.chunks
        hashed = self.digest.hashed_to if self.digest is not None else self.size
        while self.low < len(chunks):
            chunk = chunks[self.low]
            if (chunk.state != "done" or chunk.pins or chunk.hi > hashed
                    or chunk.hi + self.behind > self.reach):
                break
            chunk.state = "gone"
            self.low += 1
            run = self.unpunched
            if run is not None and run[1] != chunk.lo:  # a piece the importer wrote lies between: it stays
                punch_hole(self.fd, run[0], run[1] - run[0])
                run = None
            self.unpunched = run = [chunk.lo, chunk.hi] if run is None else [run[0], chunk.hi]
        run = self.unpunched
        if run is not None and (run[1] - run[0] >= self.PUNCH_STEP or self.low == len(chunks)):
            punch_hole(self.fd, run[0], run[1] - run[0])
            self.unpunched = None

    def acquire(self, start, end, wait=True):
        """The parts of [start, end) to send, in order: ``(None, (pos, length), chunk)``, the file's
        bytes (of ``chunk``, pinned until :meth:`release`, or, with None, a piece the importer
        wrote), or ``(bytes, None, None)``, fetched on their own. Without ``wait``, None unless
        every byte is in the file now."""
        download = self.download
        touched = list(self._chunks_in(start, end))
        if not touched:
            return [(None, (start, end - start), None)]
        with download.cond:
            far = touched[0].lo >= self.reach + self.ahead and end - start <= self.SIDE_READ
            if not far and end > self.reach:
                self.reach = end
                download.limit = self.reach + self.ahead
                download.cond.notify_all()
            if not wait and (far or download.error is not None
                             or not all(c.state == "done" for c in touched)):
                return None
            while not far:
                if download.error is not None:
                    raise download.error
                if all(c.state in ("done", "gone") for c in touched):
                    for c in touched:
                        if c.state == "done":
                            c.pins += 1
                    break
                download.cond.wait(1.0)
        parts, pos = [], start
        try:
            for chunk in touched:
                if chunk.lo > pos:  # a piece the importer wrote
                    parts.append((None, (pos, chunk.lo - pos), None))
                    pos = chunk.lo
                stop = min(end, chunk.hi)
                if not far and chunk.state == "done":  # pinned above: in the file until released
                    parts.append((None, (pos, stop - pos), chunk))
                else:
                    parts.append((self._fetch_aside(pos, stop), None, None))
                pos = stop
        except BaseException:
            self.release(parts)
            raise
        if pos < end:
            parts.append((None, (pos, end - pos), None))
        return parts

    def _chunks_in(self, start, end):
        download = self.download
        i = max(0, bisect.bisect_right(download.starts, start) - 1)
        while i < len(download.chunks) and download.chunks[i].lo < end:
            if download.chunks[i].hi > start:
                yield download.chunks[i]
            i += 1

    def release(self, parts):
        with self.download.cond:
            for _, _, chunk in parts:
                if chunk is not None:
                    chunk.pins -= 1
            self._let_go()

    def ready(self, start, end):
        return self.acquire(start, end, wait=False)

    def hashed(self):
        """The digest has moved on: chunks it passed may go."""
        with self.download.cond:
            self._let_go()

    def readers_done(self):
        """No more reads will come: fetch what nobody read (the digest still covers it), keep nothing."""
        with self.download.cond:
            self.reach = self.size + self.behind
            self.download.limit = None
            self._let_go()
            self.download.cond.notify_all()

    def _fetch_aside(self, start, end):
        chunk = Chunk(start, end)
        chunk.buf = bytearray(end - start)
        with self.side_lock:
            try:
                self.side._fetch(chunk)
            finally:
                self.side._close()
        return chunk.buf

    def wait_complete(self, timeout):
        if self.digest is not None:
            return self.digest.wait_complete(timeout)
        return self.download.wait_complete(timeout)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
_fallocate = None


def punch_hole(fd, offset, length):
    """Free [offset, offset + length) of the file (it reads as zeros); False where that is not possible."""
    global _fallocate
    if _fallocate is None:
        try:
            import ctypes
            import ctypes.util
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _fallocate = libc.fallocate
        except (ImportError, OSError, AttributeError):
            _fallocate = False
    if not _fallocate or length <= 0:
        return False
    return _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0


def pread_into(fd, view, pos):
    """Read into ``view`` at file offset ``pos``; the byte count (``os.preadv`` from Python 3.7)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], pos)
    data = os.pread(fd, len(view), pos)
    view[:len(data)] = data
    return len(data)


def check_digest(hasher, expected, what):
    if hasher.hexdigest() != expected.lower():
        raise Refused("ova-digest-mismatch", "the bytes of %s do not match their %s in the manifest"
                      % (what, hasher.name.upper()))


DECOMPRESSORS = {"gzip": ["gzip", "-dc"], "tar.gz": ["gzip", "-dc"], "xz": ["xz", "-dc"],
                 "zstd": ["zstd", "-dcq"], "bzip2": ["bzip2", "-dc"]}
TAR_TRAILER_MAX = 1024 * 1024  # a tar.gz's end-of-archive blocks and record padding
# Decompressors that can write the image file themselves, leaving its zeros as holes.
SPARSE_DECOMPRESSORS = {"zstd": ["zstd", "-dcq", "--sparse"]}
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)


def _limit_file_size(size):
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def in_order(download, fd, size):
    """Bytes [0, size) front to back as they arrive, as memoryviews: the pieces the importer wrote
    beforehand read from ``fd``, the rest from the download (its buffers, or ``fd`` it fetched
    into); a chunk's buffer is released once the reader asks for what follows."""
    pos = 0
    while pos < size:
        chunk = download.chunk_at(pos)
        if chunk is None:  # a piece the importer wrote
            following = bisect.bisect_right(download.starts, pos)
            end = download.starts[following] if following < len(download.starts) else size
            data = os.pread(fd, min(end - pos, 4 * PIECE), pos)
            if not data:
                raise TransferFailed("the staging file ends at %d" % pos)
            yield memoryview(data)
            pos += len(data)
            continue
        download.wait_for(chunk.lo, chunk.hi)
        if chunk.buf is None:
            yield memoryview(os.pread(fd, chunk.hi - chunk.lo, chunk.lo))
        else:
            yield memoryview(chunk.buf)[:chunk.hi - chunk.lo]
            download.release(chunk)
        pos = chunk.hi


class Outcome(object):
    """Work on a thread of its own, which readers and the end of the transfer wait on: it is done,
    or its failure (or the fetch's, which it passes on) reaches them."""

    def __init__(self, download):
        self.download = download
        self.cond = threading.Condition()
        self.done = False
        self.error = None

    def _outcome(self, work, what):
        try:
            work()
        except TransferFailed as exc:
            self.fail(exc)
            return
        except Exception as exc:  # a bug must not leave readers waiting forever
            self.fail(TransferFailed("%s failed: %r" % (what, exc)))
            return
        with self.cond:
            if self.error is None:  # else the fetch failed, and the work was stopped
                self.done = True
            self.cond.notify_all()

    def fail(self, error):
        Download.fail(self, error)  # the first failure kept, waiters woken (the same cond and error)
        self.download.fail(error)

    def wait_complete(self, timeout):
        with self.cond:
            if not self.done and self.error is None:
                self.cond.wait(timeout)
            if self.error is not None:
                raise self.error
            return self.done

    @property
    def fetched(self):
        return self.download.fetched


class Inflow(Outcome):
    """The object's bytes decompressed in order as they arrive: ``path`` fills from its start.

    The object arrives in memory (a :class:`Download` with buffers) and goes into the
    decompressor in order; only the pieces the importer wrote beforehand (``present``)
    are read from the object's file. Readers wait (:meth:`wait_for`) for the decompressed
    bytes as they wait for fetched ones in a plain transfer; a failure of the fetch or of
    the decompression reaches them. Decompressed zeros are not written (``path`` starts as
    a hole) and are remembered, so the NBD export can report them (:meth:`extents`) and
    qemu-img need not read them.
    """

    ZERO_GRAIN = PIECE  # zeros are found (and reported) in runs of whole MiB

    def __init__(self, config, download, object_fd, fd):
        self.container = config["container"]
        self.size = int(config["size"])
        self.skip = int(config.get("skip", 0))
        self.path = config["path"]
        self.direct = self.container in SPARSE_DECOMPRESSORS and not self.skip
        digest = config.get("digest")
        self.digest = (hashlib.new(digest[0]), digest[1], digest[2]) if digest else None
        self.seek_lock = threading.Lock()
        self.object_size = int(config["object_size"])
        Outcome.__init__(self, download)
        self.object_fd, self.fd = object_fd, fd
        self.produced = 0      # bytes of ``path`` written
        self.run_starts = [0]  # ``path`` as runs: where each starts, and whether it is zeros
        self.run_zero = [False]
        self.process = None

    def start(self):
        if self.direct:
            # zstd writes ``path`` itself, leaving zeros as holes: no decompressed byte crosses a
            # pipe. Its offset (shared with ``out_fd``) is how far it got; writing past ``size``
            # kills it (SIGXFSZ), which is a bomb.
            self.out_fd = os.open(self.path, os.O_WRONLY)
            size = self.size
            self.process = subprocess.Popen(SPARSE_DECOMPRESSORS[self.container], stdin=subprocess.PIPE,
                                            stdout=self.out_fd, stderr=subprocess.PIPE, bufsize=0,
                                            preexec_fn=lambda: _limit_file_size(size))
        else:
            self.process = subprocess.Popen(DECOMPRESSORS[self.container], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        for pipe in (self.process.stdin, self.process.stdout):
            try:  # fewer, larger pipe transfers (1 MiB is what an unprivileged process may ask)
                import fcntl
                fcntl.fcntl(pipe.fileno(), F_SETPIPE_SZ, PIECE)
            except (AttributeError, ImportError, OSError):
                pass
        threading.Thread(target=self._feed, daemon=True).start()
        threading.Thread(target=self._watch if self.direct else self._drain, daemon=True).start()

    def _watch(self):
        self._outcome(self._follow_file, "decompressing")

    def _follow_file(self):
        """Follow the decompressor writing ``path`` by its file offset; the checks on its length."""
        try:
            while True:
                code = self.process.poll()
                pos = os.lseek(self.out_fd, 0, os.SEEK_CUR)
                with self.cond:
                    if min(pos, self.size) > self.produced:
                        self.produced = min(pos, self.size)
                        self.cond.notify_all()
                if code is not None:
                    break
                time.sleep(0.02)
        finally:
            os.close(self.out_fd)
        if code == -signal.SIGXFSZ or pos > self.size:
            raise Refused("decompression-bomb", "the data decompresses to more than the %d bytes its size "
                          "says (set opc-meta-virtual-size if the size record is wrong)" % self.size)
        self._check_end(code, SPARSE_DECOMPRESSORS[self.container][0], pos)

    def _check_end(self, code, tool, length):
        """The decompressor ended having given ``length`` bytes of the image: a failure, or short."""
        if code != 0 and self.error is None:
            message = self.process.stderr.read(2000).decode("utf-8", "replace").strip()
            raise Refused("decompression-failed", "%s failed (exit %d): %s" % (tool, code, message))
        if self.error is None and length < self.size:
            raise Refused("decompression-failed", "the data decompresses to %d bytes, %d expected"
                          % (length, self.size))

    def fail(self, error):
        Outcome.fail(self, error)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def _feed(self):
        """The object's bytes, in order, into the decompressor as they arrive."""
        try:
            for view in in_order(self.download, self.object_fd, self.object_size):
                if self.error is not None:
                    break
                self._give(view)
            if self.digest is not None and self.error is None:
                check_digest(*self.digest)
        except TransferFailed as exc:
            self.fail(exc)
        except (OSError, ValueError):
            pass  # the decompressor stopped reading: _drain reports why
        finally:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def _give(self, data):
        if self.digest is not None:
            self.digest[0].update(data)
        view, given = memoryview(data), 0
        while given < len(view):
            given += self.process.stdin.write(view[given:])

    def _read_block(self, view):
        """Fill ``view`` from the decompressor (less only at its end); the bytes read."""
        filled = 0
        while filled < len(view):
            n = self.process.stdout.readinto(view[filled:])
            if not n:
                break
            filled += n
        return filled

    def _store(self, buf, view, a, b, offset):
        """Write ``buf[a:b]`` at ``path`` offset ``offset``, leaving whole zero grains as holes."""
        grain = self.ZERO_GRAIN
        kinds = []  # (path offset, zeros?) of each grain
        data_from = None  # the buffer offset where unwritten data starts
        for i in range(a, b, grain):
            j = min(b, i + grain)
            zero = j - i == grain and buf.startswith(ZERO_GRAIN_BYTES, i, j)
            kinds.append((offset + i - a, zero))
            if zero and data_from is not None:
                self._write(view, data_from, i, offset + data_from - a)
                data_from = None
            elif not zero and data_from is None:
                data_from = i
        if data_from is not None:
            self._write(view, data_from, b, offset + data_from - a)
        with self.cond:
            for start, zero in kinds:
                if zero != self.run_zero[-1]:
                    self.run_starts.append(start)
                    self.run_zero.append(zero)
            self.produced = offset + b - a
            self.cond.notify_all()

    def _write(self, view, i, j, at):
        written = 0
        while written < j - i:
            written += os.pwrite(self.fd, view[i + written:j], at + written)

    def _drain(self):
        self._outcome(self._read_pipe, "decompressing")

    def _read_pipe(self):
        """The decompressor's output into ``path``; the checks on its length."""
        buf = bytearray(4 * PIECE)
        view = memoryview(buf)
        total = 0  # decompressed bytes, counting the skipped ones
        limit = self.skip + self.size
        while True:
            n = self._read_block(view)
            if not n:
                break
            start, end = total, total + n
            total = end
            lo, hi = max(start, self.skip), min(end, limit)
            if hi > lo:
                self._store(buf, view, lo - start, hi - start, lo - self.skip)
            if end > limit:
                extra = view[max(0, limit - start):n]
                if self.container != "tar.gz":
                    raise Refused("decompression-bomb", "the data decompresses to more than the %d bytes "
                                  "its size says (set opc-meta-virtual-size if the size record is wrong)"
                                  % self.size)
                if extra.tobytes().count(0) != len(extra) or total - limit > TAR_TRAILER_MAX:
                    raise Refused("tar-not-one-image", "the tar holds more after its disk image")
            if n < len(buf):
                break  # the decompressor's end
        self._check_end(self.process.wait(), DECOMPRESSORS[self.container][0], total - self.skip)

    def wait_for(self, start, end):
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.produced >= end or self.done:
                    return
                self.cond.wait(1.0)

    def ready(self, start, end):
        with self.cond:
            if self.error is None and (self.produced >= end or self.done):
                return [(None, (start, end - start), None)]
        return None

    def extents(self, offset, length, limit=MAX_EXTENTS):
        """``[(length, zero?)]`` from ``offset``: what is known of up to ``length`` bytes.

        Waits until ``offset`` has been decompressed; covers at most what has been so far.
        """
        self.wait_for(offset, offset + 1)
        if self.direct:
            with self.cond:
                end = min(offset + length, self.size if self.done else self.produced)
            return self._file_extents(offset, end, limit)
        with self.cond:
            end = min(offset + length, self.size if self.done else self.produced)
            i = bisect.bisect_right(self.run_starts, offset) - 1
            out, pos = [], offset
            while pos < end and len(out) < limit:
                run_end = self.run_starts[i + 1] if i + 1 < len(self.run_starts) else end
                stop = min(end, run_end)
                if out and out[-1][1] == self.run_zero[i]:
                    out[-1] = (out[-1][0] + stop - pos, self.run_zero[i])
                else:
                    out.append((stop - pos, self.run_zero[i]))
                pos, i = stop, i + 1
            return out

    def _file_extents(self, offset, end, limit):
        """The holes the decompressor left in ``path`` (before its offset: zeros it skipped)."""
        out, pos = [], offset
        with self.seek_lock:
            while pos < end and len(out) < limit:
                try:
                    data = min(end, os.lseek(self.fd, pos, SEEK_DATA))
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = end  # only a hole after pos
                if data > pos:
                    out.append((data - pos, True))
                    pos = data
                    continue
                hole = min(end, os.lseek(self.fd, pos, SEEK_HOLE))
                out.append((hole - pos, False))
                pos = hole
        return out[:limit]


ZERO_GRAIN_BYTES = bytes(Inflow.ZERO_GRAIN)


# -- a streamOptimized VMDK, decoded as it arrives ------------------------------------------

SECTOR = 512
VMDK_COMPRESSED, VMDK_MARKERS = 1 << 16, 1 << 17
VMDK_GD_AT_END = 0xFFFFFFFFFFFFFFFF
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
GTE_ZEROED = 1  # a grain table entry for a grain that reads as zeros
MAX_VMDK_TABLES = 512 * 1024 * 1024  # the header's overhead, or one metadata marker's body, at most
WRITE_BATCH = 8 * PIECE  # the device is written and read back in runs of up to this much
WRITE_BUFFERS = 4
O_DIRECT = getattr(os, "O_DIRECT", 0)
BLKZEROOUT = 0x127F
DIRECT_ALIGN = 4096


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


class DeviceWriter(object):
    """Runs of the disk written onto the device (O_DIRECT) and read back, on a thread of its own.

    Each run is compared with what was written as soon as it is on the device; at the end,
    the device between the runs is zeroed unless it is known to be (a fresh volume) and
    read back as zeros, and flushed.
    """

    def __init__(self, device, capacity, target_is_zero):
        self.capacity, self.target_is_zero = capacity, target_is_zero
        self.plain = os.open(device, os.O_RDWR)
        try:
            self.direct = os.open(device, os.O_RDWR | O_DIRECT) if O_DIRECT else None
        except OSError:  # a file system without O_DIRECT
            self.direct = None
        self.free = queue.Queue()
        for _ in range(WRITE_BUFFERS):
            self.free.put(mmap.mmap(-1, WRITE_BATCH))  # page-aligned, as O_DIRECT wants
        self.check = mmap.mmap(-1, WRITE_BATCH)
        self.zeros = memoryview(mmap.mmap(-1, WRITE_BATCH)).cast("Q")
        self.queue = queue.Queue()
        self.runs = []  # [start, end) written, in order, merged
        self.batch, self.start, self.fill = None, 0, 0
        self.written = self.verified = self.batches = 0
        self.gaps_checked = 0  # bytes between the runs found to read as zeros (holes, or read back)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, offset, data):
        """Write ``data`` (up to ``WRITE_BATCH`` bytes) at ``offset``."""
        if self.batch is not None and (offset != self.start + self.fill or self.fill + len(data) > WRITE_BATCH):
            self._send()
        if self.batch is None:
            self.batch = self._buffer()
            self.start, self.fill = offset, 0
        self.batch[self.fill:self.fill + len(data)] = data
        self.fill += len(data)

    def _buffer(self):
        while True:
            if self.error is not None:
                raise self.error
            try:
                return self.free.get(timeout=1.0)
            except queue.Empty:  # the writer is busy (or has failed)
                continue

    def _send(self):
        self.queue.put((self.batch, self.start, self.fill))
        self.batch = None

    def finish(self):
        """Write what is left, settle the gaps; the writer's failure, if any, is raised."""
        if self.batch is not None:
            self._send()
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def close(self):
        for fd in (self.plain, self.direct):
            if fd is not None:
                os.close(fd)

    def _run(self):
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    break
                buf, start, n = item
                self._write_and_check(buf, start, n)
                self.free.put(buf)
            self._gaps()
            os.fsync(self.plain)
        except TransferFailed as exc:
            self.error = exc
        except OSError as exc:
            self.error = TransferFailed("writing the device failed: %s" % exc)
        except Exception as exc:  # a bug must not leave the decoder waiting forever
            self.error = TransferFailed("writing the device failed: %r" % (exc,))

    def _fd(self, offset, n, call=os.pwrite):
        # O_DIRECT wants aligned offsets, lengths and buffers (ours are page-aligned mmaps; a read
        # without os.preadv, before Python 3.7, goes through a buffer of its own: not direct)
        aligned = (self.direct is not None and offset % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0
                   and (call is os.pwrite or hasattr(os, "preadv")))
        return self.direct if aligned else self.plain

    def _io(self, call, view, offset):
        """All of ``view`` written (``os.pwrite``) or read (:func:`pread_into`) at ``offset``."""
        done = 0
        while done < len(view):
            k = call(self._fd(offset + done, len(view) - done, call), view[done:], offset + done)
            if k <= 0:
                raise TransferFailed("the device ends at byte %d" % (offset + done))
            done += k

    def _write_and_check(self, buf, start, n):
        view = memoryview(buf)[:n]
        self._io(os.pwrite, view, start)
        got = memoryview(self.check)[:n]
        if self._fd(start, n, pread_into) is self.plain:  # read what the device holds, not the page cache
            os.fdatasync(self.plain)
            os.posix_fadvise(self.plain, start, n, os.POSIX_FADV_DONTNEED)
        self._io(pread_into, got, start)
        if view.cast("Q") != got.cast("Q"):
            raise Verification("the device does not read back what was written at bytes %d-%d"
                               % (start, start + n - 1))
        self.written += n
        self.verified += n
        self.batches += 1
        if self.runs and self.runs[-1][1] == start:
            self.runs[-1][1] = start + n
        else:
            self.runs.append([start, start + n])

    def _gaps(self):
        """Between the runs the disk holds zeros: make it so on a used volume, and read it back."""
        pos = 0
        for start, end in sorted(self.runs) + [[self.capacity, self.capacity]]:
            if start > pos:
                if not self.target_is_zero:
                    self._zero(pos, start - pos)
                self._check_zeros(pos, start)
                self.gaps_checked += start - pos
            pos = max(pos, end)

    def _zero(self, offset, length):
        if stat.S_ISBLK(os.fstat(self.plain).st_mode):
            try:
                fcntl.ioctl(self.plain, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
            except OSError:
                pass
        elif punch_hole(self.plain, offset, length):
            return
        zeros = self.zeros.cast("B")
        for at in range(offset, offset + length, WRITE_BATCH):
            self._io(os.pwrite, zeros[:min(WRITE_BATCH, offset + length - at)], at)

    def _check_zeros(self, start, end):
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.plain, pos, SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                return  # only a hole from here
            if data >= end:
                return
            hole = min(end, os.lseek(self.plain, data, SEEK_HOLE))
            at = data - data % SECTOR
            while at < hole:
                n = min(WRITE_BATCH, hole - at)
                got = memoryview(self.check)[:n]
                self._io(pread_into, got, at)
                if got.cast("Q") != self.zeros[:n // 8]:
                    raise Verification("the device does not read as zeros at bytes %d-%d, between the "
                                       "image's grains" % (at, at + n - 1))
                at += n
            pos = hole


class Verification(TransferFailed):
    """The device does not hold what was written."""


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

    def ready(self, start, end):
        return None  # nothing is served over NBD

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


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError("NBD client went away")
        buf += data
    return bytes(buf)


class NbdExport(object):
    """A read-only NBD export of the file being downloaded (fixed newstyle handshake).

    Structured replies are offered; with them, a source that knows where its zeros are
    (:meth:`Inflow.extents`) answers ``NBD_CMD_BLOCK_STATUS`` in the ``base:allocation``
    context, so qemu-img skips those runs instead of reading them.
    """

    def __init__(self, path, size, download):
        self.path, self.size, self.download = path, size, download
        self.tflags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
        self.knows_zeros = hasattr(download, "extents")

    def serve(self, listener):
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        try:
            with conn:
                session = self._handshake(conn)
                if session is not None:
                    self._transmission(conn, *session)
        except (EOFError, OSError):
            pass

    def _reply_option(self, conn, option, reply, data=b""):
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, reply, len(data)) + data)

    def _handshake(self, conn):
        """Option haggling; ``(structured, block_status)`` to go on with, None to hang up."""
        conn.sendall(NBDMAGIC + IHAVEOPT + struct.pack(">H", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv_exact(conn, 4))
        structured = block_status = False
        while True:
            magic, option, length = struct.unpack(">8sII", _recv_exact(conn, 16))
            if magic != IHAVEOPT or length > 65536:
                return None
            data = _recv_exact(conn, length)
            if option == OPT_EXPORT_NAME:
                zeroes = b"" if client_flags & FLAG_NO_ZEROES else b"\0" * 124
                conn.sendall(struct.pack(">QH", self.size, self.tflags) + zeroes)
                return structured, block_status
            if option in (OPT_INFO, OPT_GO):
                self._reply_option(conn, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size, self.tflags))
                self._reply_option(conn, option, REP_INFO,
                                   struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_READ))
                self._reply_option(conn, option, REP_ACK)
                if option == OPT_GO:
                    return structured, block_status
            elif option == OPT_STRUCTURED_REPLY and not data:
                structured = True
                self._reply_option(conn, option, REP_ACK)
            elif option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                queries = _meta_queries(data) if structured else None
                if queries is None:
                    self._reply_option(conn, option, REP_ERR_INVALID)
                    continue
                # base:allocation, asked for by name (or by "base:" or, to list, by nothing)
                offered = self.knows_zeros and (
                    any(q in (BASE_ALLOCATION, b"base:") for q in queries)
                    or (option == OPT_LIST_META_CONTEXT and not queries))
                if offered:
                    context_id = BASE_ALLOCATION_ID if option == OPT_SET_META_CONTEXT else 0
                    self._reply_option(conn, option, REP_META_CONTEXT,
                                       struct.pack(">I", context_id) + BASE_ALLOCATION)
                if option == OPT_SET_META_CONTEXT:
                    block_status = offered
                self._reply_option(conn, option, REP_ACK)
            elif option == OPT_ABORT:
                self._reply_option(conn, option, REP_ACK)
                return None
            else:
                self._reply_option(conn, option, REP_ERR_UNSUP)

    def _transmission(self, conn, structured, block_status):
        send_lock = threading.Lock()
        windowed = isinstance(self.download, Window)
        fd = os.open(self.path, os.O_RDONLY)

        def reply(cookie, error, kind=CMD_FLUSH):
            with send_lock:
                if structured and (error or kind in (CMD_READ, CMD_BLOCK_STATUS)):
                    message = os.strerror(error).encode()
                    conn.sendall(struct.pack(">IHHQIIH", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                             cookie, 6 + len(message), error, len(message)) + message)
                else:
                    conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie))

        def read(cookie, offset, length, parts=None):
            try:
                if parts is None and windowed:  # pieces of the file, pinned, and bytes fetched again
                    parts = self.download.acquire(offset, offset + length)
                elif parts is None:
                    self.download.wait_for(offset, offset + length)
                with send_lock:
                    # The header, then the bytes straight from the page cache (sendfile: no copy here).
                    if structured:
                        conn.sendall(struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                                 REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset))
                    else:
                        conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))
                    for data, where, _ in parts or [(None, (offset, length), None)]:
                        if data is not None:
                            conn.sendall(data)
                            continue
                        pos, n = where
                        sent = 0
                        while sent < n:
                            k = os.sendfile(conn.fileno(), fd, pos + sent, n - sent)
                            if not k:
                                raise EOFError("staging file shorter than the export")
                            sent += k
            except TransferFailed:
                reply(cookie, EIO, CMD_READ)
            except (OSError, EOFError):
                hang_up()
            finally:
                if windowed and parts is not None:
                    self.download.release(parts)

        def status(cookie, flags, offset, length):
            try:
                extents = self.download.extents(offset, length, 1 if flags & CMD_FLAG_REQ_ONE else MAX_EXTENTS)
                body = b"".join(struct.pack(">II", n, (STATE_HOLE | STATE_ZERO) if zero else 0)
                                for n, zero in extents)
                with send_lock:
                    conn.sendall(struct.pack(">IHHQII", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                             REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(body), BASE_ALLOCATION_ID)
                                 + body)
            except TransferFailed:
                reply(cookie, EIO, CMD_BLOCK_STATUS)
            except (OSError, EOFError):
                hang_up()

        def hang_up():
            try:  # a reply cut short leaves the stream unusable: hang up so the client sees it
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        with ThreadPoolExecutor(max_workers=16) as pool:
            try:
                while True:
                    magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", _recv_exact(conn, 28))
                    if magic != REQUEST_MAGIC:
                        return
                    if kind == CMD_DISC:
                        return
                    if kind in (CMD_READ, CMD_BLOCK_STATUS) and (offset + length > self.size or not length):
                        reply(cookie, EINVAL, kind)
                    elif kind == CMD_READ:
                        if length > MAX_READ:
                            reply(cookie, EINVAL, kind)
                        else:
                            # Bytes already in the file are sent from this thread: most reads trail
                            # the download, and a hand-off to the pool per read costs more than the send.
                            # (A failed transfer is never ready: the pool's read replies with its error.)
                            parts = self.download.ready(offset, offset + length)
                            if parts is not None:
                                read(cookie, offset, length, parts)
                            else:
                                pool.submit(read, cookie, offset, length)
                    elif kind == CMD_BLOCK_STATUS and block_status:
                        pool.submit(status, cookie, flags, offset, length)
                    elif kind == CMD_FLUSH:
                        reply(cookie, 0)
                    else:
                        reply(cookie, EINVAL if kind == CMD_BLOCK_STATUS else EPERM, kind)
            finally:
                os.close(fd)


def _meta_queries(data):
    """The queries of a LIST/SET_META_CONTEXT option (export name, then counted strings); None if malformed."""
    try:
        (name_length,) = struct.unpack_from(">I", data, 0)
        pos = 4 + name_length
        (count,) = struct.unpack_from(">I", data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (n,) = struct.unpack_from(">I", data, pos)
            queries.append(data[pos + 4:pos + 4 + n])
            pos += 4 + n
        return queries if pos == len(data) and all(len(q) <= 4096 for q in queries) else None
    except struct.error:
        return None


def ssh_server_address():
    """The local address this SSH session arrived on (``SSH_CONNECTION``'s third field)."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    return fields[2] if len(fields) == 4 else None


def main(argv):
    # Who started us, learned first: a session that ends while we start up (python's own start
    # can take a second on a busy worker) must still be noticed. Parent 1: it has already ended.
    parent = os.getppid()
    with open(argv[1]) as f:
        config = json.load(f)

    def hung_up(signum, frame):
        """The session or the worker is going down: leave no copy of the image behind."""
        if config.get("directory"):
            shutil.rmtree(config["directory"], ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, hung_up)
    signal.signal(signal.SIGHUP, hung_up)
    size, path = int(config["size"]), config["path"]
    bind = config.get("bind")
    config["bind_address"] = ssh_server_address() if bind == "ssh" else bind
    compressed = config.get("container") in DECOMPRESSORS
    decoding = bool(config.get("vmdk_stream")) and not compressed
    windowed = bool(config.get("window")) and not compressed and not decoding
    fetch_size = int(config["object_size"]) if compressed else size
    # A compressed object, or a VMDK decoded as it arrives, is read once, in order: it arrives in
    # memory, a few chunks per connection ahead
    connections = max(1, int(config.get("connections", 4)))
    download = Download(fetch_size, config.get("present", []), int(config.get("chunk_bytes", 8 * PIECE)),
                        buffers=3 * connections if compressed or decoding else 0)

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    source = download  # what readers and the end of the transfer wait for
    fetch_fd = fd
    if compressed:
        fetch_fd = os.open(config["object_path"], os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fetch_fd, fetch_size)
        source = Inflow(config, download, fetch_fd, fd)
        source.start()
    elif decoding:
        source = VmdkStream(config, download, fd)
        source.start()
    digest = (Digest(config["digest"], source, fd, size)
              if config.get("digest") and not compressed and not decoding else None)
    if windowed:
        source = Window(config, download, fd, digest)
    ending = digest or source  # what the end of the transfer waits for
    if digest is not None:
        digest.on_hashed = source.hashed if windowed else None
        digest.start()
    if not decoding:  # a decoded VMDK is written by the streamer itself: nothing reads it over NBD
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(config["socket"])
        listener.listen(16)
        threading.Thread(target=NbdExport(path, size, source).serve, args=(listener,), daemon=True).start()

    started = time.monotonic()
    fetchers = [threading.Thread(target=Fetcher(config, download, fetch_fd).run, daemon=True)
                for _ in range(connections)]
    for thread in fetchers:
        thread.start()
    emit("ready", size=size, to_fetch=sum(c.hi - c.lo for c in download.chunks), bind=config["bind_address"])

    def orphaned():
        """The SSH session that started us is gone: nobody will read or stop us."""
        if os.getppid() == parent != 1:
            return False
        if config.get("directory"):
            shutil.rmtree(config["directory"], ignore_errors=True)
        return True

    interval = float(config.get("progress_seconds", 2.0))
    last = time.monotonic()
    try:
        while not ending.wait_complete(0.1):
            if orphaned():
                return 4
            stop = stop_requested(config["stop_file"])
            if stop == "stop" and windowed:
                source.readers_done()
            if stop == "abort":
                # the importer stops us because a read failed: the failure that made it fail is the news
                failure = download.error or getattr(source, "error", None)
                if failure is not None:
                    raise failure
                emit("aborted", fetched=download.fetched)
                return 3
            if time.monotonic() - last >= interval:
                last = time.monotonic()
                emit("progress", fetched=download.fetched, size=size,
                     **(source.progress() if decoding else {}))
    except TransferFailed as exc:
        emit("failed", error=str(exc), fetched=download.fetched, code=exc.code)
        sys.stderr.write("transfer failed: %s\n" % exc)
        return 1
    emit("fetched", fetched=download.fetched, size=size, seconds=round(time.monotonic() - started, 3))
    if decoding:
        emit("decoded", **source.account())
    while stop_requested(config["stop_file"]) is None:
        if orphaned():
            return 4
        time.sleep(0.05)
    if windowed:
        source.readers_done()  # reads served after the last byte arrived may have fetched some again
        emit("window", refetched=source.refetched)
    os.close(fd)
    return 0


def stop_requested(stop_file):
    """None while the importer still reads; else "stop" (or "abort" to stop before completion)."""
    try:
        with open(stop_file) as f:
            return f.read().strip() or "stop"
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main(sys.argv))
