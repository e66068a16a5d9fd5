"""The export's upload (diskimport.agent.upload on a real sshd worker, driven by diskimport.worker_vm.upload)
into a multipart upload through a write PAR on the real local OCI."""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import oci
import pytest

from diskimport.worker_vm import upload
from diskimport.worker_vm.agent_archive import ARCHIVE_NAME, agent_archive
from diskimport.worker_vm.commands import LocalRunner
from diskimport.keys import SshKeyPair as KeyPair
from diskimport.worker_vm.session import WorkerSession
from localoci.process import RunningLocalOCI
from tests.waiting import wait_for
from tests.workers import launch_details
from tests import waiting

MiB = 1024 * 1024
NAME = "exports/disk.qcow2"
SIZE = 5 * MiB + 12345  # six parts of 1 MiB, the last short


@pytest.fixture(scope="module")
def worker(compute, network, compartment_id, availability_domains, subnet_id, client_key,
           localoci: RunningLocalOCI) -> Iterator[WorkerSession]:
    """A worker VM of the local OCI (a real sshd on its own loopback address), reached over SSH."""
    host_key = KeyPair.generate()
    instance = compute.launch_instance(launch_details(compartment_id, availability_domains[0], subnet_id,
                                                      client_key, host_key)).data
    try:
        waiting.wait_until(compute, compute.get_instance(instance.id), "lifecycle_state", "RUNNING", max_wait_seconds=60,
                       max_interval_seconds=0.2)
        vnic = compute.list_vnic_attachments(compartment_id, instance_id=instance.id).data[0]
        address = network.get_vnic(vnic.vnic_id).data.private_ip
        with WorkerSession(address, localoci.ssh_port, getpass.getuser(), client_key, host_key) as session:
            session.connect(timeout=60)
            yield session
    finally:
        compute.terminate_instance(instance.id)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse file with random data in a few places (a converted image on the worker's disk)."""
    path = tmp_path / "disk.qcow2"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for offset in (0, 2 * MiB - 100, 4 * MiB + 5, SIZE - 1000):
            f.seek(offset)
            f.write(os.urandom(1000))
    return path


@pytest.fixture
def par(localoci: RunningLocalOCI, object_storage, bucket: str) -> Iterator[Any]:
    details = oci.object_storage.models.CreatePreauthenticatedRequestDetails(
        name="export-test", object_name=NAME, access_type="ObjectWrite",
        time_expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    yield object_storage.create_preauthenticated_request(localoci.namespace, bucket, details).data
    localoci.admin("DELETE", "faults")


def created(localoci: RunningLocalOCI, par: Any) -> dict[str, Any]:
    return upload.create_par_upload(localoci.endpoint + par.access_uri, {"format": "qcow2"}, "application/octet-stream")


def send(worker: WorkerSession, localoci: RunningLocalOCI, made: dict[str, Any], path: Path,
         events: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """Upload ``path`` from the worker into the upload ``made``, in parts of 1 MiB unless told otherwise."""
    return upload.run_upload(worker, localoci.endpoint, made["accessUri"], str(path), on_event=events.append,
                             **{"part_bytes": MiB, **settings})


def commit(object_storage, localoci: RunningLocalOCI, bucket: str, upload_id: str, done: dict[str, Any]) -> bytes:
    """Commit the reported parts as the export does (the signed API) and return the object's bytes."""
    models = oci.object_storage.models
    parts = [models.CommitMultipartUploadPartDetails(part_num=int(n), etag=etag)
             for n, etag in sorted(done["parts"].items(), key=lambda item: int(item[0]))]
    object_storage.commit_multipart_upload(localoci.namespace, bucket, NAME, upload_id,
                                           models.CommitMultipartUploadDetails(parts_to_commit=parts))
    got = object_storage.get_object(localoci.namespace, bucket, NAME)
    assert got.headers["opc-meta-format"] == "qcow2"
    return got.data.content


def test_a_sparse_file_uploads_in_parallel_parts_and_commits_whole(localoci, object_storage, bucket, par, image,
                                                                    worker):
    made = created(localoci, par)
    events: list[dict[str, Any]] = []
    done = send(worker, localoci, made, image, events, connections=3)
    data = image.read_bytes()
    assert sorted(int(n) for n in done["parts"]) == [1, 2, 3, 4, 5, 6]
    assert (done["bytes"], done["uploaded"]) == (SIZE, SIZE)
    assert done["sha256"] == hashlib.sha256(data).hexdigest()
    assert events[0]["event"] == "ready" and events[0]["bind"] == worker.address  # from the SSH session's address
    sent = [e for e in events if e["event"] == "part"]
    assert sorted(e["part"] for e in sent) == [1, 2, 3, 4, 5, 6]
    assert max(e["uploaded"] for e in sent) == SIZE
    assert made["accessUri"].split("/")[2] not in json.dumps(events)  # the token is never printed
    assert commit(object_storage, localoci, bucket, made["uploadId"], done) == data
    # nothing of the uploader (nor its secret) is left on the worker
    left = worker.run(["sh", "-c", "ls -d /dev/shm/oci-disk-import.upload.* /var/tmp/oci-disk-import.upload.* "
                       "2>/dev/null || true"])
    assert left.stdout.strip() == ""


def test_failed_part_uploads_are_retried_and_the_object_is_right(localoci, object_storage, bucket, par, image,
                                                                 worker):
    made = created(localoci, par)
    localoci.admin("POST", "faults", {"operation": "ParUploadPart", "status": 503, "code": "ServiceUnavailable",
                                      "count": 3})
    localoci.admin("POST", "faults", {"operation": "ParUploadPart", "drop": True, "match": {"uploadPartNum": "5"}})
    events: list[dict[str, Any]] = []
    done = send(worker, localoci, made, image, events, connections=2)
    assert len([e for e in events if e["event"] == "retry"]) == 4
    assert commit(object_storage, localoci, bucket, made["uploadId"], done) == image.read_bytes()


def test_a_deleted_par_fails_the_upload_with_its_code(localoci, object_storage, bucket, par, image, worker):
    made = created(localoci, par)
    object_storage.delete_preauthenticated_request(localoci.namespace, bucket, par.id)
    events: list[dict[str, Any]] = []
    with pytest.raises(upload.UploadFailed, match="^par-refused: the PAR or the upload is gone") as failure:
        send(worker, localoci, made, image, events, connections=2)
    assert failure.value.code == "par-refused"
    assert events[-1]["event"] == "failed" and events[-1]["code"] == "par-refused"
    assert made["accessUri"].split("/")[2] not in str(failure.value)
    with pytest.raises(upload.UploadFailed) as refused:
        created(localoci, par)
    assert refused.value.code == "par-refused"


def test_a_refusal_answered_before_the_body_is_read_ends_the_upload_at_once(localoci, object_storage, bucket, par,
                                                                           tmp_path, worker):
    """The server answers a part of a gone PAR without reading its body and hangs up; a part larger
    than the sockets' buffers then fails to send, and the 404 that arrived is what ends the upload."""
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        f.truncate(32 * MiB)
    made = created(localoci, par)
    object_storage.delete_preauthenticated_request(localoci.namespace, bucket, par.id)
    events: list[dict[str, Any]] = []
    with pytest.raises(upload.UploadFailed) as failure:
        send(worker, localoci, made, big, events, connections=2, part_bytes=16 * MiB)
    assert failure.value.code == "par-refused"
    assert [e for e in events if e["event"] == "retry"] == []


def test_skip_parts_resumes_an_interrupted_upload(localoci, object_storage, bucket, par, image, worker):
    made = created(localoci, par)
    # The first run loses part 4 for good (its upload "gone" to this run) after parts 1 to 3.
    localoci.admin("POST", "faults", {"operation": "ParUploadPart", "status": 404, "code": "NotFound",
                                      "match": {"uploadPartNum": "4"}, "count": 100})
    first: list[dict[str, Any]] = []
    with pytest.raises(upload.UploadFailed):
        send(worker, localoci, made, image, first, connections=1)
    localoci.admin("DELETE", "faults")
    kept = {e["part"]: None for e in first if e["event"] == "part"}
    assert sorted(kept) == [1, 2, 3]
    parts = object_storage.list_multipart_upload_parts(localoci.namespace, bucket, NAME, made["uploadId"]).data
    kept = {p.part_number: p.etag for p in parts}

    second: list[dict[str, Any]] = []
    done = send(worker, localoci, made, image, second, connections=2, skip_parts=kept)
    assert sorted(e["part"] for e in second if e["event"] == "part") == [4, 5, 6]
    assert {int(n): etag for n, etag in done["parts"].items() if int(n) <= 3} == kept
    assert done["uploaded"] == SIZE - 3 * MiB
    assert done["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert commit(object_storage, localoci, bucket, made["uploadId"], done) == image.read_bytes()


# -- the program alone: it stops when told to, or when its session ends -------------------------

@pytest.fixture
def silent_server() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: an upload that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield "http://127.0.0.1:%d" % listener.getsockname()[1]


def _program(tmp_path: Path, endpoint: str, image: Path) -> tuple[Path, Path]:
    script = tmp_path / ARCHIVE_NAME
    script.write_bytes(agent_archive())
    config = tmp_path / "upload.json"
    LocalRunner().put_private_file(json.dumps({
        "endpoint": endpoint, "access_uri": "/p/secret-token/n/ns/b/b/u/o/id/x/", "path": str(image),
        "part_bytes": MiB, "connections": 2, "bind": None, "digest": "sha256"}), str(config))
    return script, config


def _ended_within(pid: int, seconds: float) -> bool:
    """Whether the process ends (exits: a zombie until whoever adopted it reaps it) in time."""
    def ended() -> bool:
        try:
            return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
    return wait_for(ended, seconds, f"process {pid} ended")


def test_sigterm_stops_a_hanging_upload_at_once(tmp_path, silent_server, image):
    script, config = _program(tmp_path, silent_server, image)
    process = subprocess.Popen(["python3", str(script), "upload", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    try:
        assert json.loads(process.stdout.readline())["event"] == "ready"  # its handlers are set
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.stdout.close()


def test_an_uploader_whose_session_ends_stops(tmp_path, silent_server, image):
    script, config = _program(tmp_path, silent_server, image)
    # The shell stands for the SSH session: it starts the uploader and goes away a second later.
    started = LocalRunner().run(["sh", "-c", 'python3 "$1" upload "$2" >/dev/null 2>&1 & echo $!; sleep 1', "sh",
                                 str(script), str(config)])
    # Within a third of its 60 s socket timeout (the server never answers): only the orphan check
    # ends it that soon. Not 2 s: under a loaded suite python alone may take that long to start.
    assert _ended_within(int(started.stdout.split()[0]), 20)


@pytest.mark.parametrize("done", [
    "ok",
    # the writer names what it may have rewritten: only parts overlapping it are read again
    json.dumps({"status": "ok", "recheck": [[10, 26], [2 * MiB + 7, 2 * MiB + 1020], [5 * MiB, 5 * MiB + 1]]}),
])
def test_a_file_being_written_is_uploaded_as_it_grows_and_changed_parts_are_sent_again(
        done, localoci, object_storage, bucket, par, tmp_path, worker):
    """Following a file a writer appends to and rewrites (as qemu-img does a qcow2's header and
    tables): parts go as it grows; once the done file says it is final, parts that changed since
    they were sent go again, so the object is the final file."""
    path, done_file = tmp_path / "growing.qcow2", tmp_path / "converted"
    made = created(localoci, par)
    events: list[dict[str, Any]] = []
    import threading

    def writer() -> None:
        with open(path, "wb") as f:
            for n in range(6):
                f.write(os.urandom(MiB))
                f.flush()
                time.sleep(0.2)  # the writer's pace (a file growing as qemu-img writes it), not a wait
            # parts 1 to 5 go meanwhile (one part held back)
            wait_for(lambda: {e.get("part") for e in events if e["event"] == "part"} >= {1, 2, 3, 4, 5},
                     what=f"parts 1 to 5 sent; events {events}")
            f.seek(10)
            f.write(b"header rewritten")   # part 1, sent long ago
            f.seek(2 * MiB + 7)
            f.write(b"table updated")      # part 3
            f.write(os.urandom(1000))
        done_file.write_text(done)

    thread = threading.Thread(target=writer)
    thread.start()
    result = send(worker, localoci, made, path, events, connections=2,
                  follow={"done_file": str(done_file), "hold_back": MiB})
    thread.join()
    data = path.read_bytes()
    final = next(e for e in events if e["event"] == "final")
    assert final["size"] == 6 * MiB and final["parts"] == 6 and final["resent"] == 2
    sent = [e["part"] for e in events if e["event"] == "part"]
    assert sorted(set(sent)) == [1, 2, 3, 4, 5, 6] and sorted(sent).count(1) == 2 and sorted(sent).count(3) == 2
    assert sent.index(5) < sent.index(6)  # parts went before the file was final
    assert result["sha256"] == hashlib.sha256(data).hexdigest() and result["bytes"] == 6 * MiB
    assert commit(object_storage, localoci, bucket, made["uploadId"], result) == data


def test_a_followed_file_whose_writer_failed_fails_the_upload(localoci, par, tmp_path, worker):
    path, done_file = tmp_path / "half.qcow2", tmp_path / "converted"
    path.write_bytes(os.urandom(3 * MiB))
    done_file.write_text("failed: qemu-img convert: No space left on device")
    made = created(localoci, par)
    with pytest.raises(upload.UploadFailed, match="^source-failed: the file's writer failed: failed: qemu-img"):
        send(worker, localoci, made, path, [], follow={"done_file": str(done_file), "hold_back": MiB})
