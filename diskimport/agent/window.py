"""The staging file kept to a window of the image around its readers, never the whole image."""

import bisect
import threading

from .fetch import Chunk, Fetcher
from .files import PIECE, punch_hole
from .source import NbdSource


class _Aside(object):
    """What a :class:`Fetcher` reports a side fetch's bytes to: a count, apart from the download's."""

    def __init__(self):
        self.bytes = 0

    def advance(self, chunk, n):
        chunk.pos += n
        self.bytes += n


class Window(NbdSource):
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
                self.side.fetch(chunk)
            finally:
                self.side.close()
        return chunk.buf
