"""The instance metadata service booted machines reach at 169.254.169.254 (localoci/compute/imds.py):
what it answers, run as qemu runs it (a process per connection, the connection on its stdin/stdout)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from localoci.compute.imds import answer

DOCUMENT = {"id": "ocid1.instance.oc1..x", "displayName": "web-01", "region": "local-1",
            "metadata": {"ssh_authorized_keys": "ssh-ed25519 AAAA key@host", "user_data": "I2Nsb3VkLWNvbmZpZw=="}}
ORACLE = "Authorization: Bearer Oracle\r\n"


def request(path: str, headers: str = ORACLE, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}\r\n".encode()


@pytest.mark.parametrize("path,status,body", [
    ("/opc/v2/instance/metadata/ssh_authorized_keys", 200, b"ssh-ed25519 AAAA key@host"),
    ("/opc/v2/instance/displayName", 200, b"web-01"),
    ("/opc/v2/instance/metadata/nothing", 404, b"not found\n"),
    ("/opc/v2/vnics/", 404, b"not found\n"),
    ("/latest/meta-data/", 404, b"not found\n"),
])
def test_it_answers_the_instances_document_by_path(path, status, body):
    assert answer(DOCUMENT, request(path))[0::2] == (status, body)


def test_the_whole_document_is_json_and_v2_wants_the_oracle_header_while_v1_does_not():
    status, kind, body = answer(DOCUMENT, request("/opc/v2/instance/"))
    assert (status, kind, json.loads(body)) == (200, "application/json", DOCUMENT)
    assert answer(DOCUMENT, request("/opc/v2/instance/", headers=""))[0] == 401
    assert answer(DOCUMENT, request("/opc/v1/instance/metadata/user_data", headers=""))[0::2] == (
        200, b"I2Nsb3VkLWNvbmZpZw==")
    assert answer(DOCUMENT, request("/opc/v2/instance/", method="POST"))[0] == 405


def test_it_serves_one_connection_on_its_standard_streams_as_qemu_runs_it(tmp_path: Path):
    document = tmp_path / "imds.json"
    document.write_text(json.dumps(DOCUMENT))
    done = subprocess.run([sys.executable, "-m", "localoci.compute.imds", str(document)],
                          input=request("/opc/v2/instance/metadata/ssh_authorized_keys"), capture_output=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 25" in head and body == b"ssh-ed25519 AAAA key@host"
