"""A disk's block manifest: one digest per 16 KiB block, what a delta upload is computed against.

``python3 agent.pyz manifest CONFIG`` hashes the blocks of a device on the worker (all of
them, or the ranges listed) and writes the manifest to a file; the delta client
(:mod:`diskimport.delta.client`) computes the same manifest of a local disk with the same
functions. A manifest file is ``MAGIC``, a 4-byte big-endian header length, the JSON header
(``block_size``, ``digest``, ``virtual_size``, ``blocks``, and what else the writer adds),
then the digests, zlib-compressed: ``DIGEST_BYTES`` per block, in order; a block that reads as
zeros has the digest ``ZERO`` (all zero bytes, which BLAKE2b never yields in practice).

The last block may be short (a disk whose size is no multiple of the block): its digest is
that of its bytes only. Regular files are read by their data extents (``SEEK_DATA``), so the
holes of a sparse image cost nothing; devices are read whole.

Configuration (JSON): ``device``, ``size`` (bytes to hash), ``out`` (the manifest file),
``blocks`` (optional ``[[first, count], ...]``: only these blocks, the rest ``ZERO``).
Standard library only (Python 3.6).
"""

import errno
import hashlib
import json
import os
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

BLOCK = 16 * 1024
DIGEST_BYTES = 16
DIGEST = "blake2b-128"
ZERO = bytes(DIGEST_BYTES)
MAGIC = b"OCIDMAN1"
READ = 256 * BLOCK  # one read: 4 MiB
MAX_HEADER = 64 * 1024


class ManifestError(ValueError):
    """A manifest file that is not one, or does not describe the disk it is said to."""


