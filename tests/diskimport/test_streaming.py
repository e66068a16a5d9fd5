"""The streaming transfer (diskimport.agent.stream + diskimport.worker_vm.transfer) against the real local OCI.

The stream program runs as a real process (as it does on a worker); qemu-img reads the image
over its NBD socket while the ranged GETs fill the local copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from diskimport.worker_vm import transfer
from diskimport.worker_vm.agent_archive import ARCHIVE_NAME, agent_archive
from diskimport.worker_vm.commands import LocalRunner
from diskimport.worker_vm.qemu_img import QemuImg
from localoci.process import RunningLocalOCI

from .conftest import finish_against_digest, head_and_tail
from tests.waiting import wait_for

MiB = 1024 * 1024


def convert_through(stream: transfer.ObjectStream, target: Path, virtual_size: int) -> None:
    with open(target, "wb") as f:
        f.truncate(virtual_size)
    QemuImg(LocalRunner()).convert(stream.nbd_url, "qcow2", str(target))


def test_stream_converts_while_fetching_and_fetches_each_byte_once(localoci, uploaded, image, staging, tmp_path):
    runner = LocalRunner()
    present = head_and_tail(image)
    events: list[dict[str, Any]] = []
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   present, transfer.TransferSettings(connections=3, chunk_bytes=2 * MiB),
                                   on_event=events.append)
    info = transfer.second_opinion(QemuImg(runner), stream.nbd_url, "qcow2", 256 * MiB)
    assert info.virtual_size == 256 * MiB
    convert_through(stream, tmp_path / "volume.img", info.virtual_size)
    account = stream.finish()

    assert Path(stream.path).read_bytes() == image.read_bytes()
    assert QemuImg(runner).compare(str(image), "qcow2", str(tmp_path / "volume.img"))[0]
    missing = uploaded["size"] - sum(len(d) for _, d in present)
    assert account["fetched_bytes"] == missing
    metrics = localoci.admin("GET", "metrics")
    assert metrics["objectBytesRead"][uploaded["key"]] == missing  # the inspected head and tail were not fetched
    assert os.stat(stream.config).st_mode & 0o077 == 0  # the PAR URL is readable by its owner alone
    assert [e["event"] for e in events][0] == "ready"


def test_failed_reads_are_retried_and_the_transfer_completes(localoci, uploaded, image, staging):
    runner = LocalRunner()
    localoci.admin("POST", "faults", {"operation": "ParGetObject", "status": 503, "code": "ServiceUnavailable",
                                      "count": 4})
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   [], transfer.TransferSettings(connections=2, chunk_bytes=4 * MiB))
    account = stream.finish()
    assert account["retries"] == 4
    assert Path(stream.path).read_bytes() == image.read_bytes()
    assert localoci.admin("GET", "metrics")["objectBytesRead"][uploaded["key"]] == uploaded["size"]


def test_a_replaced_object_ends_the_transfer(localoci, object_storage, bucket, uploaded, staging, tmp_path):
    runner = LocalRunner()
    object_storage.put_object(localoci.namespace, bucket, "disk.qcow2", b"something else entirely")
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   [], transfer.TransferSettings(connections=2, chunk_bytes=4 * MiB))
    with pytest.raises(transfer.TransferFailed, match="412"):
        stream.finish()


def test_reads_of_a_failed_transfer_get_an_io_error(localoci, uploaded, image, staging, tmp_path):
    runner = LocalRunner()
    localoci.admin("POST", "faults", {"operation": "ParGetObject", "status": 404, "code": "NotFound", "count": 100})
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   head_and_tail(image, head=64 * 1024), transfer.TransferSettings(connections=2))
    with pytest.raises(Exception, match="qemu-img convert failed"):
        convert_through(stream, tmp_path / "volume.img", 256 * MiB)
    with pytest.raises(transfer.TransferFailed, match="HTTP 404"):
        stream.finish()


def test_abort_stops_an_unfinished_transfer(localoci, uploaded, staging):
    runner = LocalRunner()
    localoci.admin("POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": 1 * MiB})
    try:
        stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"],
                                       staging, [], transfer.TransferSettings(connections=1, chunk_bytes=MiB))
        stream.abort()
        assert not stream._thread.is_alive()
        assert any(e["event"] == "aborted" for e in stream.events)
    finally:
        localoci.admin("POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": None})


def test_a_connection_lost_mid_body_resumes_from_the_last_byte_received(localoci, uploaded, image, staging):
    runner = LocalRunner()
    localoci.admin("POST", "faults", {"operation": "ParGetObject", "cutAfterBytes": 1536 * 1024, "count": 3})
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   [], transfer.TransferSettings(connections=2, chunk_bytes=4 * MiB))
    account = stream.finish()
    assert account["retries"] == 3
    assert Path(stream.path).read_bytes() == image.read_bytes()
    # Resumed, not restarted: the bytes received before each cut were not fetched again.
    assert account["fetched_bytes"] == uploaded["size"]
    assert localoci.admin("GET", "metrics")["objectBytesRead"][uploaded["key"]] == uploaded["size"]


def _streamer_files(uploaded: dict[str, Any], staging: str) -> tuple[Path, Path]:
    """The programs' archive and the stream's configuration, in ``staging``, as the importer writes them."""
    config = Path(staging) / "stream.json"
    script = Path(staging) / ARCHIVE_NAME
    script.write_bytes(agent_archive())
    config.write_text(json.dumps({
        "url": uploaded["url"], "etag": uploaded["etag"], "size": uploaded["size"],
        "path": f"{staging}/image", "socket": f"{staging}/nbd.sock", "stop_file": f"{staging}/stop",
        "directory": staging, "connections": 1, "chunk_bytes": MiB}))
    return script, config


def _start_detached_streamer(uploaded: dict[str, Any], staging: str, linger: float = 1) -> int:
    """Start the streamer as an SSH session would (slowly reading), the session going away
    ``linger`` seconds later; return its pid."""
    script, config = _streamer_files(uploaded, staging)
    # The shell stands for the SSH session: it starts the streamer and goes away.
    started = LocalRunner().run(["sh", "-c", 'python3 "$1" stream "$2" >/dev/null 2>&1 & echo $!; sleep "$3"', "sh",
                                 str(script), str(config), str(linger)])
    return int(started.stdout.split()[0])


def _gone_within(path: Path, seconds: float) -> bool:
    return wait_for(lambda: not path.exists(), seconds, f"{path} removed")


@pytest.fixture
def slow_reads(localoci: RunningLocalOCI) -> Iterator[None]:
    localoci.admin("POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": 1 * MiB})
    yield
    localoci.admin("POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": None})


@pytest.mark.parametrize("linger", [1, 0])  # 0: the session is gone before the streamer has started
def test_a_streamer_whose_session_ends_removes_the_staging_copy(uploaded, staging, slow_reads, linger):
    """An importer that dies (its SSH session ends) leaves no copy of the image on the worker."""
    _start_detached_streamer(uploaded, staging, linger)
    assert _gone_within(Path(staging), 10)


def test_a_terminated_streamer_removes_the_staging_copy(uploaded, staging, slow_reads):
    """SIGTERM (the worker going down) removes the copy, while the session that started it lives on."""
    script, config = _streamer_files(uploaded, staging)
    streamer = subprocess.Popen(["python3", str(script), "stream", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        # Its image file exists once its handlers are set: a SIGTERM before that (python still
        # starting, on a busy machine) would kill it the default way.
        wait_for((Path(staging) / "image").exists, what="the streamer started")
        streamer.send_signal(signal.SIGTERM)
        assert streamer.wait(timeout=10) == 128 + signal.SIGTERM
        assert not Path(staging).exists()
    finally:
        streamer.kill()


@pytest.mark.parametrize("right", [True, False])
def test_the_fetched_bytes_are_held_against_a_manifests_digest(localoci, uploaded, image, staging, right):
    runner = LocalRunner()
    digest = hashlib.sha256(image.read_bytes()).hexdigest() if right else "ab" * 32
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   head_and_tail(image), transfer.TransferSettings(connections=2, chunk_bytes=4 * MiB),
                                   digest=("sha256", digest, "'disk1.vmdk'"))
    finish_against_digest(stream, right, image.read_bytes(), "'disk1.vmdk'", "SHA256")


def test_a_transfer_stopped_after_its_digest_failed_still_reports_the_refusal(localoci, uploaded, image, staging):
    """The importer stops the transfer as soon as qemu-img's read fails; the refusal behind that
    read error (here a digest that does not match) must still be what the transfer reports."""
    runner = LocalRunner()
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   head_and_tail(image), transfer.TransferSettings(connections=2, chunk_bytes=4 * MiB),
                                   digest=("sha256", "cd" * 32, "'disk1.vmdk'"))
    # qemu-img reads until the digest has failed the transfer: its read fails (EIO), or, when the
    # transfer stopped before or while qemu-img connected, so does its connection
    with pytest.raises(Exception, match="Input/output error|Failed to read initial magic|Connection reset by peer"
                                        "|Failed to connect"):
        while True:
            transfer.second_opinion(QemuImg(runner), stream.nbd_url, "qcow2", 256 * MiB)
    stream.abort()
    refused = stream.refusal()
    assert refused is not None and refused.code == "ova-digest-mismatch", stream.events[-3:]
