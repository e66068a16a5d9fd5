"""The parts of a multipart upload: which are still to send, their ETags, and what ends an upload."""

import base64
import hashlib
from .completion import Completion


MAX_PARTS = 10000


class UploadFailed(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


def content_md5(data):
    """The base64 MD5 of ``data``; None where MD5 is unavailable (a FIPS host): the header is optional."""
    try:
        try:
            hasher = hashlib.md5(usedforsecurity=False)
        except TypeError:  # before Python 3.9
            hasher = hashlib.md5()
    except ValueError:
        return None
    hasher.update(data)
    return base64.b64encode(hasher.digest()).decode("ascii")


class Parts(Completion):
    """The parts still to send, handed out in order; their ETags; the first failure.

    All parts are known at the start (``closed``), or, following a file, released as it grows
    until :meth:`close`; until then a sender that finds none waits for more. Complete once
    every part released is sent (:meth:`wait_complete`)."""

    def __init__(self, numbers, events, size, closed=True):
        Completion.__init__(self)
        self.todo = list(reversed(numbers))
        self.remaining = len(numbers)
        self.etags = {}
        self.uploaded = 0
        self.events = events
        self.size = size          # of the file: growing while followed
        self.closed = closed      # no part will be released any more
        self.final = closed       # the file's bytes no longer change
        self.early = {}           # parts read before the file was final: {number: MD5 sent}

    def _complete(self):
        return self.remaining == 0

    def take(self):
        with self.cond:
            while not self.todo and not self.closed and self.error is None:
                self.cond.wait(0.5)
            if self.error is not None or not self.todo:
                return None
            return self.todo.pop()

    def release(self, numbers):
        """More parts to send (new ones, or changed ones again)."""
        with self.cond:
            self.todo = list(reversed(numbers)) + self.todo
            self.remaining += len(numbers)
            self.cond.notify_all()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def sent(self, number, size, etag, md5=None, final=True):
        with self.cond:
            self.etags[number] = etag
            self.uploaded += size
            self.remaining -= 1
            if not final:
                self.early[number] = md5
            self.events.put({"event": "part", "part": number, "bytes": size, "uploaded": self.uploaded})
            self.cond.notify_all()


def plan(config, size):
    """The number of parts, and the parts already uploaded ({number: etag})."""
    part_bytes = int(config["part_bytes"])
    if part_bytes < 1 or int(config.get("connections", 4)) < 1:
        raise UploadFailed("bad-config", "part_bytes and connections must be at least 1")
    if config.get("digest") not in (None, "sha256"):
        raise UploadFailed("bad-config", "digest must be \"sha256\" or null, not %r" % (config["digest"],))
    count = part_count(size, part_bytes)
    skip = {}
    for key, etag in (config.get("skip_parts") or {}).items():
        if not str(key).isdigit() or not 1 <= int(key) <= count or not etag:
            raise UploadFailed("bad-config", "skip_parts names part %r, not one of the %d parts" % (key, count))
        skip[int(key)] = etag
    return count, skip


def part_count(size, part_bytes):
    """How many parts ``size`` bytes are (one at least); more than an upload may have is refused."""
    count = max(1, -(-size // part_bytes))
    if count > MAX_PARTS:
        raise UploadFailed("bad-config", "%d bytes in parts of %d bytes are %d parts; at most %d are allowed"
                           % (size, part_bytes, count, MAX_PARTS))
    return count
