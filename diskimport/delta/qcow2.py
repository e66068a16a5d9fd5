"""Write a qcow2 (version 3) that holds given 16 KiB clusters of a disk, and nothing else.

A delta upload is such an image: the clusters that changed since the last import, each either
data or a zero cluster (it reads as zeros, whatever the backing holds), over a backing file
named ``oci-import:<import id>`` (no path: the importer resolves it to the volume of that
import, :mod:`diskimport.delta`). A first upload is the same without a backing file: every
cluster that is not zeros.

The layout is planned before any data is written, so any byte range of the image can be made
on demand (:func:`image_range`: a multipart upload's parts, with no copy of the image on disk):
the header (with the backing file's name and its format, ``raw``), the refcount table and blocks,
the L1 table, the L2 tables, then the data clusters in the order of their disk offsets.
Every cluster in the file is referenced once (refcount 1) and every L2 entry carries the
COPIED flag, as ``qemu-img check`` expects of an image without snapshots.
"""

from __future__ import annotations

import struct
from typing import BinaryIO, Callable, Sequence

CLUSTER_BITS = 14  # 16 KiB: the manifest's block (diskimport.agent.manifest.BLOCK)
CLUSTER = 1 << CLUSTER_BITS
L2_ENTRIES = CLUSTER // 8
REFCOUNT_ORDER = 4  # 16-bit refcounts, as qemu-img makes them
REFCOUNTS_PER_BLOCK = CLUSTER * 8 // (1 << REFCOUNT_ORDER)
HEADER_LENGTH = 104
COPIED = 1 << 63
ZERO_FLAG = 1
BACKING_FORMAT_EXTENSION = 0xE2792ACA
MAX_BACKING_NAME = 1023


