from __future__ import annotations

import datetime as dt
import getpass
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator

import oci
import pytest

from blocks import ImportSettings, OCICredentials, WorkerShape
from diskimport import contract
from diskimport.contract import ImportOptions
from diskimport.errors import ImageRejected
from diskimport.importer import Importer
from diskimport.records import ObjectVersion
from diskimport.run import Run
from diskimport.sample_disk import build_disk
from localoci.process import RunningLocalOCI
from tests.workers import WORKER_IMAGE_ID

MiB = 1024 * 1024

FILES = {"a.txt": b"alpha\n", "b.bin": bytes(range(256)) * 1024}


@pytest.fixture(scope="session")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("core") / "gpt.raw"
    build_disk(raw, FILES, table="gpt")
    return raw


# -- an image uploaded to the local OCI with a read PAR, for the streaming tests ------------

@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A qcow2 with incompressible data spread over 96 MiB of its 256 MiB virtual disk."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(256 * MiB)
        for n in range(12):
            f.seek(n * 20 * MiB + 3 * MiB)
            f.write(os.urandom(8 * MiB))
    target = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(target)], check=True)
    raw.unlink()
    return target


@pytest.fixture
def uploaded(localoci: RunningLocalOCI, object_storage: oci.object_storage.ObjectStorageClient, bucket: str,
             image: Path) -> Iterator[dict[str, Any]]:
    with open(image, "rb") as f:
        etag = object_storage.put_object(localoci.namespace, bucket, "disk.qcow2", f).headers["etag"]
    details = oci.object_storage.models.CreatePreauthenticatedRequestDetails(
        name="stream-test", object_name="disk.qcow2", access_type="ObjectRead",
        time_expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, details).data
    localoci.admin("DELETE", "metrics")
    yield {"url": localoci.endpoint + par.access_uri, "etag": etag, "size": image.stat().st_size,
           "key": f"{localoci.namespace}/{bucket}/disk.qcow2"}
    localoci.admin("DELETE", "faults")


@pytest.fixture
def staging(tmp_path: Path) -> str:
    directory = tmp_path / "staging"
    directory.mkdir(mode=0o700)
    return str(directory)


def head_and_tail(image: Path, head: int = 4 * MiB, tail: int = 64 * 1024) -> list[tuple[int, bytes]]:
    data = image.read_bytes()
    return [(0, data[:head]), (len(data) - tail, data[-tail:])]


def finish_against_digest(stream: Any, right: bool, content: bytes, what: str, algorithm: str) -> None:
    """Finish a transfer given a manifest digest: the staged image if ``right``, else the refusal."""
    if right:
        stream.finish()
        assert Path(stream.path).read_bytes() == content
    else:
        with pytest.raises(ImageRejected, match=f"^ova-digest-mismatch: the bytes of {what} do not match their "
                                                f"{algorithm} in the manifest"):
            stream.finish()


# -- the import core against the local OCI and sshd worker VMs (test_importer, test_export) --------

@pytest.fixture(scope="module")
def credentials(localoci: RunningLocalOCI) -> OCICredentials:
    return OCICredentials(auth_type="config_file", config_file=localoci.oci_config_file, profile=localoci.oci_profile,
                          endpoint=localoci.endpoint, region_endpoints={"local-2": localoci.endpoint_of("local-2")})


@pytest.fixture(scope="module")
def shape(localoci: RunningLocalOCI, compartment_id: str, subnet_id: str) -> WorkerShape:
    return WorkerShape(compartment_id=compartment_id, subnet_id=subnet_id, image_id=WORKER_IMAGE_ID, ocpus=1,
                       memory_in_gbs=16, ssh_user=getpass.getuser(), ssh_port=localoci.ssh_port,
                       use_sudo=os.geteuid() != 0, boot_timeout_seconds=60)


@pytest.fixture
def active_runs() -> set[str]:
    """Flow runs the importer is told are alive (standing in for Prefect's view of runs)."""
    return set()


