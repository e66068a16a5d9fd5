"""Serve the function on the local stack the way OCI Functions does: the FDK's own runner
on a unix socket (``fdk func.py handler``), fronted by a loopback HTTP endpoint that plays the
Fn server's part (``POST /call`` with ``Fn-Call-Id`` and ``Fn-Deadline``).

The local OCI's event rule delivers events to that endpoint; the function's status
code becomes the HTTP status, so a failed invocation is retried by the event delivery.

``python -m function_trigger.local_runner --port N --socket-dir DIR``; the function's
configuration is this process's environment (as ``fn config`` values are in OCI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
FDK = str(Path(sys.executable).with_name("fdk"))


def start_fdk(socket_dir: Path, timeout_seconds: float) -> tuple[subprocess.Popen[bytes], Path]:
    socket_dir.mkdir(parents=True, exist_ok=True)
    socket = socket_dir / "lsnr.sock"
    # As in the function image, the function's own directory is on the module path.
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "FN_FORMAT": "http-stream", "FN_LISTENER": f"unix:{socket}",
           "FN_APP_NAME": "local", "FN_FN_NAME": "import-trigger", "PYTHONPATH": path}
    proc = subprocess.Popen([FDK, str(HERE / "func.py"), "handler"], env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the FDK did not open its socket")
        time.sleep(0.05)
    return proc, socket


def make_handler(socket: Path, timeout_seconds: float) -> type[BaseHTTPRequestHandler]:
    # One connection per call: fdk 0.1.128's server spins its event loop on a kept-alive
    # connection (its cached clock never advances, so a keep-alive timer re-arms at once),
    # burning a CPU core for as long as the connection stays open.
    client = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=timeout_seconds + 5,
                          limits=httpx.Limits(max_keepalive_connections=0), headers={"Connection": "close"})

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=timeout_seconds)
            try:
                reply = client.post("http://function/call", content=body, headers={
                    "Fn-Call-Id": uuid.uuid4().hex, "Fn-Deadline": deadline.isoformat().replace("+00:00", "Z"),
                    "Content-Type": self.headers.get("Content-Type", "application/json")})
                status = int(reply.headers.get("Fn-Http-Status", reply.status_code))
                payload = reply.content
            except httpx.HTTPError as exc:
                status, payload = 502, f'{{"decision": "failed", "reason": "function unreachable: {exc}"}}'.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m function_trigger.local_runner", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--socket-dir", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=120.0, help="the function's timeout in seconds")
    args = parser.parse_args(argv)
    proc, socket = start_fdk(args.socket_dir, args.timeout)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(socket, args.timeout))

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        proc.terminate()
        proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
