"""The HTTP server that serves every local OCI service on a single port, one such port a region."""

from __future__ import annotations

import logging
import socket
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .bandwidth import THROTTLED_STEP, take_all
from .errors import ServiceError, not_authenticated
from .http import CHUNK, FileBody, Request, Response

if TYPE_CHECKING:
    from .app import LocalOCI

log = logging.getLogger("localoci.server")

SENDFILE_STEP = CHUNK  # bytes per sendfile call when no cap applies: what a lost client cost goes uncounted


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "LocalOCIServer"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("%s - %s", self.client_address[0], format % args)

    def do_GET(self) -> None:
        self._dispatch()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _dispatch(self) -> None:
        app = self.server.app
        parts = urlsplit(self.path)
        request = Request(self.command, parts.path, parts.query, self.headers, self.rfile, self.client_address)
        if not hasattr(self, "connection_state"):
            self.connection_state: dict[str, object] = {}
        request.connection = self.connection_state
        request.region = self.server.region
        request_id = uuid.uuid4().hex.upper()
        try:
            response = app.handle(request)
        except ServiceError as exc:
            response = Response.json({"code": exc.code, "message": exc.message}, status=exc.status)
        except ConnectionError:
            self.close_connection = True
            return
        except Exception:
            log.exception("unhandled error in %s %s", self.command, parts.path)
            response = Response.json({"code": "InternalError", "message": "Internal error."}, status=500)
        if not request.consumed:
            # The body was not read (an early refusal): the connection cannot be reused.
            self.close_connection = True
        self._send(request, response, request_id)

    def _send(self, request: Request, response: Response, request_id: str) -> None:
        body = response.body
        length = len(body) if isinstance(body, bytes) else body.length if isinstance(body, FileBody) else 0
        self.send_response(response.status)
        headers = {"opc-request-id": request_id, **response.headers}
        if response.status != 204 and not any(k.lower() == "content-length" for k in headers):
            headers["Content-Length"] = str(length)
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD" or body is None:
            return
        try:
            if isinstance(body, bytes):
                self.wfile.write(body)
            else:
                self._send_file(request, body)
        except (BrokenPipeError, ConnectionResetError, FileNotFoundError):
            # FileNotFoundError: the object was replaced since it was looked up; the headers are out, so hang up.
            self.close_connection = True

    def _send_file(self, request: Request, body: FileBody) -> None:
        app = self.server.app
        throttles = app.read_throttles(request)
        metrics, account = app.read_metrics, body.account
        if account is not None:
            metrics.request(account)
        cut = request.cut_after_bytes
        left = body.length if cut is None else min(cut, body.length)
        self.wfile.flush()
        step = THROTTLED_STEP if throttles else SENDFILE_STEP
        for path, offset, length in body.spans():
            if not left:
                break
            with open(path, "rb") as f:
                f.seek(offset)
                length = min(length, left)
                left -= length
                while length:
                    # Piece by piece, so the metrics count what was sent even if the client goes away,
                    # and each piece passes the token buckets before the kernel copies it out (sendfile).
                    n = min(step, length)
                    if throttles:
                        take_all(throttles, n)
                    # Counted before the piece goes out, then corrected by what was not sent: a client that
                    # has received the whole body and asks for the metrics finds every byte of it counted.
                    if account is not None:
                        metrics.sent(account, n)
                    try:
                        sent = self.connection.sendfile(f, offset, n)
                    except OSError:
                        # The client left mid-piece; sendfile has moved the file position past what it sent.
                        if account is not None:
                            metrics.sent(account, max(0, f.tell() - offset) - n)
                        raise
                    if account is not None and sent != n:
                        metrics.sent(account, sent - n)
                    if not sent:
                        raise ConnectionResetError("object file shorter than expected")
                    offset += sent
                    length -= sent
        if cut is not None and cut < body.length:
            raise ConnectionResetError("fault injected: connection cut mid-body")


class LocalOCIServer(ThreadingHTTPServer):
    """The listener of one region; every region's listener serves the same app."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, app: "LocalOCI", host: str, port: int, region: str) -> None:
        self.app = app
        self.region = region
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def require_signature(request: Request) -> None:
    """OCI APIs take only signed requests; refuse a call that carries no signature."""
    auth = request.headers.get("Authorization") or ""
    if not auth.startswith("Signature ") or "keyId=" not in auth:
        raise not_authenticated("The required information to complete authentication was not provided.")

