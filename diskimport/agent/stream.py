"""The ``stream`` program: fetch one object into a local file with parallel ranged GETs, and
serve that file over NBD (read-only, on a unix socket) while it fills.

qemu-img reads the image through NBD as it arrives: a read waits until its bytes are on
the worker's disk, and moves the chunks it needs to the front of the download queue.
So the conversion runs alongside the download, every byte crosses the network once, and
the finished file is what the write is verified against, with no second download.

The importer ships the package to the worker and runs ``python3 agent.pyz stream CONFIG`` with
the worker's ``python3`` (standard library only, Python 3.6 or newer). CONFIG is a JSON file,
which holds the PAR URL (a bearer secret) and is readable by the worker user alone:

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
    digest       [hashlib name, hex digest, what]: the fetched bytes (a tar's member; a compressed
                 object's own bytes) must hash to it, or the transfer fails with code
                 ``ova-digest-mismatch`` (an OVA's manifest); hashed in order as they arrive

    window       {"behind": bytes, "ahead": bytes}: ``path`` holds only a window of the image, the
                 bytes its readers passed punched out of it (see :class:`.window.Window`)

    vmdk_stream  {"capacity": bytes, "device_file": path, "target_is_zero": bool}: the image is
                 a streamOptimized VMDK, decoded as it arrives and written onto the device whose
                 path the importer writes into ``device_file`` once the volume is attached (see
                 :class:`.vmdk.VmdkStream`); it is fetched into memory, in order, and nothing is served
                 over NBD. Progress events then carry ``decoded`` (bytes of the image read), and
                 a ``decoded`` event follows ``fetched``: grains, bytes written and verified,
                 runs written, bytes between the runs checked to read as zeros. A stream the
                 decoder refuses ends the transfer with code ``vmdk-stream-invalid``.

    base         (a tar's member) the object offset of ``path``'s byte 0: only the object's
                 bytes [base, base + size) are fetched, and ``present`` is given in ``path``'s
                 offsets
    container    (compressed uploads) "gzip", "xz", "zstd", "bzip2" or "tar.gz": the object
                 (``object_size`` bytes) is fetched into memory, a few chunks per connection
                 ahead of the decompression, and decompressed in order as it arrives by the
                 worker's ``gzip``/``xz``/``zstd``/``bzip2 -dc`` (a process of its own, so it
                 runs beside the fetching); its output from byte ``skip`` (a tar.gz's member)
                 fills ``path``, whose ``size`` is the image's length. ``present`` is then
                 given in the object's offsets, and its bytes are in ``object_path``.
                 Decompressed zeros stay holes in ``path``, and the NBD export reports them
                 (``base:allocation``), so qemu-img does not read them.

Every transient failure (a 429 or 5xx reply, a reset connection, a short body) is retried
with backoff, and a retried chunk resumes from its last written byte. A 412 (the object
changed) or 404 (the PAR is gone) ends the transfer. Progress goes to stdout as JSON lines.

A decompression that yields more than ``size`` bytes (a bomb, or a wrong size record) ends
the transfer with code ``decompression-bomb``; one that fails or ends short with
``decompression-failed``; a tar.gz with more than zeros after its member with
``tar-not-one-image``. The ``failed`` event carries the code; NBD reads then get EIO.
"""

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time

from .connection import ssh_server_address
from .decompress import DECOMPRESSORS, Inflow
from .digest import Digest
from .events import TransferFailed, emit, stop_requested
from .fetch import Download, Fetcher
from .files import PIECE
from .nbd import NbdExport
from .vmdk import VmdkStream
from .window import Window


def main(config_path):
    # Who started us, learned first: a session that ends while we start up (python's own start
    # can take a second on a busy worker) must still be noticed. Parent 1: it has already ended.
    parent = os.getppid()
    with open(config_path) as f:
        config = json.load(f)

    def hung_up(signum, frame):
        """The session or the worker is going down: leave no copy of the image behind."""
        if config.get("directory"):
            shutil.rmtree(config["directory"], ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, hung_up)
    signal.signal(signal.SIGHUP, hung_up)
    size, path = int(config["size"]), config["path"]
    bind = config.get("bind")
    config["bind_address"] = ssh_server_address() if bind == "ssh" else bind
    compressed = config.get("container") in DECOMPRESSORS
    decoding = bool(config.get("vmdk_stream")) and not compressed
    windowed = bool(config.get("window")) and not compressed and not decoding
    fetch_size = int(config["object_size"]) if compressed else size
    # A compressed object, or a VMDK decoded as it arrives, is read once, in order: it arrives in
    # memory, a few chunks per connection ahead
    connections = max(1, int(config.get("connections", 4)))
    download = Download(fetch_size, config.get("present", []), int(config.get("chunk_bytes", 8 * PIECE)),
                        buffers=3 * connections if compressed or decoding else 0)

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    source = download  # the transfer's work (a Completion): the download, or what follows it as it arrives
    fetch_fd = fd
    if compressed:
        fetch_fd = os.open(config["object_path"], os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fetch_fd, fetch_size)
        source = Inflow(config, download, fetch_fd, fd)
        source.start()
    elif decoding:
        source = VmdkStream(config, download, fd)
        source.start()
    digest = (Digest(config["digest"], source, fd, size)
              if config.get("digest") and not compressed and not decoding else None)
    window = Window(config, download, fd, digest) if windowed else None
    ending = digest or source  # what the end of the transfer waits for
    if digest is not None:
        digest.on_hashed = window.hashed if windowed else None
        digest.start()
    if not decoding:  # a decoded VMDK is written by the program itself: nothing reads it over NBD
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(config["socket"])
        listener.listen(16)
        export = NbdExport(path, size, window if windowed else source)
        threading.Thread(target=export.serve, args=(listener,), daemon=True).start()

    started = time.monotonic()
    fetchers = [threading.Thread(target=Fetcher(config, download, fetch_fd).run, daemon=True)
                for _ in range(connections)]
    for thread in fetchers:
        thread.start()
    emit("ready", size=size, to_fetch=sum(c.hi - c.lo for c in download.chunks), bind=config["bind_address"])

    def orphaned():
        """The SSH session that started us is gone: nobody will read or stop us."""
        if os.getppid() == parent != 1:
            return False
        if config.get("directory"):
            shutil.rmtree(config["directory"], ignore_errors=True)
        return True

    interval = float(config.get("progress_seconds", 2.0))
    last = time.monotonic()
    try:
        while not ending.wait_complete(0.1):
            if orphaned():
                return 4
            stop = stop_requested(config["stop_file"])
            if stop == "stop" and windowed:
                window.readers_done()
            if stop == "abort":
                # the importer stops us because a read failed: the failure that made it fail is the news
                failure = download.error or source.error
                if failure is not None:
                    raise failure
                emit("aborted", fetched=download.fetched)
                return 3
            if time.monotonic() - last >= interval:
                last = time.monotonic()
                emit("progress", fetched=download.fetched, size=size,
                     **(source.progress() if decoding else {}))
    except TransferFailed as exc:
        emit("failed", error=str(exc), fetched=download.fetched, code=exc.code)
        sys.stderr.write("transfer failed: %s\n" % exc)
        return 1
    emit("fetched", fetched=download.fetched, size=size, seconds=round(time.monotonic() - started, 3))
    if decoding:
        emit("decoded", **source.account())
    while stop_requested(config["stop_file"]) is None:
        if orphaned():
            return 4
        time.sleep(0.05)
    if windowed:
        window.readers_done()  # reads served after the last byte arrived may have fetched some again
        emit("window", refetched=window.refetched)
    os.close(fd)
    return 0
