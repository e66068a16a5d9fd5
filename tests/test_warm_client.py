"""The flow-run client the local stack's worker starts (deployments/warm_client.py): while it waits
for a Prefect API that does not answer (its stack going down), it goes when told to or when its
worker has gone, instead of waiting out its five minutes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Iterator

import pytest

from localoci.process import alive
from tests.waiting import wait_for


@pytest.fixture
def silent_api() -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A loopback "API" that takes connections and never answers, and the client's environment
    pointing at it: a connection that arrives shows the client is waiting for the API."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(120)
        env = {k: v for k, v in os.environ.items() if k not in ("IMPORT_WARM_RUNNER_SOCKET", "PREFECT_API_KEY")}
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{server.getsockname()[1]}/api"
        yield server, env


def test_a_client_waiting_for_the_api_goes_on_sigterm(silent_api):
    server, env = silent_api
    client = subprocess.Popen([sys.executable, "-m", "deployments.warm_client"], env=env, stderr=subprocess.DEVNULL)
    try:
        connection, _ = server.accept()  # it asks the API: it is waiting, its signal handlers set
        with connection:
            client.send_signal(signal.SIGTERM)
            assert client.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        client.kill()
        client.wait()


def test_a_client_whose_worker_has_gone_stops_waiting(silent_api):
    server, env = silent_api
    # The Python below stands for the worker: it starts the client, says its pid and stays until
    # its standard input closes.
    worker = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys\n"
        "client = subprocess.Popen([sys.executable, '-m', 'deployments.warm_client'], stderr=subprocess.DEVNULL)\n"
        "print(client.pid, flush=True)\n"
        "sys.stdin.read()\n")], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(worker.stdout.readline())
    try:
        connection, _ = server.accept()  # the client is waiting for the API
        connection.close()  # no answer: it asks again a second later, and finds its worker gone
        worker.stdin.close()
        assert worker.wait(timeout=60) == 0
        wait_for(lambda: not alive(pid), 60, "the client of a worker that has gone stopped")
    finally:
        worker.kill()
        worker.wait()
        worker.stdout.close()
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
