"""A read-only NBD server on a unix socket, serving the image while it arrives."""

import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from .events import TransferFailed


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


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise EOFError("NBD client went away")
        buf += data
    return bytes(buf)


class NbdExport(object):
    """A read-only NBD export of the file being downloaded (fixed newstyle handshake), whose
    bytes its ``source`` (an :class:`~.source.NbdSource`) says when to send.

    Structured replies are offered; with them, a source that knows where its zeros are
    (``knows_zeros``: a decompression's) answers ``NBD_CMD_BLOCK_STATUS`` in the
    ``base:allocation`` context, so qemu-img skips those runs instead of reading them.
    """

    def __init__(self, path, size, source):
        self.path, self.size, self.source = path, size, source
        self.tflags = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN

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
        (client_flags,) = struct.unpack(">I", recv_exact(conn, 4))
        structured = block_status = False
        while True:
            magic, option, length = struct.unpack(">8sII", recv_exact(conn, 16))
            if magic != IHAVEOPT or length > 65536:
                return None
            data = recv_exact(conn, length)
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
                offered = self.source.knows_zeros and (
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
                if parts is None:  # (a window's: pieces of the file, pinned, and bytes fetched again)
                    parts = self.source.acquire(offset, offset + length)
                with send_lock:
                    # The header, then the bytes straight from the page cache (sendfile: no copy here).
                    if structured:
                        conn.sendall(struct.pack(">IHHQIQ", STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                                 REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset))
                    else:
                        conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, cookie))
                    for data, where, _ in parts:
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
                if parts is not None:
                    self.source.release(parts)

        def status(cookie, flags, offset, length):
            try:
                extents = self.source.extents(offset, length, 1 if flags & CMD_FLAG_REQ_ONE else MAX_EXTENTS)
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
                    magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", recv_exact(conn, 28))
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
                            parts = self.source.ready(offset, offset + length)
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
