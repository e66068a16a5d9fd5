"""The ``upload`` program: upload one local file (or block device) as the parts of a multipart
upload created through a pre-authenticated request, with parallel persistent connections.

The worker holds no credentials: the orchestrator makes a write PAR for the object, creates
the upload through it (``opc-multipart: true``) and hands this program the upload's
``accessUri``; each part N is a ``PUT <endpoint><accessUri><N>``. The program does not
commit: it reports every part's ETag and the orchestrator commits (or aborts).

The orchestrator ships the package to the worker and runs ``python3 agent.pyz upload CONFIG``
with the worker's ``python3`` (standard library only, Python 3.6 or newer); the stream's
persistent connection, bind fallback and event output serve it too. CONFIG is a JSON file,
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

import hashlib
import http.client
import json
import os
import queue
import signal
import sys
import threading
import time

from .connection import PersistentConnection, Retryable, ssh_server_address
from .events import emit
from .files import file_size, pread_into
from .follow import Follower
from .parts import Parts, UploadFailed, content_md5, plan


HASH_STEP = 8 * 1024 * 1024


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


class Sender(PersistentConnection):
    """One persistent HTTP connection uploading parts until none are left."""

    def __init__(self, config, parts, fd, redact):
        PersistentConnection.__init__(self, config["endpoint"], config.get("bind_address"),
                                      float(config.get("timeout_seconds", 60)))
        access_uri = config["access_uri"]
        self.prefix = access_uri if access_uri.endswith("/") else access_uri + "/"
        self.part_bytes = int(config["part_bytes"])
        self.max_attempts = int(config.get("max_attempts", 10))
        self.parts, self.fd, self.redact = parts, fd, redact
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
            self.close()

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
            except (OSError, http.client.HTTPException, Retryable) as exc:
                self.close()
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
            self.close()
        if reply.status == 200 and reply.getheader("ETag"):
            return reply.getheader("ETag")
        if reply.status == 429 or reply.status >= 500:
            raise Retryable("HTTP %d" % reply.status)
        detail = "part %d: HTTP %d %s" % (number, reply.status, body.decode("utf-8", "replace")[:300])
        if reply.status in (401, 403, 404):
            raise UploadFailed("par-refused", "the PAR or the upload is gone or refuses writes: " + detail)
        raise UploadFailed("http-error", detail)


class Hasher(object):
    """The whole file hashed in order by a thread of its own, each byte read once.

    (The stream's :class:`.digest.Digest` hashes as this does, but follows a download and checks a
    digest it was given, keeping none: this one has nothing to wait for and reports what it found.)"""

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


def main(config_path):
    # Who started us, learned first: a session that ends while we start up must still be
    # noticed. Parent 1: it has already ended.
    parent = os.getppid()

    def hung_up(signum, frame):
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, hung_up)
    signal.signal(signal.SIGHUP, hung_up)
    with open(config_path) as f:
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

