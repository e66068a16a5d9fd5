"""Reading uploaded objects from the orchestrator: their HEAD, byte ranges of one version, and
the head and tail the inspection read, kept for the transfer.

Every range here is half-open, ``[start, end)``, as :data:`diskimport.images.inspection.ReadRange`
is; a read names the version (``if-match`` its ETag), so an object replaced meanwhile fails
the read instead of mixing two uploads' bytes.
"""

from __future__ import annotations

import collections
import email.utils
import threading
from typing import Callable

from . import cloud
from .images import inspection
from .errors import ImageRejected, InvalidRequest
from .records import ObjectVersion

Pieces = list[tuple[int, bytes]]  # (offset, bytes) read from one object version
HEADERS_KEPT = 8  # object versions whose inspected pieces a reader keeps for their transfers


class ObjectReader:
    """The object-storage reads of one run, and the pieces its inspections read, kept so the
    transfer of the same version fetches no byte twice (a new process reads them again)."""

    def __init__(self, clients: cloud.Clients) -> None:
        self.clients = clients
        self._kept: collections.OrderedDict[str, Pieces] = collections.OrderedDict()
        self._lock = threading.Lock()

    # -- whole objects, by name -------------------------------------------------------------------

    def namespace(self, namespace: str | None) -> str:
        return namespace or cloud.with_backoff(self.clients.object_storage.get_namespace).data

    def version(self, namespace: str | None, bucket: str, name: str, etag: str | None = None) -> ObjectVersion:
        """The object's current version; refused when it is missing, or is not the ``etag`` asked for."""
        ns = self.namespace(namespace)
        head = cloud.head_object_or_none(self.clients, ns, bucket, name)
        if head is None:  # a HEAD 404 carries no error code
            raise InvalidRequest("object-not-found", f"object {name!r} not found in bucket {bucket!r} "
                                 f"of namespace {ns!r}")
        found = ObjectVersion(
            namespace=ns, bucket=bucket, name=name, etag=head["etag"], size=int(head["content-length"]),
            md5=head.get("content-md5") or head.get("opc-multipart-md5"),
            metadata={k[len("opc-meta-"):]: v for k, v in head.items() if k.startswith("opc-meta-")},
            modified=_http_time(head.get("last-modified")))
        if etag and found.etag != etag:
            raise InvalidRequest("object-changed", f"object {name!r} changed: its current ETag is "
                                 f"{found.etag}, not {etag} that this import was asked for")
        return found

    def size_or_none(self, namespace: str, bucket: str, name: str) -> int | None:
        head = cloud.head_object_or_none(self.clients, namespace, bucket, name)
        return int(head["content-length"]) if head is not None else None

    def small_or_none(self, namespace: str, bucket: str, name: str, limit: int) -> bytes | None:
        """At most ``limit`` + 1 bytes of a small companion object (a manifest), or None when it is missing."""
        if self.size_or_none(namespace, bucket, name) is None:
            return None
        reply = cloud.with_backoff(self.clients.object_storage.get_object, namespace, bucket, name)
        return reply.data.content[:limit + 1]

    # -- one version, by range --------------------------------------------------------------------

    def read(self, version: ObjectVersion, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the version."""
        if end <= start:
            return b""
        reply = cloud.with_backoff(self.clients.object_storage.get_object, version.namespace, version.bucket,
                                   version.name, range=f"bytes={start}-{end - 1}", if_match=version.etag)
        return reply.data.content

    def recorder(self, version: ObjectVersion, pieces: Pieces) -> Callable[[int, int], bytes]:
        """``read(start, end)`` of the version that also keeps each piece it read in ``pieces``."""
        def read(start: int, end: int) -> bytes:
            data = self.read(version, start, end)
            if data:
                pieces.append((start, data))
            return data
        return read

    def whole(self, version: ObjectVersion, limit: int, code: str) -> bytes:
        """A descriptor read whole; refused (``code``) past ``limit`` bytes."""
        if version.size > limit:
            raise ImageRejected(code, f"{version.name!r} is {version.size} bytes; at most {limit} are read")
        return self.read(version, 0, version.size)

    # -- the inspected head and tail, for the transfer --------------------------------------------

    def keep(self, version: ObjectVersion, pieces: Pieces) -> None:
        with self._lock:
            self._kept[version.key] = sorted(pieces)
            self._kept.move_to_end(version.key)
            while len(self._kept) > HEADERS_KEPT:
                self._kept.popitem(last=False)

    def header_pieces(self, version: ObjectVersion) -> Pieces:
        """The bytes the inspection read, or (in a new process) the same ranges read again."""
        with self._lock:
            kept = self._kept.get(version.key)
        if kept is not None:
            return kept
        head_end = min(version.size, inspection.HEAD_BYTES)
        tail_start = max(head_end, version.size - inspection.TAIL_BYTES)
        return [(start, self.read(version, start, end)) for start, end in ((0, head_end), (tail_start, version.size))
                if start < end]


def _http_time(value: str | None) -> float | None:
    """An HTTP date (``Last-Modified``) as epoch seconds; None when absent or unreadable."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
