"""Runs of a disk written onto the device, each read back and compared; the rest checked to be zeros."""

import errno
import fcntl
import mmap
import os
import queue
import stat
import struct
import threading

from .events import TransferFailed
from .files import PIECE, SEEK_DATA, SEEK_HOLE, pread_into, punch_hole

SECTOR = 512
WRITE_BATCH = 8 * PIECE  # the device is written and read back in runs of up to this much
WRITE_BUFFERS = 4
O_DIRECT = getattr(os, "O_DIRECT", 0)
BLKZEROOUT = 0x127F
DIRECT_ALIGN = 4096


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
