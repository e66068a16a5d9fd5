"""The flow-run command of the local stack's work pool: start the run in a warm interpreter.

``python -m prefect.engine`` spends seconds importing Prefect, the SDK and the flow before
a run begins. The warm runner (:mod:`deployments.warm_runner`) has imported them once and
forks a child per run. This client is what the Prefect worker starts instead (standard
library only, so it starts in milliseconds): it hands its environment, working directory
and standard streams to the runner, forwards SIGTERM/SIGINT to the run, and exits with
the run's exit status. The run dies with the client: if the worker kills this process,
the run is killed too, as a cold-started run would be.

Without a runner (``IMPORT_WARM_RUNNER_SOCKET`` unset or nobody listening), or when the
runner's code is older than the checkout, it runs ``python -m prefect.engine``.

A run whose engine fails before the run has begun (the Prefect server restarting as the run
starts: a new client does not retry a refused connection) would be reported Crashed by the
worker without ever having run. So the client first waits for the API to answer, and when
the engine exits with an error while the run is still Pending, it waits for the API again
and starts the engine again, up to three times.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request

SOCKET_ENV = "IMPORT_WARM_RUNNER_SOCKET"
START_ATTEMPTS = 3
API_WAIT_SECONDS = 300
_child = [None]  # the run's process, for the signal handler
_worker = os.getppid()  # the Prefect worker that started this client


def _forward(signum, frame):
    """Pass SIGTERM/SIGINT on to the run; before the run has begun (waiting for the API), there is
    nothing to pass it to, and the signal means this client is to go: it exits. (It used to ignore
    it, and a client started as its stack went down lingered for the API for five minutes.)"""
    if _child[0] is None:
        sys.exit(128 + signum)
    try:
        os.kill(_child[0], signum)
    except ProcessLookupError:
        pass


def _die_with_parent():
    """In the engine's process: be killed when this client dies, however it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cold_start():
    """The engine as a child process that dies with this client; its exit status."""
    process = subprocess.Popen([sys.executable, "-m", "prefect.engine", *sys.argv[1:]], preexec_fn=_die_with_parent)
    _child[0] = process.pid
    return process.wait()


def _api(path):
    """GET a path of the Prefect API as JSON, or None when it does not answer."""
    base = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not base:
        return None
    request = urllib.request.Request(base + path)
    if os.environ.get("PREFECT_API_KEY"):
        request.add_header("Authorization", "Bearer " + os.environ["PREFECT_API_KEY"])
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read() or b"null")
    except (OSError, ValueError):
        return None


def wait_for_api(seconds=API_WAIT_SECONDS):
    """Wait for the API to answer; give up at once if the worker that started this client has
    gone (its stack stopped): nobody would learn how the run ends, and it has not begun."""
    deadline = time.monotonic() + seconds
    while True:
        if os.getppid() != _worker:
            sys.stderr.write("the worker that started this flow run has gone, and the run has not begun\n")
            sys.exit(1)
        if _api("/health") is not None or time.monotonic() >= deadline:
            return
        time.sleep(1)


def never_started():
    """Whether this client's flow run is still waiting to begin (the engine failed before it ran)."""
    run_id = os.environ.get("PREFECT__FLOW_RUN_ID")
    run = _api("/flow_runs/" + run_id) if run_id else None
    if not isinstance(run, dict):
        return False
    state = run.get("state") or {}
    return run.get("run_count") == 0 and state.get("type") in ("PENDING", "SCHEDULED")


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


def start_once():
    """Run the flow run once, warm if a runner takes it, else cold; its exit status."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return cold_start()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        send_message(sock, {"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:]}, fds=(0, 1, 2))
        hello = read_message(sock)
    except OSError:
        hello = None
    if not hello or "pid" not in hello:
        sock.close()
        return cold_start()
    _child[0] = int(hello["pid"])
    result = read_message(sock)
    sock.close()
    return int(result["exit"]) if result and "exit" in result else 1


def main():
    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    for attempt in range(1, START_ATTEMPTS + 1):
        wait_for_api()
        code = start_once()
        _child[0] = None
        if code == 0 or attempt == START_ATTEMPTS:
            break
        wait_for_api()
        if not never_started():
            break
        sys.stderr.write("the flow run's engine exited with %d before the run began; starting it again\n" % code)
    sys.exit(code)


if __name__ == "__main__":
    main()