def block_count(size, block=BLOCK):
    return -(-size // block)


ZERO_BLOCK = bytes(BLOCK)


def block_digest(data):
    """A block's digest (a memoryview or bytes of at most ``BLOCK``); ``ZERO`` when it reads as zeros."""
    if data == ZERO_BLOCK[:len(data)]:  # memcmp
        return ZERO
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


def _data_extents(fd, size):
    """``[(start, end)]`` of a regular file's data (holes read as zeros); the whole range otherwise."""
    extents, pos = [], 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            if start >= size:
                break
            extents.append((start, end))
            pos = end
    except (OSError, AttributeError):  # a device, or a filesystem without SEEK_DATA
        return [(0, size)]
    return extents


def digest_file(fd, size, blocks=None, block=BLOCK, progress=None, threads=None):
    """The digests of ``fd``'s first ``size`` bytes, a bytearray of ``DIGEST_BYTES`` per block.

    ``blocks``: only these ``[(first, count)]`` are read (the rest stay ``ZERO``);
    ``progress(bytes_done)`` is called as reads complete. Reads of 4 MiB are hashed on
    ``threads`` threads (default: one per CPU, at most 4): BLAKE2b lets go of the GIL.
    """
    count = block_count(size, block)
    digests = bytearray(count * DIGEST_BYTES)
    if blocks is None:
        ranges = [(start // block, block_count(end, block) - start // block) for start, end in _data_extents(fd, size)]
    else:
        ranges = [(int(first), int(n)) for first, n in blocks]
    chunks = []
    for first, n in ranges:
        if first < 0 or n < 0 or first + n > count:
            raise ManifestError("blocks %d+%d are outside a disk of %d blocks" % (first, n, count))
        chunks.extend((at, min(first + n - at, READ // block)) for at in range(first, first + n, READ // block))

    def hash_chunk(chunk):
        at, step = chunk
        start, end = at * block, min(size, (at + step) * block)
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            raise ManifestError("the disk ends at %d, before %d" % (start + len(data), end))
        view = memoryview(data)
        for i in range(step):
            digests[(at + i) * DIGEST_BYTES:(at + i + 1) * DIGEST_BYTES] = block_digest(
                view[i * block:(i + 1) * block])
        return end - start

    workers = threads or min(4, os.cpu_count() or 1)
    done = 0
    with ThreadPoolExecutor(workers) as pool:
        for window in range(0, len(chunks), 64 * workers):  # a bounded queue: a few hundred MiB at most in flight
            for length in pool.map(hash_chunk, chunks[window:window + 64 * workers]):
                done += length
                if progress is not None:
                    progress(done)
    return digests


def encode(header, digests):
    """The manifest file's bytes."""
    header = dict(header, block_size=header.get("block_size", BLOCK), digest=DIGEST,
                  blocks=len(digests) // DIGEST_BYTES)
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + zlib.compress(bytes(digests), 6)


def decode(data, max_blocks):
    """``(header, digests)`` of a manifest file, checked; ``ManifestError`` for anything else."""
    header, body = read_header(data)
    size, blocks = header.get("virtual_size"), header.get("blocks")
    if header.get("block_size") != BLOCK or header.get("digest") != DIGEST:
        raise ManifestError("the manifest has blocks of %r bytes digested by %r (expected %d, %s)"
                            % (header.get("block_size"), header.get("digest"), BLOCK, DIGEST))
    if not isinstance(size, int) or not isinstance(blocks, int) or size < 0 or blocks != block_count(size):
        raise ManifestError("the manifest's virtual size %r and block count %r disagree" % (size, blocks))
    if blocks > max_blocks:
        raise ManifestError("the manifest describes %d blocks, more than the %d expected" % (blocks, max_blocks))
    inflater = zlib.decompressobj()
    try:  # bounded: a compressed bomb stops at the size the header promised
        digests = inflater.decompress(data[body:], blocks * DIGEST_BYTES + 1)
    except zlib.error as exc:
        raise ManifestError("the manifest's digests cannot be read: %s" % exc)
    if len(digests) != blocks * DIGEST_BYTES or not inflater.eof:
        raise ManifestError("the manifest holds %d bytes of digests, not the %d its header says"
                            % (len(digests), blocks * DIGEST_BYTES))
    return header, digests


def max_file_bytes(size):
    """The most a manifest file of a disk of ``size`` bytes can take: header, and digests zlib left as
    they were (stored blocks cost 5 bytes per 16 KiB, plus its own few)."""
    digests = block_count(size) * DIGEST_BYTES
    return len(MAGIC) + 4 + MAX_HEADER + digests + 5 * (digests // 16384 + 1) + 64


def read_header(data):
    """The JSON header of a manifest file (cheap: the digests are not inflated)."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        raise ManifestError("not a block manifest (its first bytes are not %r)" % MAGIC)
    (length,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    if length > MAX_HEADER:
        raise ManifestError("the manifest's header is %d bytes long" % length)
    try:
        header = json.loads(data[len(MAGIC) + 4:len(MAGIC) + 4 + length].decode())
    except ValueError:
        raise ManifestError("the manifest's header is not JSON")
    if not isinstance(header, dict):
        raise ManifestError("the manifest's header is not an object")
    return header, len(MAGIC) + 4 + length


def digest_at(digests, index):
    """Block ``index``'s digest (``ZERO`` past the end: a disk reads zeros beyond what it held)."""
    start = index * DIGEST_BYTES
    return bytes(digests[start:start + DIGEST_BYTES]) if start < len(digests) else ZERO


def main(config_path):
    with open(config_path) as f:
        config = json.load(f)
    started = time.time()
    try:
        fd = os.open(config["device"], os.O_RDONLY)
        try:
            digests = digest_file(fd, int(config["size"]), config.get("blocks"))
        finally:
            os.close(fd)
        data = encode({"virtual_size": int(config["size"])}, digests)
        with open(config["out"], "wb") as f:
            f.write(data)
    except (OSError, ManifestError) as exc:
        sys.stdout.write(json.dumps({"event": "failed", "error": str(exc)}) + "\n")
        return 1
    sys.stdout.write(json.dumps({"event": "manifest", "bytes": len(data),
                                 "seconds": round(time.time() - started, 3)}) + "\n")
    return 0
