from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import oci
import pytest

from diskimport.errors import ImageRejected
from diskimport.sample_disk import build_disk
from localoci.process import RunningLocalOCI

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