@pytest.fixture
def make_run(credentials: OCICredentials, shape: WorkerShape, compartment_id: str,
             active_runs: set[str]) -> Iterator[Any]:
    """A new run context each call (a new flow run, alive), with these import settings."""
    def make(**settings: Any) -> Run:
        run_id = str(uuid.uuid4())
        active_runs.add(run_id)
        return Run(credentials.clients(), ImportSettings(compartment_id=compartment_id, **settings), shape,
                   run_id=run_id, run_is_active=active_runs.__contains__)
    yield make


@pytest.fixture
def make_importer(make_run: Any) -> Iterator[Any]:
    def make(**settings: Any) -> Importer:
        return Importer(make_run(**settings), competing_poll_seconds=0.1)
    yield make


@pytest.fixture
def web01(localoci: RunningLocalOCI, object_storage: Any, bucket: str, gpt_disk: Path,
             tmp_path: Path) -> tuple[str, Path]:
    """The test disk as a qcow2 in the bucket: ``(object name, the raw disk it holds)``."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(gpt_disk), str(image)], check=True)
    with open(image, "rb") as f:
        object_storage.put_object(localoci.namespace, bucket, "team/web01.qcow2", f)
    return "team/web01.qcow2", gpt_disk


def live(localoci: RunningLocalOCI, kind: str, version: ObjectVersion) -> list[dict[str, Any]]:
    """The import's resources that exist and are not on their way out."""
    return [r for r in localoci.inventory(**{contract.TAG_IMPORT_ID: version.import_id})[kind]
            if r["lifecycleState"] not in ("TERMINATING", "TERMINATED")]


def everything(localoci: RunningLocalOCI) -> set[tuple[str, str]]:
    """Every resource the local OCI holds in any region, ended ones too, by kind and id: what a
    refused request leaves as it found it."""
    inventory = localoci.admin("GET", "inventory?all=1")
    return {(kind, str(record.get("id") or record.get("uploadId") or record))
            for kind, records in inventory.items() if isinstance(records, list) for record in records}


def version_of(importer: Importer, localoci: RunningLocalOCI, bucket: str, name: str = "team/web01.qcow2"
               ) -> ObjectVersion:
    return importer.read_object(localoci.namespace, bucket, name, None)


def import_object(importer: Importer, version: ObjectVersion, parameters: ImportOptions = ImportOptions(),
                  force: bool = False, sync: bool = False) -> dict[str, Any]:
    """The flow's order of steps, without Prefect."""
    options = importer.options(version, parameters)
    image = importer.inspect(version, options)
    previous = importer.previous_imports(version, force, sync or image.delta_base is not None, image.delta_base)
    if previous.imported is not None:
        return importer.reused_summary(version, previous.imported).as_dict()
    with importer.run:
        importer.remove_stale_workers(version)
        worker, volume = importer.provision(version, image, options, previous)
        with importer.run.session(worker) as session:
            qemu_img = importer.run.prepare_worker(session)
            write = importer.volume_write(session, worker, volume, version, image)
            written = write.write()
            checks = write.check()
            write.detach()
        finished = importer.finish_volume(volume, options)
        importer.run.terminate_worker(worker)
    return importer.summary(version, image, volume, finished, written, checks, qemu_img, dt_now()).as_dict()


def dt_now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


def volume_holds(localoci: RunningLocalOCI, volume_id: str, raw: Path) -> bool:
    backing = next(v["backingFile"] for v in localoci.inventory()["volumes"] if v["id"] == volume_id)
    size = raw.stat().st_size
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw),
                           f"json:{{\"driver\":\"raw\",\"size\":{size},\"file\":{{\"driver\":\"file\","
                           f"\"filename\":\"{backing}\"}}}}"], capture_output=True, text=True)
    return done.returncode == 0


@pytest.fixture(scope="module")
def small_volumes(localoci: RunningLocalOCI) -> Iterator[None]:
    """1 GB volumes (OCI's smallest is 50 GB): a raw or VHD export uploads every byte of its volume."""
    localoci.admin("POST", "limits", {"minVolumeSizeInGBs": 1})
    yield
    localoci.admin("POST", "limits", {"minVolumeSizeInGBs": 50})


@pytest.fixture
def no_faults(localoci: RunningLocalOCI) -> Iterator[None]:
    """No injected fault before the test, none left after it."""
    localoci.admin("DELETE", "faults")
    yield
    localoci.admin("DELETE", "faults")
