"""The fetched bytes held against the digest an OVA's manifest gives for them."""

import hashlib
import threading

from .events import Refused, TransferFailed
from .files import PIECE, pread_into


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


def check_digest(hasher, expected, what):
    if hasher.hexdigest() != expected.lower():
        raise Refused("ova-digest-mismatch", "the bytes of %s do not match their %s in the manifest"
                      % (what, hasher.name.upper()))
