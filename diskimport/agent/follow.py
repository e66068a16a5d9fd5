"""Uploading a file while it is still being written: its parts go as it grows, changed ones again."""

import json
import os
import threading
import time

from .files import file_size, pread_into
from .parts import UploadFailed, content_md5, part_count


class Follower(object):
    """Following a file that is being written: releases its parts as it grows, and once it is
    final (the done file), the rest, then every part sent before that whose bytes changed."""

    def __init__(self, config, parts, fd, hasher_for):
        follow = config["follow"]
        self.done_file = follow["done_file"]
        self.hold_back = int(follow.get("hold_back", 0))
        self.part_bytes = int(config["part_bytes"])
        self.parts, self.fd, self.hasher_for = parts, fd, hasher_for
        self.released = 0
        self.hasher = None

    def start(self):
        threading.Thread(target=self._guarded, daemon=True).start()

    def _guarded(self):
        try:
            self._run()
        except UploadFailed as exc:
            self.parts.fail(exc)
        except Exception as exc:
            self.parts.fail(UploadFailed("internal", "unexpected error following the file: %r" % (exc,)))

    def _release_to(self, count):
        if count > self.released:
            self.parts.release(list(range(self.released + 1, count + 1)))
            self.released = count

    def _run(self):
        parts = self.parts
        while not os.path.exists(self.done_file):
            if parts.error is not None:
                return
            size = file_size(self.fd)
            with parts.cond:
                parts.size = max(parts.size, size)
            self._release_to(max(0, (size - self.hold_back) // self.part_bytes))
            time.sleep(0.05)
        with open(self.done_file) as f:
            status = f.read().strip()
        recheck = None
        if status.startswith("{"):  # {"status": "ok", "recheck": [[start, end], ...]}
            try:
                done = json.loads(status)
                status = str(done["status"])
                recheck = [(int(a), int(b)) for a, b in done.get("recheck") or []] if "recheck" in done else None
            except (ValueError, KeyError, TypeError) as exc:
                raise UploadFailed("bad-config", "the done file is not understood: %r" % (exc,))
        if status != "ok":
            raise UploadFailed("source-failed", "the file's writer failed: %s" % status[:500])
        size = file_size(self.fd)
        count = part_count(size, self.part_bytes)
        if self.released * self.part_bytes > size:
            raise UploadFailed("file-error", "the file shrank to %d bytes below parts already sent" % size)
        with parts.cond:
            parts.size, parts.final = size, True
        self.hasher = self.hasher_for(size)
        self._release_to(count)
        resent = self._resend_changed(size, recheck)
        parts.events.put({"event": "final", "size": size, "parts": count, "resent": resent})
        parts.close()

    def _may_change(self, number, recheck):
        if recheck is None:
            return True
        start = (number - 1) * self.part_bytes
        end = start + self.part_bytes
        return any(a < end and b > start for a, b in recheck)

    def _resend_changed(self, size, recheck=None):
        """Read again each part sent before the file was final (those overlapping ``recheck``, the
        ranges the writer says it may have rewritten, when it says); send again those that changed."""
        parts, checked, resent = self.parts, set(), 0
        buf = bytearray(self.part_bytes)
        while True:
            with parts.cond:
                todo = [(n, md5) for n, md5 in parts.early.items() if n not in checked]
                if not todo and parts.remaining == 0:
                    return resent
                if not todo:
                    parts.cond.wait(0.2)
                    if parts.error is not None:
                        return resent
                    continue
            for number, md5 in todo:
                checked.add(number)
                if not self._may_change(number, recheck):
                    continue
                start = (number - 1) * self.part_bytes
                view = memoryview(buf)[:max(0, min(self.part_bytes, size - start))]
                got = 0
                while got < len(view):
                    n = pread_into(self.fd, view[got:], start + got)
                    if not n:
                        raise UploadFailed("file-error", "the file ends at byte %d while checking part %d"
                                           % (start + got, number))
                    got += n
                if content_md5(view) != md5:
                    resent += 1
                    parts.release([number])
