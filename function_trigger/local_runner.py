"""Serve the function on the local stack the way OCI Functions does: its build directory
(``python -m function_trigger.build DIR``), the FDK's own runner on a unix socket
(``fdk func.py handler``), fronted by a loopback HTTP endpoint that plays the Fn server's
part (``POST /call`` with ``Fn-Call-Id`` and ``Fn-Deadline``).

As in the function image, the function's Python has its requirements installed and only
its build directory on the module path: the repository is not importable there, so what
runs is what would be deployed.

The local OCI's event rule delivers events to that endpoint; the function's status
code becomes the HTTP status, so a failed invocation is retried by the event delivery.

``python -m function_trigger.local_runner --port N --socket-dir DIR --function-dir BUILD``;
the function's configuration is this process's environment (as ``fn config`` values are in OCI).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import site
import subprocess
import sys
import sysconfig
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Mapping

import httpx

# No script directory or current directory on the path (-P), no user site-packages (-s).
ISOLATED = ("-P", "-s")
FDK_MAIN = "import sys; from fdk.scripts.fdk import main; sys.exit(main())"


def isolated_python(root: Path) -> Path:
    """A Python with this environment's packages (fdk, httpx, oci: the function's
    requirements) but not the repository: a venv under ``root`` whose one ``.pth`` names
    this environment's site-packages. Directories a ``.pth`` adds are not searched for
    ``.pth`` files themselves, so the repository's editable install (a ``.pth`` there)
    stays off, as it is absent from the function image."""
    venv = root / "python"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "function-requirements.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def function_process(function_dir: Path, work_dir: Path, config: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command prefix (an isolated Python) and environment a function process runs
    with: ``config`` (the ``fn config`` values), and only ``function_dir`` on ``PYTHONPATH``."""
    python = isolated_python(work_dir)
    env = {**config, "PYTHONPATH": str(function_dir)}
    return [str(python), *ISOLATED], env


def start_fdk(function_dir: Path, socket_dir: Path, config: Mapping[str, str] | None = None,
              output: IO[bytes] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the FDK on the build directory ``function_dir``; return it and its socket.

    ``config`` defaults to this process's environment; the function's log lines go to ``output``.
    """
    function_dir = Path(function_dir).resolve()
    socket_dir.mkdir(parents=True, exist_ok=True)
    socket = socket_dir / "lsnr.sock"
    # The FDK binds "phony" + the socket's name, then links the socket to it; a process that
    # was killed leaves both behind, and a phony one left makes the next bind fail.
    for stale in (socket, socket_dir / f"phony{socket.name}"):
        stale.unlink(missing_ok=True)
    command, env = function_process(function_dir, socket_dir, os.environ if config is None else config)
    env.update({"FN_FORMAT": "http-stream", "FN_LISTENER": f"unix:{socket}", "FN_APP_NAME": "local",
                "FN_FN_NAME": "import-trigger"})
    proc = subprocess.Popen([*command, "-c", FDK_MAIN, str(function_dir / "func.py"), "handler"], env=env,
                            cwd=function_dir, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the FDK did not open its socket")
        time.sleep(0.05)
    return proc, socket


def socket_client(socket: Path, timeout_seconds: float) -> httpx.Client:
    """An HTTP client of the FDK's socket.

    One connection per call: fdk 0.1.128's server spins its event loop on a kept-alive
    connection (its cached clock never advances, so a keep-alive timer re-arms at once),
    burning a CPU core for as long as the connection stays open.
    """
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), timeout=timeout_seconds + 5,
                        limits=httpx.Limits(max_keepalive_connections=0), headers={"Connection": "close"})


def call(client: httpx.Client, body: bytes, timeout_seconds: float, content_type: str = "application/json",
         headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """One invocation as the Fn server makes it; returns the function's HTTP status and answer.

    The FDK passes 200, 502 and 504 through and answers 200 for any other status, unless the
    call comes through API Gateway (``headers={"Fn-Intent": "httprequest"}``): then the
    function's own status arrives in ``Fn-Http-Status``.
    """
    deadline = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=timeout_seconds)
    try:
        reply = client.post("http://function/call", content=body, headers={
            "Fn-Call-Id": uuid.uuid4().hex, "Fn-Deadline": deadline.isoformat().replace("+00:00", "Z"),
            "Content-Type": content_type, **(headers or {})})
    except httpx.HTTPError as exc:
        return 502, json.dumps({"decision": "failed", "reason": f"function unreachable: {exc}",
                                "code": "function-unreachable"}).encode()
    return int(reply.headers.get("Fn-Http-Status", reply.status_code)), reply.content


def make_handler(socket: Path, timeout_seconds: float) -> type[BaseHTTPRequestHandler]:
    client = socket_client(socket, timeout_seconds)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = call(client, body, timeout_seconds, self.headers.get("Content-Type", "application/json"))
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
    parser.add_argument("--function-dir", type=Path, required=True,
                        help="the function's build directory (python -m function_trigger.build DIR)")
    parser.add_argument("--timeout", type=float, default=120.0, help="the function's timeout in seconds")
    args = parser.parse_args(argv)
    proc, socket = start_fdk(args.function_dir, args.socket_dir)
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
