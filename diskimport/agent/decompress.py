"""A compressed object decompressed in order as it arrives, by the worker's own decompressor.

Its output fills the staging file from its start; decompressed zeros stay holes there, and
are remembered so the NBD export can report them (``base:allocation``).
"""

import bisect
import errno
import hashlib
import os
import signal
import subprocess
import threading
import time

from .completion import Outcome
from .digest import check_digest
from .events import Refused, TransferFailed
from .fetch import in_order
from .files import PIECE, SEEK_DATA, SEEK_HOLE
from .source import NbdSource

F_SETPIPE_SZ = 1031
DECOMPRESSORS = {"gzip": ["gzip", "-dc"], "tar.gz": ["gzip", "-dc"], "xz": ["xz", "-dc"],
                 "zstd": ["zstd", "-dcq"], "bzip2": ["bzip2", "-dc"]}
TAR_TRAILER_MAX = 1024 * 1024  # a tar.gz's end-of-archive blocks and record padding
# Decompressors that can write the image file themselves, leaving its zeros as holes.
SPARSE_DECOMPRESSORS = {"zstd": ["zstd", "-dcq", "--sparse"]}


def _limit_file_size(size):
    import resource
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


class Inflow(Outcome, NbdSource):
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
    knows_zeros = True

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

    def extents(self, offset, length, limit):
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
