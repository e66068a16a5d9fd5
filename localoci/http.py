"""The HTTP layer: requests, responses and routing, independent of any service.

Each service's responses module ends with its route table, ``ROUTES``: one :class:`Route`
row per call, naming the handler that serves it, a function of the app and the request.
Templates follow the OCI API reference (``/n/{namespaceName}/b/{bucketName}/o/{objectName+}``);
a ``+`` lets a parameter span slashes. Path parameters are matched on the raw path and then
percent-decoded, so object names containing ``/`` or ``%`` arrive intact.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterable, Sequence
from urllib.parse import parse_qsl, unquote

from .bandwidth import THROTTLED_STEP, TokenBucket, take_all
from .errors import invalid_parameter
from .regions import HOME

CHUNK = 1024 * 1024
SMALL_BODY_LIMIT = 16 * 1024 * 1024


class Request:
    def __init__(
        self,
        method: str,
        raw_path: str,
        query_string: str,
        headers: Any,
        rfile: BinaryIO,
        client_address: tuple[str, int],
    ) -> None:
        self.method = method
        self.raw_path = re.sub("/{2,}", "/", raw_path)
        self.query = dict(parse_qsl(query_string, keep_blank_values=True))
        self.headers = headers
        self.client_address = client_address
        self.params: dict[str, str] = {}
        # State that lives as long as the client's (keep-alive) connection.
        self.connection: dict[str, Any] = {}
        # Set by an injected fault: send only this many body bytes, then hang up.
        self.cut_after_bytes: int | None = None
        # Set by an injected fault: the resource this call creates fails to provision.
        self.fail_resource = False
        # The region whose listener the request arrived on (see regions.py).
        self.region = HOME
        self._rfile = rfile
        self._body: bytes | None = None
        self._consumed = False
        self._remaining: int | None = None
        te = (headers.get("Transfer-Encoding") or "").lower()
        self._chunked = "chunked" in te
        if not self._chunked:
            self._remaining = int(headers.get("Content-Length") or 0)

    @property
    def consumed(self) -> bool:
        return self._consumed or (not self._chunked and self._remaining == 0)

    def iter_body(self, step: int = CHUNK, pace: Callable[[int], None] | None = None) -> Iterable[bytes]:
        """Yield the request body in chunks of at most ``step`` bytes as it arrives (Content-Length or
        chunked); ``pace(n)`` is called before each ``n`` bytes are read off the connection."""
        if self._consumed:
            if self._body is not None:
                yield self._body
            return
        self._consumed = True
        if self._chunked:
            while True:
                size_line = self._rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._read_exactly(size, step, pace)
                self._rfile.readline(3)
        else:
            yield from self._read_exactly(self._remaining or 0, step, pace)
            self._remaining = 0

    def _read_exactly(self, left: int, step: int, pace: Callable[[int], None] | None) -> Iterable[bytes]:
        while left:
            n = min(step, left)
            if pace is not None:
                pace(n)
            data = self._rfile.read(n)
            if not data:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(data)
            yield data

    def body(self, limit: int = SMALL_BODY_LIMIT) -> bytes:
        if self._body is None:
            parts, total = [], 0
            for chunk in self.iter_body():
                total += len(chunk)
                if total > limit:
                    raise invalid_parameter(f"request body larger than {limit} bytes")
                parts.append(chunk)
            self._body = b"".join(parts)
        return self._body

    def json(self) -> Any:
        raw = self.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise invalid_parameter(f"request body is not valid JSON: {exc}") from None

    def json_if_small(self) -> Any:
        """The JSON body when the request carries one, else ``{}``; used to match faults."""
        ctype = (self.headers.get("Content-Type") or "").lower()
        if "json" not in ctype:
            return {}
        try:
            return self.json()
        except Exception:
            return {}

    def save_body(self, out: BinaryIO, throttles: Sequence[TokenBucket] = ()) -> tuple[int, str]:
        """Copy the body into ``out``; return its length and base64 MD5.

        With ``throttles``, every piece of the body passes the token buckets before it is read off
        the connection: a client sending faster than they allow waits on a full socket buffer."""
        import base64

        md5 = hashlib.md5()
        size = 0
        if throttles:
            chunks = self.iter_body(THROTTLED_STEP, lambda n: take_all(throttles, n))
        else:
            chunks = self.iter_body()
        for chunk in chunks:
            md5.update(chunk)
            out.write(chunk)
            size += len(chunk)
        return size, base64.b64encode(md5.digest()).decode()


@dataclass
class FileBody:
    """A byte range of a file, or of files read one after another (``pieces``: each file's path
    and size; a multipart object's parts), streamed to the client (optionally throttled).

    ``account`` names what the bytes sent are counted against in the read metrics, if anything.
    """

    pieces: list[tuple[str, int]]
    offset: int
    length: int
    account: str | None = None

    def spans(self) -> list[tuple[str, int, int]]:
        """``(path, offset in it, length)`` of each file the range covers, in order."""
        out, start, end, base = [], self.offset, self.offset + self.length, 0
        for path, size in self.pieces:
            lo, hi = max(start, base), min(end, base + size)
            if lo < hi:
                out.append((path, lo - base, hi - lo))
            base += size
        return out


@dataclass
class Response:
    status: int = 200
    body: bytes | FileBody | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> "Response":
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        return cls(status, json.dumps(obj).encode(), h)

    @classmethod
    def empty(cls, status: int = 204, headers: dict[str, str] | None = None) -> "Response":
        return cls(status, None, dict(headers or {}))


# A route's handler: called with the app (``LocalOCI``, which this layer does not know) and the request.
Handler = Callable[[Any, Request], Response]


@dataclass
class Route:
    """A row of a route table: the call ``method template``, its handler, and the OCI operation it
    is, the name faults and retry tokens know it by."""

    method: str
    template: str
    handler: Handler
    operation: str
    authenticated: bool = True
    # Whether the operation honours opc-retry-token (see retrytokens.py).
    retry_token: bool = False
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        pattern = re.sub(r"\{(\w+)\+\}", r"(?P<\1>.+)", self.template)
        pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
        self.regex = re.compile(f"^{pattern}/?$")


class Router:
    """Finds the route of a call: the first row, in the order given, whose method and template match."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes: list[Route] = list(routes)

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
        for route in self.routes:
            m = route.regex.match(path) if route.method == method else None
            if m:
                return route, {k: unquote(v) for k, v in m.groupdict().items()}
        return None
