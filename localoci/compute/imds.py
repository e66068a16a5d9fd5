"""The instance metadata service a booted machine reaches at 169.254.169.254, as OCI serves it.

qemu's user-mode network forwards each of the guest's connections to 169.254.169.254:80 to
``python -m localoci.compute.imds FILE`` (``guestfwd=...-cmd:``), the connection on its
standard input and output: one HTTP request, one answer, from the instance's document in FILE
(written when the machine starts). Like OCI's: ``/opc/v2/...`` wants the header
``Authorization: Bearer Oracle`` (401 without it), ``/opc/v1/...`` does not;
``/opc/v{1,2}/instance/`` is the whole document, ``.../instance/<field>`` and
``.../instance/metadata/<key>`` parts of it (``ssh_authorized_keys``, ``user_data``), text
for a string, JSON otherwise; anything else is 404.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

MAX_REQUEST = 16 * 1024


def answer(document: dict[str, Any], request: bytes) -> tuple[int, str, bytes]:
    """``(status, content type, body)`` for one raw HTTP request."""
    head = request.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ") if lines and lines[0] else []
    if len(parts) < 2 or parts[0] != "GET":
        return 405, "text/plain", b"only GET\n"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    path = parts[1].split("?", 1)[0]
    for version in ("/opc/v2/", "/opc/v1/"):
        if path.startswith(version):
            if version == "/opc/v2/" and headers.get("authorization") != "Bearer Oracle":
                return 401, "text/plain", b"Authorization: Bearer Oracle is required\n"
            rest = [p for p in path[len(version):].split("/") if p]
            break
    else:
        return 404, "text/plain", b"not found\n"
    if not rest or rest[0] != "instance":
        return 404, "text/plain", b"not found\n"
    value: Any = document
    for key in rest[1:]:
        if not isinstance(value, dict) or key not in value:
            return 404, "text/plain", b"not found\n"
        value = value[key]
    if isinstance(value, str):
        return 200, "text/plain", value.encode()
    return 200, "application/json", json.dumps(value, indent=2).encode()


def serve(document_file: Path, reader: BinaryIO, writer: BinaryIO) -> None:
    request = b""
    while b"\r\n\r\n" not in request and len(request) < MAX_REQUEST:
        chunk = reader.read1(4096) if hasattr(reader, "read1") else reader.read(4096)
        if not chunk:
            break
        request += chunk
    try:
        document = json.loads(document_file.read_text())
    except (OSError, ValueError):
        document = {}
    status, kind, body = answer(document, request)
    reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed"}[status]
    writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                 "Connection: close\r\n\r\n".encode() + body)
    writer.flush()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)
