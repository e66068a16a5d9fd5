#!/usr/bin/env python3
"""Runs on the worker: upload one local file (or block device) as the parts of a multipart
upload created through a pre-authenticated request, with parallel persistent connections.

The worker holds no credentials: the orchestrator makes a write PAR for the object, creates
the upload through it (``opc-multipart: true``) and hands this program the upload's
``accessUri``; each part N is a ``PUT <endpoint><accessUri><N>``. The program does not
commit: it reports every part's ETag and the orchestrator commits (or aborts).

The orchestrator copies this file to the worker beside ``streamer.py`` (whose persistent
connection, bind fallback and event output it shares) and runs it with the worker's
``python3`` (standard library only, Python 3.6 or newer). It reads a JSON configuration file,
readable by the worker user alone, since the access URI is a bearer secret (never printed):

    endpoint     scheme://host:port of Object Storage
    access_uri   the upload's accessUri (``/p/.../u/<object>/id/<uploadId>/``)
    path         the file (or device) to upload; its size is read once, at the start
    part_bytes   the size of every part but the last (which is shorter)
    connections  parallel HTTP connections (each a persistent keep-alive connection); each
                 holds at most one part in memory, read from the file when it is sent
    bind         "ssh" (the address this SSH session arrived on), an address, or null
    digest       "sha256": the whole file hashed in order, read once by a thread of its own
                 beside the upload; null for none
    skip_parts   {"N": etag} parts already uploaded (a resumed upload): not sent again, and
                 reported with the others
    max_attempts failures in a row of one part before the upload fails (default 10)
    timeout_seconds  per socket operation (default 60)
    follow       {"done_file": F, "hold_back": B}: the file is still being written (a converter
                 appending to it). Parts are sent once the file has grown ``B`` bytes past
                 their end; when ``F`` exists (holding "ok", or why the writer failed) the file
                 is final: the rest is sent, and every part sent before then is read again and
                 sent again if its bytes changed since (a converter rewrites its metadata), so
                 the parts always hold the final file. The digest is taken of the final file.
                 The done file may instead hold {"status": "ok", "recheck": [[start, end], ...]}:
                 the only ranges the writer may have rewritten, so only parts overlapping them
                 are read again.

Every part is sent with its Content-MD5. A transient failure (a 429 or 5xx reply, a reset or
timed-out connection) is retried with backoff; a 401, 403 or 404 (the PAR or the upload is
gone) ends the upload at once. Events go to stdout as JSON lines:

    {"event": "ready", "size": S, "parts": P, "to_upload": U, "bind": address-or-null}
                        (following a file: S, P and U are null until it is final, then)
    {"event": "final", "size": S, "parts": P, "resent": R}   (R: parts sent again, changed)
    {"event": "part", "part": N, "bytes": B, "uploaded": bytes sent so far}
    {"event": "retry", "part": N, "attempt": K, "error": "..."}
    {"event": "unbound", "address": A, "error": "..."}   (``bind`` is no address of this host)
    {"event": "done", "parts": {"N": etag, ...}, "bytes": S, "uploaded": U, "sha256": hex-or-null,
     "seconds": T}      (bytes: the file's size, the object's once committed; uploaded: sent by this run)
    {"event": "failed", "code": "...", "message": "..."}   (then exit status 1)

Failure codes: ``par-refused`` (401/403/404), ``http-error`` (another 4xx), ``retries-exhausted``,
``file-error`` (unreadable, or shorter than at the start), ``bad-config``, ``internal``, and
``source-failed`` (following a file: its writer failed, as the done file says).
SIGTERM or SIGHUP ends the program at once (status 128 + the signal), as does the end of the
SSH session that started it (status 4): nobody would commit what it sent.
"""

import base64
import hashlib
import http.client
import json
import os
import signal
import sys
import threading
import time
import queue
from urllib.parse import urlsplit

# Copied beside this program by the orchestrator: the same connection code and event output.
from streamer import Download, Fetcher, emit, pread_into, ssh_server_address

MAX_PARTS = 10000
HASH_STEP = 8 * 1024 * 1024


