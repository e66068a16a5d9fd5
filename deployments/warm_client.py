"""The flow-run command of the local stack's work pool: start the run in a warm interpreter.

``python -m prefect.engine`` spends seconds importing Prefect, the SDK and the flow before
a run begins. The warm runner (:mod:`deployments.warm_runner`) has imported them once and
forks a child per run. This client is what the Prefect worker starts instead (standard
library only, so it starts in milliseconds): it hands its environment, working directory
and standard streams to the runner, forwards SIGTERM/SIGINT to the run, and exits with
the run's exit status. The run dies with the client: if the worker kills this process,
the run is killed too, as a cold-started run would be.

Without a runner (``IMPORT_WARM_RUNNER_SOCKET`` unset or nobody listening), or when the
runner's code is older than the checkout, it becomes ``python -m prefect.engine``.
"""

import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "IMPORT_WARM_RUNNER_SOCKET"


def cold_start():
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *sys.argv[1:]])


def send_message(sock, message, fds=()):
    data = json.dumps(message).encode()
    payload = struct.pack(">I", len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], list(fds))
    else:
        sock.sendall(payload)


def read_message(sock):
    header = _recv(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    body = _recv(sock, length)
    return None if body is None else json.loads(body)


def _recv(sock, n):
    buf = b""
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            return None
        buf += data
    return buf


def main():
    path = os.environ.get(SOCKET_ENV)
    if not path:
        cold_start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        send_message(sock, {"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]}, fds=(0, 1, 2))
        hello = read_message(sock)
    except OSError:
        hello = None
    if not hello or "pid" not in hello:
        sock.close()
        cold_start()
    child = int(hello["pid"])

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    result = read_message(sock)
    sys.exit(int(result["exit"]) if result and "exit" in result else 1)


if __name__ == "__main__":
    main()
