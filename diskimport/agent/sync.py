"""``python3 agent.pyz sync CONFIG``: a writable NBD export of a device that writes only what differs.

A sync writes a new version of a disk onto the volume that holds an earlier one. qemu-img
converts the image as always, but onto this export instead of the device: each write is
compared with what the device holds, a block and then a page (4 KiB) at a time, and only the
pages that differ are written (zeros too: zeros are written only where the device does not
read zeros).
Reads return the device's bytes. What was compared, written and left alone is counted and
reported when the program stops.

The configuration (JSON):

    device       the block device (or file) to write
    socket       the unix socket to serve NBD on
    stop_file    once this file exists, the program reports and exits
    block_bytes  the first unit of comparison (default 65536); a block that differs is compared
                 again by page

Events on stdout, one JSON object a line: ``ready``; ``synced`` with ``compared``, ``written``,
``zeroed`` (bytes of zeros written), ``unchanged`` and ``requests``; ``failed`` with ``error``.
"""

import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .events import emit, stop_requested
from .files import file_size, pread_into
from .nbd import (CMD_DISC, CMD_FLUSH, CMD_READ, EINVAL, EIO, MAX_READ, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                  REPLY_TYPE_OFFSET_DATA, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
                  TFLAG_CAN_MULTI_CONN, TFLAG_HAS_FLAGS, NbdExport, recv_exact)

CMD_WRITE, CMD_WRITE_ZEROES = 1, 6
TFLAG_SEND_FLUSH, TFLAG_SEND_WRITE_ZEROES = 1 << 2, 1 << 6
ENOSPC = 28
PAGE = 4096
ZERO_CHUNK = 4 * 1024 * 1024
ZEROS = bytes(ZERO_CHUNK)


class NoSource(object):
    """The export serves no download: it never offers zero extents."""
    knows_zeros = False


class Counts(object):
    def __init__(self):
        self.lock = threading.Lock()
        self.compared = self.written = self.zeroed = self.requests = 0

    def add(self, compared, written, zeroed):
        with self.lock:
            self.compared += compared
            self.written += written
            self.zeroed += zeroed
            self.requests += 1

    def report(self):
        return {"compared": self.compared, "written": self.written, "zeroed": self.zeroed,
                "unchanged": self.compared - self.written - self.zeroed, "requests": self.requests}