class UploadFailed(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


class _Retryable(Exception):
    pass


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


class Redactor(object):
    """Keeps the access URI (a bearer secret) and its token out of every message."""

    def __init__(self, access_uri):
        pieces = access_uri.split("/")
        self.secrets = [s for s in (access_uri, pieces[2] if len(pieces) > 2 and pieces[1] == "p" else "") if s]

    def __call__(self, text):
        text = str(text)
        for secret in self.secrets:
            text = text.replace(secret, "<access-uri>" if secret.startswith("/") else "<token>")
        return text


class Parts(object):
    """The parts still to send, handed out in order; their ETags; the first failure.

    All parts are known at the start (``closed``), or, following a file, released as it grows
    until :meth:`close`; until then a sender that finds none waits for more."""

    # The streamer's download waits and fails the same way: on ``cond``, ``remaining`` and ``error``.
    fail = Download.fail
    wait_complete = Download.wait_complete  # whether every part is sent; raises the first failure

    def __init__(self, numbers, events, size, closed=True):
        self.todo = list(reversed(numbers))
        self.remaining = len(numbers)
        self.etags = {}
        self.uploaded = 0
        self.error = None
        self.events = events
        self.cond = threading.Condition()
        self.size = size          # of the file: growing while followed
        self.closed = closed      # no part will be released any more
        self.final = closed       # the file's bytes no longer change
        self.early = {}           # parts read before the file was final: {number: MD5 sent}

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


class Sender(object):
    """One persistent HTTP connection uploading parts until none are left."""

    # The streamer's connection: persistent, from the bind address, falling back to routing's choice.
    _connect = Fetcher._connect
    _connection = Fetcher._connection
    _close = Fetcher._close

    def __init__(self, config, parts, fd, redact):
        self.url = urlsplit(config["endpoint"])
        access_uri = config["access_uri"]
        self.prefix = access_uri if access_uri.endswith("/") else access_uri + "/"
        self.part_bytes = int(config["part_bytes"])
        self.bind = config.get("bind_address")
        self.max_attempts = int(config.get("max_attempts", 10))
        self.timeout = float(config.get("timeout_seconds", 60))
        self.parts, self.fd, self.redact = parts, fd, redact
        self.conn = None
        self.buf = None  # one part, reused

    def run(self):
        try:
            while True:
                number = self.parts.take()
                if number is None:
                    return
                self._upload(number)
        except UploadFailed as exc:
            self.parts.fail(exc)
        except Exception as exc:  # a bug must not leave the upload waiting forever
            self.parts.fail(UploadFailed("internal", "unexpected error: %r" % (exc,)))
        finally:
            self._close()

    def _read(self, number):
        size = self.parts.size
        start = (number - 1) * self.part_bytes
        length = max(0, min(self.part_bytes, size - start))
        if self.buf is None:
            self.buf = bytearray(self.part_bytes if not self.parts.final else min(self.part_bytes, size) or 1)
        view = memoryview(self.buf)[:length]
        got = 0
        while got < length:
            n = pread_into(self.fd, view[got:], start + got)
            if not n:
                raise UploadFailed("file-error", "the file ends at byte %d, within part %d (it was %d bytes)"
                                   % (start + got, number, size))
            got += n
        return view

    def _upload(self, number):
        final = self.parts.final  # before the read: a read that starts once the file is final reads it final
        view = self._read(number)
        md5 = content_md5(view)
        failures = 0
        while self.parts.error is None:
            try:
                etag = self._put(number, view, md5)
            except (OSError, http.client.HTTPException, _Retryable) as exc:
                self._close()
                failures += 1
                if failures >= self.max_attempts:
                    raise UploadFailed("retries-exhausted", "part %d failed %d times in a row, last: %s"
                                       % (number, failures, self.redact(exc)))
                self.parts.events.put({"event": "retry", "part": number, "attempt": failures,
                                       "error": self.redact(exc)[:200]})
                time.sleep(min(8.0, 0.25 * 2 ** (failures - 1)))
                continue
            self.parts.sent(number, len(view), etag, md5, final)
            return

    def _put(self, number, view, md5):
        if self.conn is None:
            self.conn = self._connect()
        headers = {"Content-Length": str(len(view)), "Content-Type": "application/octet-stream"}
        if md5:
            headers["Content-MD5"] = md5
        try:
            self.conn.request("PUT", self.prefix + str(number), body=view, headers=headers)
        except OSError:
            # A server that refuses a part may answer before reading its body and hang up: the
            # send fails, but its answer (a 404: the PAR is gone) is what counts, if it arrived.
            try:
                reply = self.conn.getresponse()
            except (OSError, http.client.HTTPException):
                reply = None
            if reply is None or reply.status < 400:
                raise
        else:
            reply = self.conn.getresponse()
        body = reply.read(65536)
        if reply.will_close:
            self._close()
        if reply.status == 200 and reply.getheader("ETag"):
            return reply.getheader("ETag")
        if reply.status == 429 or reply.status >= 500:
            raise _Retryable("HTTP %d" % reply.status)
        detail = "part %d: HTTP %d %s" % (number, reply.status, body.decode("utf-8", "replace")[:300])
        if reply.status in (401, 403, 404):
            raise UploadFailed("par-refused", "the PAR or the upload is gone or refuses writes: " + detail)
        raise UploadFailed("http-error", detail)


class Hasher(object):
    """The whole file hashed in order by a thread of its own, each byte read once.

    (The streamer's ``Digest`` hashes as this does, but follows a download and checks a digest
    it was given, keeping none: this one has nothing to wait for and reports what it found.)"""

    def __init__(self, path, size, parts):
        self.hasher = hashlib.sha256()
        self.path, self.size, self.parts = path, size, parts
        self.done = threading.Event()

    def start(self):
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                buf = memoryview(bytearray(min(HASH_STEP, self.size) or 1))
                pos = 0
                while pos < self.size:
                    got = pread_into(fd, buf[:min(HASH_STEP, self.size - pos)], pos)
                    if not got:
                        raise UploadFailed("file-error", "the file ends at byte %d while hashing it" % pos)
                    self.hasher.update(buf[:got])
                    pos += got
            finally:
                os.close(fd)
        except UploadFailed as exc:
            self.parts.fail(exc)
            return
        except Exception as exc:
            self.parts.fail(UploadFailed("file-error", "hashing failed: %r" % (exc,)))
            return
        self.done.set()

    def hexdigest(self):
        return self.hasher.hexdigest()


def file_size(fd):
    """The size of a file or a block device (whose st_size is 0)."""
    return os.lseek(fd, 0, os.SEEK_END)


def plan(config, size):
    """The number of parts, and the parts already uploaded ({number: etag})."""
    part_bytes = int(config["part_bytes"])
    if part_bytes < 1 or int(config.get("connections", 4)) < 1:
        raise UploadFailed("bad-config", "part_bytes and connections must be at least 1")
    if config.get("digest") not in (None, "sha256"):
        raise UploadFailed("bad-config", "digest must be \"sha256\" or null, not %r" % (config["digest"],))
    count = max(1, -(-size // part_bytes))
    if count > MAX_PARTS:
        raise UploadFailed("bad-config", "%d bytes in parts of %d bytes are %d parts; at most %d are allowed"
                           % (size, part_bytes, count, MAX_PARTS))
    skip = {}
    for key, etag in (config.get("skip_parts") or {}).items():
        if not str(key).isdigit() or not 1 <= int(key) <= count or not etag:
            raise UploadFailed("bad-config", "skip_parts names part %r, not one of the %d parts" % (key, count))
        skip[int(key)] = etag
    return count, skip


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
        count = max(1, -(-size // self.part_bytes))
        if count > MAX_PARTS:
            raise UploadFailed("bad-config", "%d bytes in parts of %d bytes are %d parts; at most %d are allowed"
                               % (size, self.part_bytes, count, MAX_PARTS))
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


def upload(config, orphaned):
    redact = Redactor(config["access_uri"])
    try:
        fd = os.open(config["path"], os.O_RDONLY)
        size = file_size(fd)
    except OSError as exc:
        raise UploadFailed("file-error", "cannot read %s: %s" % (config["path"], exc))
    events = queue.Queue()
    started = time.monotonic()
    hashers = []

    def hasher_for(final_size):
        if config.get("digest"):
            hashers.append(Hasher(config["path"], final_size, parts))
            hashers[-1].start()

    follower = None
    if config.get("follow"):
        if config.get("skip_parts"):
            raise UploadFailed("bad-config", "a followed file cannot resume with skip_parts")
        plan(config, 0)
        skip = {}
        parts = Parts([], events, size, closed=False)
        follower = Follower(config, parts, fd, hasher_for)
        follower.start()
        count = None
    else:
        count, skip = plan(config, size)
        parts = Parts([n for n in range(1, count + 1) if n not in skip], events, size)
        hasher_for(size)
    connections = int(config.get("connections", 4))
    senders = [Sender(config, parts, fd, redact)
               for _ in range(connections if follower else min(connections, parts.remaining))]
    for sender in senders:
        threading.Thread(target=sender.run, daemon=True).start()
    emit("ready", size=None if follower else size, parts=count, to_upload=None if follower else parts.remaining,
         bind=config.get("bind_address"))

    def drain():
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            emit(event.pop("event"), **event)

    def finished():
        return (parts.wait_complete(0.1) and parts.closed
                and all(h.done.wait(0.1) for h in hashers) and (not config.get("digest") or hashers))

    try:
        while not finished():
            if orphaned():
                return 4
            drain()
    except UploadFailed:
        drain()  # every part sent before the failure is reported: a resumed upload skips it
        raise
    drain()
    etags = dict(skip)
    etags.update(parts.etags)
    emit("done", parts={str(n): etags[n] for n in sorted(etags)}, bytes=parts.size, uploaded=parts.uploaded,
         sha256=hashers[0].hexdigest() if hashers else None,
         seconds=round(time.monotonic() - started, 3))
    return 0


def main(argv):
    # Who started us, learned first: a session that ends while we start up must still be
    # noticed. Parent 1: it has already ended.
    parent = os.getppid()

    def hung_up(signum, frame):
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, hung_up)
    signal.signal(signal.SIGHUP, hung_up)
    with open(argv[1]) as f:
        config = json.load(f)
    bind = config.get("bind")
    config["bind_address"] = ssh_server_address() if bind == "ssh" else bind

    def orphaned():
        """The SSH session that started us is gone: nobody will commit what we send."""
        return not os.getppid() == parent != 1

    redact = Redactor(config.get("access_uri") or "")
    try:
        for key in ("endpoint", "access_uri", "path", "part_bytes"):
            if not config.get(key):
                raise UploadFailed("bad-config", "the configuration has no %s" % key)
        return upload(config, orphaned)
    except UploadFailed as exc:
        failure = (exc.code, redact(exc))
    except BrokenPipeError:  # stdout is gone with the session
        return 4
    except Exception as exc:
        failure = ("internal", redact("unexpected error: %r" % (exc,)))
    emit("failed", code=failure[0], message=failure[1])
    sys.stderr.write("upload failed (%s): %s\n" % failure)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
