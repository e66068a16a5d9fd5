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

    base         (a tar's member) the object offset of ``path``'s byte 0: only the object's
                 bytes [base, base + size) are fetched, and ``present`` is given in ``path``'s
                 offsets
    container    (compressed uploads) "gzip", "xz", "zstd", "bzip2" or "tar.gz": the object
                 (``object_size`` bytes) is fetched into ``object_path`` and decompressed in
                 order as it arrives, by the worker's ``gzip``/``xz``/``zstd``/``bzip2 -dc``
                 (a process of its own, so it runs beside the fetching); its output from byte
                 ``skip`` (a tar.gz's member) fills ``path``, whose ``size`` is the image's
                 length. ``present`` is then given in the object's offsets.

Every transient failure (a 429 or 5xx reply, a reset connection, a short body) is retried
with backoff, and a retried chunk resumes from its last written byte. A 412 (the object
changed) or 404 (the PAR is gone) ends the transfer. Progress goes to stdout as JSON lines.

A decompression that yields more than ``size`` bytes (a bomb, or a wrong size record) ends
the transfer with code ``decompression-bomb``; one that fails or ends short with
``decompression-failed``; a tar.gz with more than zeros after its member with
``tar-not-one-image``. The ``failed`` event carries the code; NBD reads then get EIO.
"""

import bisect
import errno
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

PIECE = 1024 * 1024

# NBD protocol constants (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 0x80000001
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TFLAG_HAS_FLAGS, TFLAG_READ_ONLY, TFLAG_CAN_MULTI_CONN = 1, 2, 1 << 8
CMD_READ, CMD_DISC, CMD_FLUSH = 0, 2, 3
EPERM, EIO, EINVAL = 1, 5, 22
MAX_READ = 32 * 1024 * 1024


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
    __slots__ = ("lo", "hi", "pos", "state")

    def __init__(self, lo, hi):
        self.lo, self.hi, self.pos, self.state = lo, hi, lo, "todo"


class Download(object):
    """The chunks still to fetch, which of them readers wait for, and what has arrived."""

    def __init__(self, size, present, chunk_bytes):
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

    def take(self):
        """The next chunk to fetch: one a reader waits for, else the next in file order."""
        with self.cond:
            while self.wanted:
                chunk = self.wanted.pop(0)
                if chunk.state == "todo":
                    chunk.state = "active"
                    return chunk
            while self.next_index < len(self.chunks):
                chunk = self.chunks[self.next_index]
                self.next_index += 1
                if chunk.state == "todo":
                    chunk.state = "active"
                    return chunk
            return None

    def advance(self, chunk, n):
        with self.cond:
            chunk.pos += n
            self.fetched += n
            if chunk.pos >= chunk.hi:
                chunk.state = "done"
                self.remaining -= 1
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

    def wait_for(self, start, end):
        """Block until [start, end) is on disk; ask for its chunks first."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                blocking = self._blocking(start, end)
                if not blocking:
                    return
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
            n = reply.readinto(view[:min(PIECE, expected)])
            if not n:
                raise _Retryable("connection closed with %d bytes of the range unread" % expected)
            written = 0
            while written < n:
                written += os.pwrite(self.fd, view[written:n], chunk.pos + written)
            expected -= n
            self.download.advance(chunk, n)
        if reply.will_close:
            self._close()


class _Retryable(Exception):
    pass


DECOMPRESSORS = {"gzip": ["gzip", "-dc"], "tar.gz": ["gzip", "-dc"], "xz": ["xz", "-dc"],
                 "zstd": ["zstd", "-dcq"], "bzip2": ["bzip2", "-dc"]}
TAR_TRAILER_MAX = 1024 * 1024  # a tar.gz's end-of-archive blocks and record padding


class Inflow(object):
    """The object's bytes decompressed in order as they arrive: ``path`` fills from its start.

    Readers wait (:meth:`wait_for`) for the decompressed bytes as they wait for fetched ones
    in a plain transfer; a failure of the fetch or of the decompression reaches them.
    """

    def __init__(self, config, download, object_fd, fd):
        self.container = config["container"]
        self.size = int(config["size"])
        self.skip = int(config.get("skip", 0))
        self.object_size = int(config["object_size"])
        self.download, self.object_fd, self.fd = download, object_fd, fd
        self.cond = threading.Condition()
        self.produced = 0      # bytes of ``path`` written
        self.done = False
        self.error = None
        self.process = None

    def start(self):
        self.process = subprocess.Popen(DECOMPRESSORS[self.container], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        threading.Thread(target=self._feed, daemon=True).start()
        threading.Thread(target=self._drain, daemon=True).start()

    def fail(self, error):
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()
        self.download.fail(error)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def _feed(self):
        """The object's bytes, in order, into the decompressor as they arrive.

        What has been fed is no longer needed (the staging copy that is verified is the
        decompressed image): it is punched out of the object's file, so the compressed
        copy does not take room (or disk writes) beside the image.
        """
        pos = punched = 0
        try:
            while pos < self.object_size and self.error is None:
                end = min(self.object_size, pos + 4 * PIECE)
                self.download.wait_for(pos, end)
                data = os.pread(self.object_fd, end - pos, pos)
                self.process.stdin.write(data)
                pos += len(data)
                if pos - punched >= 64 * PIECE:
                    punch_hole(self.object_fd, punched, pos - punched)
                    punched = pos
        except TransferFailed as exc:
            self.fail(exc)
        except (OSError, ValueError):
            pass  # the decompressor stopped reading: _drain reports why
        finally:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def _drain(self):
        """The decompressor's output into ``path``; the checks on its length."""
        buf = bytearray(4 * PIECE)
        view = memoryview(buf)
        zeros = bytes(len(buf))
        total = 0  # decompressed bytes, counting the skipped ones
        limit = self.skip + self.size
        try:
            while True:
                n = self.process.stdout.readinto(buf)
                if not n:
                    break
                start, end = total, total + n
                total = end
                lo, hi = max(start, self.skip), min(end, limit)
                if hi > lo:
                    data = view[lo - start:hi - start]
                    written = 0
                    # the file starts as a hole: zeros (most of a disk) are not written, only skipped
                    if buf[lo - start:hi - start] == zeros[:hi - lo]:
                        written = len(data)
                    while written < len(data):
                        written += os.pwrite(self.fd, data[written:], lo - self.skip + written)
                    with self.cond:
                        self.produced = hi - self.skip
                        self.cond.notify_all()
                if end > limit:
                    extra = view[max(0, limit - start):n]
                    if self.container != "tar.gz":
                        raise Refused("decompression-bomb", "the data decompresses to more than the %d bytes "
                                      "its size says (set opc-meta-virtual-size if the size record is wrong)"
                                      % self.size)
                    if extra.tobytes().count(0) != len(extra) or total - limit > TAR_TRAILER_MAX:
                        raise Refused("tar-not-one-image", "the tar holds more after its disk image")
            code = self.process.wait()
            if code != 0 and self.error is None:
                message = self.process.stderr.read(2000).decode("utf-8", "replace").strip()
                raise Refused("decompression-failed", "%s failed (exit %d): %s"
                              % (DECOMPRESSORS[self.container][0], code, message))
            if self.error is None and total < limit:
                raise Refused("decompression-failed", "the data decompresses to %d bytes, %d expected"
                              % (total - self.skip, self.size))
        except TransferFailed as exc:
            self.fail(exc)
            return
        except Exception as exc:  # a bug must not leave readers waiting forever
            self.fail(TransferFailed("decompressing failed: %r" % (exc,)))
            return
        with self.cond:
            if self.error is not None:  # the fetch failed and the decompressor was stopped
                return
            self.done = True
            self.cond.notify_all()

    def wait_for(self, start, end):
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.produced >= end or self.done:
                    return
                self.cond.wait(1.0)

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


_FALLOCATE = []


def punch_hole(fd, offset, length):
    """Free [offset, offset + length) of a file (Linux ``fallocate`` PUNCH_HOLE); nothing elsewhere."""
    if not _FALLOCATE:
        try:
            import ctypes
            import ctypes.util
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
            _FALLOCATE.append(libc.fallocate)
        except (OSError, AttributeError):
            _FALLOCATE.append(None)
    if _FALLOCATE[0] is not None:
        _FALLOCATE[0](fd, 0x01 | 0x02, offset, length)  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError("NBD client went away")
        buf += data
    return bytes(buf)


class NbdExport(object):
    """A read-only NBD export of the file being downloaded (fixed newstyle handshake)."""

    def __init__(self, path, size, download):
        self.path, self.size, self.download = path, size, download
        self.tflags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN

    def serve(self, listener):
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn):
        try:
            with conn:
                if self._handshake(conn):
                    self._transmission(conn)
        except (EOFError, OSError):
            pass

    def _reply_option(self, conn, option, reply, data=b""):
        conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, option, reply, len(data)) + data)

    def _handshake(self, conn):
        conn.sendall(NBDMAGIC + IHAVEOPT + struct.pack(">H", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack(">I", _recv_exact(conn, 4))
        while True:
            magic, option, length = struct.unpack(">8sII", _recv_exact(conn, 16))
            if magic != IHAVEOPT or length > 65536:
                return False
            _recv_exact(conn, length)
            if option == OPT_EXPORT_NAME:
                zeroes = b"" if client_flags & FLAG_NO_ZEROES else b"\0" * 124
                conn.sendall(struct.pack(">QH", self.size, self.tflags) + zeroes)
                return True
            if option in (OPT_INFO, OPT_GO):
                self._reply_option(conn, option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size, self.tflags))
                self._reply_option(conn, option, REP_INFO,
                                   struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_READ))
                self._reply_option(conn, option, REP_ACK)
                if option == OPT_GO:
                    return True
            elif option == OPT_ABORT:
                self._reply_option(conn, option, REP_ACK)
                return False
            else:
                self._reply_option(conn, option, REP_ERR_UNSUP)

    def _transmission(self, conn):
        send_lock = threading.Lock()
        fd = os.open(self.path, os.O_RDONLY)

        def reply(cookie, error):
            with send_lock:
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie))

        def read(cookie, offset, length):
            try:
                self.download.wait_for(offset, offset + length)
                with send_lock:
                    # The header, then the bytes straight from the page cache (sendfile: no copy here).
                    conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))
                    sent = 0
                    while sent < length:
                        n = os.sendfile(conn.fileno(), fd, offset + sent, length - sent)
                        if not n:
                            raise EOFError("staging file shorter than the export")
                        sent += n
            except TransferFailed:
                reply(cookie, EIO)
            except (OSError, EOFError):
                try:  # a reply cut short leaves the stream unusable: hang up so the client sees it
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        with ThreadPoolExecutor(max_workers=16) as pool:
            try:
                while True:
                    magic, _flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", _recv_exact(conn, 28))
                    if magic != REQUEST_MAGIC:
                        return
                    if kind == CMD_DISC:
                        return
                    if kind == CMD_READ:
                        if length > MAX_READ or offset + length > self.size:
                            reply(cookie, EINVAL)
                        else:
                            pool.submit(read, cookie, offset, length)
                    elif kind == CMD_FLUSH:
                        reply(cookie, 0)
                    else:
                        reply(cookie, EPERM)
            finally:
                os.close(fd)


