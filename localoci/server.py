"""The one HTTP server that serves every local OCI service on a single port."""

from __future__ import annotations

import logging
import socket
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .errors import ServiceError, not_authenticated
from .http import CHUNK, FileBody, Request, Response

if TYPE_CHECKING:
    from .app import LocalOCI

log = logging.getLogger("localoci.server")


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
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_file(self, request: Request, body: FileBody) -> None:
        throttles = self.server.app.read_throttles(request)
        with open(body.path, "rb") as f:
            if not throttles:
                self.wfile.flush()
                self.connection.sendfile(f, body.offset, body.length)
                return
            f.seek(body.offset)
            left = body.length
            step = min(CHUNK, 256 * 1024)
            while left:
                data = f.read(min(step, left))
                if not data:
                    raise ConnectionResetError("object file shorter than expected")
                for bucket in throttles:
                    bucket.take(len(data))
                self.wfile.write(data)
                left -= len(data)


class LocalOCIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, app: "LocalOCI", host: str, port: int) -> None:
        self.app = app
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


def require_signature(request: Request) -> None:
    """OCI APIs take only signed requests; refuse a call that carries no signature."""
    auth = request.headers.get("Authorization") or ""
    if not auth.startswith("Signature ") or "keyId=" not in auth:
        raise not_authenticated("The required information to complete authentication was not provided.")

