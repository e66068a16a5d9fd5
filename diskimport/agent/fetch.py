"""The object fetched with parallel ranged GETs, each over a persistent connection.

A :class:`Download` holds the chunks still to fetch and what has arrived; readers wait for
the bytes they need, and a chunk a reader waits for is fetched first. Each :class:`Fetcher`
is one keep-alive connection taking chunks until none are left, retrying a transient
failure with backoff and resuming a chunk from its last byte received.
"""

import bisect
import http.client
import os
import time

from .completion import Completion
from .connection import PersistentConnection, Retryable
from .events import TransferFailed, emit
from .files import PIECE
from .source import NbdSource


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


class Download(Completion, NbdSource):
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
        Completion.__init__(self)
        self.next_index = 0
        self.wanted = []
        self.remaining = len(self.chunks)
        self.fetched = 0
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

    def done_with(self, chunk):
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

    def _complete(self):
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
        """``[(None, (start, length), None)]`` if [start, end) is in the file now, else None."""
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


class Fetcher(PersistentConnection):
    """One persistent HTTP connection fetching chunks until none are left.

    Its ``download`` is a :class:`Download`, or, for chunks fetched alone with :meth:`fetch`,
    whatever counts their bytes as they arrive (``advance(chunk, n)``)."""

    def __init__(self, config, download, fd):
        PersistentConnection.__init__(self, config["url"], config.get("bind_address"),
                                      float(config.get("timeout_seconds", 60)))
        self.etag = config.get("etag")
        self.base = int(config.get("base", 0))
        self.download = download
        self.fd = fd
        self.max_attempts = int(config.get("max_attempts", 10))
        self.view = memoryview(bytearray(PIECE))  # one receive buffer, reused: no copy per piece

    def run(self):
        try:
            while self.download.error is None:
                chunk = self.download.take()
                if chunk is None:
                    return
                self.fetch(chunk)
        except TransferFailed as exc:
            self.download.fail(exc)
        except Exception as exc:  # a bug must not leave readers waiting forever
            self.download.fail(TransferFailed("unexpected error: %r" % (exc,)))
        finally:
            self.close()

    def fetch(self, chunk):
        """All of ``chunk`` from its ``pos``, retrying transient failures (resuming where each ended)."""
        failures = 0
        while chunk.pos < chunk.hi:
            before = chunk.pos
            try:
                self._get(chunk)
                continue
            except TransferFailed:
                raise
            except (OSError, http.client.HTTPException, Retryable) as exc:
                self.close()
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
            raise Retryable("HTTP %d" % reply.status)
        expected = chunk.hi - chunk.pos
        view = self.view
        while expected:
            if chunk.buf is not None:  # straight into the chunk's buffer
                at = chunk.pos - chunk.lo
                n = reply.readinto(memoryview(chunk.buf)[at:at + min(PIECE, expected)])
            else:
                n = reply.readinto(view[:min(PIECE, expected)])
            if not n:
                raise Retryable("connection closed with %d bytes of the range unread" % expected)
            written = n if chunk.buf is not None else 0
            while written < n:
                written += os.pwrite(self.fd, view[written:n], chunk.pos + written)
            expected -= n
            self.download.advance(chunk, n)
        if reply.will_close:
            self.close()


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
            download.done_with(chunk)
        pos = chunk.hi