def ssh_server_address():
    """The local address this SSH session arrived on (``SSH_CONNECTION``'s third field)."""
    fields = os.environ.get("SSH_CONNECTION", "").split()
    return fields[2] if len(fields) == 4 else None


def main(argv):
    with open(argv[1]) as f:
        config = json.load(f)
    size, path = int(config["size"]), config["path"]
    bind = config.get("bind")
    config["bind_address"] = ssh_server_address() if bind == "ssh" else bind
    compressed = config.get("container") in DECOMPRESSORS
    fetch_size = int(config["object_size"]) if compressed else size
    download = Download(fetch_size, config.get("present", []), int(config.get("chunk_bytes", 8 * PIECE)))

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    source = download  # what readers and the end of the transfer wait for
    fetch_fd = fd
    if compressed:
        fetch_fd = os.open(config["object_path"], os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fetch_fd, fetch_size)
        source = Inflow(config, download, fetch_fd, fd)
        source.start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(config["socket"])
    listener.listen(16)
    threading.Thread(target=NbdExport(path, size, source).serve, args=(listener,), daemon=True).start()

    started = time.monotonic()
    fetchers = [threading.Thread(target=Fetcher(config, download, fetch_fd).run, daemon=True)
                for _ in range(max(1, int(config.get("connections", 4))))]
    for thread in fetchers:
        thread.start()
    emit("ready", size=size, to_fetch=sum(c.hi - c.lo for c in download.chunks), bind=config["bind_address"])

    parent = os.getppid()

    def hung_up(signum, frame):
        """The session or the worker is going down: leave no copy of the image behind."""
        if config.get("directory"):
            shutil.rmtree(config["directory"], ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, hung_up)
    signal.signal(signal.SIGHUP, hung_up)

    def orphaned():
        """The SSH session that started us is gone: nobody will read or stop us."""
        if os.getppid() == parent:
            return False
        if config.get("directory"):
            shutil.rmtree(config["directory"], ignore_errors=True)
        return True

    interval = float(config.get("progress_seconds", 2.0))
    last = time.monotonic()
    try:
        while not source.wait_complete(0.1):
            if orphaned():
                return 4
            if stop_requested(config["stop_file"]) == "abort":
                emit("aborted", fetched=download.fetched)
                return 3
            if time.monotonic() - last >= interval:
                last = time.monotonic()
                emit("progress", fetched=download.fetched, size=size)
    except TransferFailed as exc:
        emit("failed", error=str(exc), fetched=download.fetched, code=exc.code)
        sys.stderr.write("transfer failed: %s\n" % exc)
        return 1
    emit("fetched", fetched=download.fetched, size=size, seconds=round(time.monotonic() - started, 3))
    while stop_requested(config["stop_file"]) is None:
        if orphaned():
            return 4
        time.sleep(0.05)
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