def _clusters(byte_count: int) -> int:
    return -(-byte_count // CLUSTER)


class Plan:
    """Where each part of the image goes, for a disk of ``virtual_size`` bytes whose clusters
    ``data`` (written in this order) and ``zeros`` the image holds."""

    def __init__(self, virtual_size: int, data: Sequence[int], zeros: Sequence[int], backing: str | None) -> None:
        if backing is not None and (len(backing.encode()) > MAX_BACKING_NAME or not backing):
            raise ValueError(f"a backing file name of {len(backing.encode())} bytes")
        self.virtual_size, self.backing = virtual_size, backing
        self.data, self.zeros = data, zeros
        disk_clusters = _clusters(virtual_size)
        if any(clusters and not 0 <= min(clusters) <= max(clusters) < disk_clusters for clusters in (data, zeros)):
            raise ValueError("a cluster outside the disk")
        self.l1_size = -(-disk_clusters // L2_ENTRIES)
        # the L1 entries that have an L2 table
        self.tables = sorted({c // L2_ENTRIES for clusters in (data, zeros) for c in clusters})
        l1_clusters = _clusters(self.l1_size * 8)
        fixed = 1 + l1_clusters + len(self.tables) + len(data)  # header, L1, L2 tables, data
        blocks = table = 1
        while True:  # the refcounts must cover themselves too
            total = fixed + table + blocks
            need_blocks = -(-total // REFCOUNTS_PER_BLOCK)
            need_table = _clusters(need_blocks * 8)
            if (need_blocks, need_table) == (blocks, table):
                break
            blocks, table = need_blocks, need_table
        self.refcount_table_clusters, self.refcount_blocks = table, blocks
        self.refcount_table = 1
        self.first_block = self.refcount_table + table
        self.l1 = self.first_block + blocks
        self.first_l2 = self.l1 + l1_clusters
        self.first_data = self.first_l2 + len(self.tables)
        self.total_clusters = self.first_data + len(data)

    @property
    def file_size(self) -> int:
        return self.total_clusters * CLUSTER

    def header(self) -> bytes:
        extensions = b""
        backing_offset = backing_size = 0
        if self.backing is not None:
            extensions += struct.pack(">II", BACKING_FORMAT_EXTENSION, 3) + b"raw".ljust(8, b"\0")
        extensions += struct.pack(">II", 0, 0)
        if self.backing is not None:
            backing_offset, backing_size = HEADER_LENGTH + len(extensions), len(self.backing.encode())
        head = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, backing_offset, backing_size, CLUSTER_BITS,
                           self.virtual_size, 0, self.l1_size, self.l1 * CLUSTER, self.refcount_table * CLUSTER,
                           self.refcount_table_clusters, 0, 0, 0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH)
        assert len(head) == HEADER_LENGTH
        cluster = head + extensions + (self.backing.encode() if self.backing else b"")
        return cluster.ljust(CLUSTER, b"\0")

    def metadata(self) -> bytearray:
        """Every cluster before the data: header, refcount table and blocks, L1, L2 tables (not copied
        into bytes: for a large disk's first push they are hundreds of MiB)."""
        out = bytearray(self.first_data * CLUSTER)
        out[0:CLUSTER] = self.header()
        for i in range(self.refcount_blocks):
            struct.pack_into(">Q", out, self.refcount_table * CLUSTER + i * 8, (self.first_block + i) * CLUSTER)
        start = self.first_block * CLUSTER
        out[start:start + 2 * self.total_clusters] = b"\0\1" * self.total_clusters  # every cluster: 1
        l2_of = {table: self.first_l2 + i for i, table in enumerate(self.tables)}
        for table, cluster in l2_of.items():
            struct.pack_into(">Q", out, self.l1 * CLUSTER + table * 8, cluster * CLUSTER | COPIED)
        for i, c in enumerate(self.data):
            struct.pack_into(">Q", out, l2_of[c // L2_ENTRIES] * CLUSTER + (c % L2_ENTRIES) * 8,
                             (self.first_data + i) * CLUSTER | COPIED)
        for c in self.zeros:
            struct.pack_into(">Q", out, l2_of[c // L2_ENTRIES] * CLUSTER + (c % L2_ENTRIES) * 8, ZERO_FLAG)
        return out


def write(out: BinaryIO, plan: Plan, read_cluster: Callable[[int], bytes],
          written: Callable[[int], None] | None = None) -> int:
    """Stream the image ``plan`` describes into ``out``; ``read_cluster(c)`` gives cluster ``c``'s
    bytes (at most ``CLUSTER``; a short last one is padded). Returns the bytes written."""
    metadata, total = plan.metadata(), 0
    for start in range(0, plan.file_size, WRITE_CHUNK):
        piece = image_range(plan, metadata, start, min(start + WRITE_CHUNK, plan.file_size), read_cluster)
        out.write(piece)
        total += len(piece)
        if written is not None:
            written(total)
    return total


WRITE_CHUNK = 256 * CLUSTER  # 4 MiB


def image_range(plan: Plan, metadata: bytes | bytearray, start: int, end: int,
                read_cluster: Callable[[int], bytes]) -> bytes:
    """Bytes ``[start, end)`` of the image ``plan`` describes, ``metadata`` being ``plan.metadata()``: any
    part of the image is made on demand (a multipart upload's part, with no copy of the image kept)."""
    if not 0 <= start <= end <= plan.file_size:
        raise ValueError(f"bytes {start} to {end} of an image of {plan.file_size}")
    out = bytearray(metadata[start:end])
    first, last = max(start, len(metadata)) - len(metadata), end - len(metadata)
    for i in range(first // CLUSTER, -(-last // CLUSTER) if last > 0 else 0):
        c = plan.data[i]
        data = read_cluster(c)
        if len(data) > CLUSTER:
            raise ValueError(f"cluster {c} is {len(data)} bytes")
        if len(data) < CLUSTER:
            data = data.ljust(CLUSTER, b"\0")
        out += data[max(first - i * CLUSTER, 0):min(last - i * CLUSTER, CLUSTER)]
    assert len(out) == end - start
    return bytes(out)
