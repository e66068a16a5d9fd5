"""Reading and freeing bytes of the staging file and the device, on any Python 3.6 or newer."""

import os

PIECE = 1024 * 1024  # the unit of a receive, and what chunks and batches are counted in
SEEK_DATA, SEEK_HOLE = getattr(os, "SEEK_DATA", 3), getattr(os, "SEEK_HOLE", 4)
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


def file_size(fd):
    """The size of a file or a block device (whose st_size is 0)."""
    return os.lseek(fd, 0, os.SEEK_END)