class SyncExport(NbdExport):
    """The device as a writable NBD export (fixed newstyle, simple replies) whose writes skip equal blocks."""

    def __init__(self, device, block_bytes):
        self.fd = os.open(device, os.O_RDWR)
        NbdExport.__init__(self, device, file_size(self.fd), NoSource())
        self.tflags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN
        self.block = block_bytes
        self.counts = Counts()

    def write(self, offset, data):
        """Write the pieces of ``data`` (bytes, at ``offset``) that the device does not hold already.

        Compared whole first, then a block (``block_bytes``) at a time; a block that differs is
        compared again a page (4 KiB) at a time, and only its differing pages are written, as runs.
        (Compared as bytes: a memoryview compares item by item.)
        """
        current = os.pread(self.fd, len(data), offset)
        if len(current) != len(data):
            raise OSError(ENOSPC, "write past the end of the device")
        written = zeroed = 0
        if current != data:
            for start in range(0, len(data), self.block):
                end = min(start + self.block, len(data))
                if current[start:end] == data[start:end]:
                    continue
                for run_start, run_end in _differing_runs(current, data, start, end):
                    piece = data[run_start:run_end]
                    _pwrite_all(self.fd, piece, offset + run_start)
                    if piece.count(0) == len(piece):
                        zeroed += len(piece)
                    else:
                        written += len(piece)
        self.counts.add(len(data), written, zeroed)

    def write_zeroes(self, offset, length):
        """Zeros where the device does not read zeros already: read a chunk at a time into one buffer
        (the zeros qemu-img asks for are most of a disk, and fresh buffers cost a page fault a page),
        and only a chunk that is not all zeros is written as :meth:`write` writes."""
        buffer = bytearray(ZERO_CHUNK)
        pos, end = offset, offset + length
        while pos < end:
            n = min(ZERO_CHUNK, end - pos)
            view = memoryview(buffer)[:n]
            if pread_into(self.fd, view, pos) != n:
                raise OSError(ENOSPC, "write past the end of the device")
            if (buffer if n == ZERO_CHUNK else buffer[:n]) == (ZEROS if n == ZERO_CHUNK else ZEROS[:n]):
                self.counts.add(n, 0, 0)
            else:
                self.write(pos, bytes(n))
            pos += n

    def _transmission(self, conn, structured, block_status):
        send_lock = threading.Lock()

        def reply(cookie, error, read_at=None, data=b""):
            """A simple reply; a read's is structured once the client asked for structured replies."""
            if structured and read_at is not None:
                if error:
                    message = os.strerror(error).encode()
                    head = struct.pack(">IHHQIIH", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR,
                                       cookie, 6 + len(message), error, len(message)) + message
                else:
                    head = struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA,
                                       cookie, 8 + len(data), read_at)
            else:
                head = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie)
            with send_lock:
                conn.sendall(head + data if data else head)

        def run(cookie, work, read_at=None):
            try:
                data = work()
            except OSError as exc:
                reply(cookie, exc.errno if exc.errno in (ENOSPC, EINVAL) else EIO, read_at)
            else:
                reply(cookie, 0, read_at, data if read_at is not None else b"")

        with ThreadPoolExecutor(max_workers=8) as pool:
            while True:
                magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", recv_exact(conn, 28))
                if magic != REQUEST_MAGIC or kind == CMD_DISC:
                    return
                payload = recv_exact(conn, length) if kind == CMD_WRITE else None
                if kind in (CMD_READ, CMD_WRITE, CMD_WRITE_ZEROES) and (offset + length > self.size
                                                                        or length > MAX_READ and kind != CMD_WRITE_ZEROES):
                    reply(cookie, EINVAL, offset if kind == CMD_READ else None)
                elif kind == CMD_READ:
                    pool.submit(run, cookie, lambda o=offset, n=length: os.pread(self.fd, n, o), offset)
                elif kind == CMD_WRITE:
                    pool.submit(run, cookie, lambda o=offset, d=payload: self.write(o, d))
                elif kind == CMD_WRITE_ZEROES:
                    pool.submit(run, cookie, lambda o=offset, n=length: self.write_zeroes(o, n))
                elif kind == CMD_FLUSH:
                    # replies to the writes before it were sent once written; fsync makes them durable
                    pool.submit(run, cookie, lambda: os.fsync(self.fd))
                else:
                    reply(cookie, EINVAL)


def _differing_runs(old, new, start, end):
    """The runs of pages (4 KiB) in [start, end) where ``old`` and ``new`` differ, as (start, end) pairs."""
    runs = []
    for page in range(start, end, PAGE):
        stop = min(page + PAGE, end)
        if old[page:stop] == new[page:stop]:
            continue
        if runs and runs[-1][1] == page:
            runs[-1][1] = stop
        else:
            runs.append([page, stop])
    return runs


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def main(config_path):
    parent = os.getppid()
    with open(config_path) as f:
        config = json.load(f)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(128 + signum))
    signal.signal(signal.SIGHUP, lambda signum, frame: os._exit(128 + signum))
    try:
        export = SyncExport(config["device"], int(config.get("block_bytes", 65536)))
        if os.path.exists(config["socket"]):
            os.unlink(config["socket"])
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(config["socket"])
        os.chmod(config["socket"], 0o600)
        listener.listen(16)
    except (OSError, KeyError, ValueError) as exc:
        emit("failed", error="cannot serve %s: %s" % (config.get("device"), exc))
        return 1
    threading.Thread(target=export.serve, args=(listener,), daemon=True).start()
    emit("ready", size=export.size)
    while stop_requested(config["stop_file"]) is None:
        if not os.getppid() == parent != 1:  # the session that started us is gone
            return 4
        time.sleep(0.05)
    os.fsync(export.fd)
    emit("synced", **export.counts.report())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
