"""A streamOptimized VMDK staged through a window (diskimport.agent.window), never whole.

The image streams from the real local OCI through the real streamer; qemu-img writes each
slice from NBD onto a volume file and compares it behind the write, reading the staging file,
which the streamer punches out behind its readers.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from diskimport.worker_vm import slices, transfer
from diskimport.worker_vm.commands import LocalRunner
from diskimport.errors import ImageRejected
from diskimport.worker_vm.qemu_img import QemuImg

from .conftest import head_and_tail

# heavy: each test moves a disk through a bounded window (make test-fast leaves them out).
pytestmark = pytest.mark.heavy

MiB = 1024 * 1024
VIRTUAL = 1024 * MiB
CHUNK = 4 * MiB


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A streamOptimized VMDK: 1 GiB virtual, 320 MiB of incompressible data in runs across it."""
    tmp_path = tmp_path_factory.mktemp("window")
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(VIRTUAL)
        for n in range(10):
            f.seek(n * 100 * MiB + 5 * MiB)
            f.write(os.urandom(32 * MiB))
    target = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(raw), str(target)], check=True)
    raw.unlink()
    return target


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 8 MiB of data, so that the window holds a part of this small image."""
    monkeypatch.setattr(slices, "WINDOW_SLICE", 8 * MiB)
    monkeypatch.setattr(slices, "WINDOW_MARGIN", 8 * MiB)


def write_through(uploaded, image: Path, staging: str, target: Path, window: transfer.Window,
                  digest: tuple[str, str, str] | None = None,
                  streams: list | None = None) -> tuple[transfer.ObjectStream, dict, dict]:
    runner = LocalRunner()
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   head_and_tail(image), transfer.TransferSettings(connections=2, chunk_bytes=CHUNK),
                                   digest=digest, window=window)
    assert stream.windowed
    if streams is not None:
        streams.append(stream)
    try:
        info = transfer.second_opinion(QemuImg(runner), stream.nbd_url, "vmdk", VIRTUAL)
        with open(target, "wb") as f:
            f.truncate(VIRTUAL)
        writer = slices.SliceWriter(runner, QemuImg(runner), "vmdk", VIRTUAL, stream.socket, stream.path,
                                    str(target), target_is_zero=True,
                                    direct_io=not slices.compressed_grains("vmdk", info),
                                    image_bytes=uploaded["size"], windowed=True)
        account = writer.write(stream.finish)
    except BaseException:
        stream.abort()
        raise
    return stream, account, writer.summary()


def test_the_header_tells_compressed_grains(image: Path, tmp_path: Path):
    assert transfer.compressed_grains_header(image.read_bytes()[:512])
    flat = tmp_path / "flat.vmdk"
    subprocess.run(["qemu-img", "create", "-f", "vmdk", str(flat), "64M"], check=True, capture_output=True)
    assert not transfer.compressed_grains_header(flat.read_bytes()[:512])
    assert not transfer.compressed_grains_header(b"KDMV")


def test_the_window_is_bounded_and_holds_two_slices():
    behind, ahead = slices.window_for(8 * 1024 * MiB, 4300 * MiB)
    largest = max(length for _, length in slices.plan_window_slices(8 * 1024 * MiB, 4300 * MiB))
    assert 2 * largest < behind <= slices.MAX_WINDOW and ahead == behind  # the fetch runs as far ahead
    assert slices.window_for(1024 * MiB, 100 * MiB)[0] == 100 * MiB  # the whole of a small image
    # slices too large for a window (a huge sparse disk): the image is staged instead
    assert slices.window_for(64 * 1024 * 1024 * MiB, 600 * 1024 * MiB) is None


def test_a_stream_optimized_vmdk_is_written_through_a_window_with_no_staging_copy(
        localoci, uploaded, image, staging, tmp_path, small_slices):
    behind, ahead = slices.window_for(VIRTUAL, uploaded["size"])
    assert behind + ahead < uploaded["size"] * 0.5  # the window holds a part of the image, not all of it
    target = tmp_path / "volume.img"
    held: list[int] = []  # what the staging file holds, seen while the write runs
    writing = threading.Event()

    def watch() -> None:
        while not writing.wait(0.02):
            try:
                held.append(os.stat(Path(staging) / "image").st_blocks * 512)
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        stream, account, summary = write_through(uploaded, image, staging, target, transfer.Window(behind, ahead))
    finally:
        writing.set()
        watcher.join()

    assert summary["verified_bytes"] == VIRTUAL and summary["slices"] > 4
    # Each byte fetched once: the window held what the comparisons read again.
    present = sum(len(data) for _, data in head_and_tail(image))
    assert account["refetched_bytes"] == 0
    assert account["fetched_bytes"] == uploaded["size"] - present
    assert localoci.admin("GET", "metrics")["objectBytesRead"][uploaded["key"]] == uploaded["size"] - present
    # The staging file never held the image: at most the window (and the pieces handed over), and
    # at the end only those pieces.
    assert held and max(held) <= behind + ahead + 2 * slices.MiB * 64 + present
    assert max(held) < uploaded["size"] * 0.8
    assert os.stat(stream.path).st_blocks * 512 <= present + 64 * 1024
    # An independent look: qemu-img compare of the original file with the volume.
    assert QemuImg(LocalRunner()).compare(str(image), "vmdk", str(target))[0]


def test_bytes_the_window_let_go_are_fetched_again_and_the_write_stays_right(
        localoci, uploaded, image, staging, tmp_path, small_slices):
    target = tmp_path / "volume.img"
    # far too small for two slices: the comparisons read bytes that have left the window
    stream, account, summary = write_through(uploaded, image, staging, target, transfer.Window(CHUNK, CHUNK))
    assert account["refetched_bytes"] > 0
    assert summary["verified_bytes"] == VIRTUAL
    assert QemuImg(LocalRunner()).compare(str(image), "vmdk", str(target))[0]


@pytest.mark.parametrize("right", [True, False])
def test_a_window_holds_the_bytes_against_a_manifests_digest(localoci, uploaded, image, staging, tmp_path,
                                                             small_slices, right):
    expected = hashlib.sha256(image.read_bytes()).hexdigest() if right else "ab" * 32
    window = transfer.Window(*slices.window_for(VIRTUAL, uploaded["size"]))
    if right:
        write_through(uploaded, image, staging, tmp_path / "volume.img", window, ("sha256", expected, "'disk1.vmdk'"))
        return
    streams: list[transfer.ObjectStream] = []
    with pytest.raises(Exception):
        write_through(uploaded, image, staging, tmp_path / "volume.img", window, ("sha256", expected, "'disk1.vmdk'"),
                      streams)
    # as the importer does: whatever failed first, the refusal behind it is what is reported
    refused = streams[0].refusal()
    assert isinstance(refused, ImageRejected) and refused.code == "ova-digest-mismatch"


def test_reads_of_bytes_already_in_the_file_are_ready_and_others_wait():
    """What the NBD export sends from its receiving thread (``ready``) and what it hands to its
    pool to wait for: only bytes in the file now, pinned in a window until released."""
    from diskimport.agent.events import TransferFailed
    from diskimport.agent.fetch import Download
    from diskimport.agent.window import Window

    download = Download(4 * MiB, [], MiB)
    assert download.ready(0, 10) is None
    first = download.take()
    download.advance(first, MiB // 2)
    assert download.ready(0, MiB // 2) == [(None, (0, MiB // 2), None)]
    assert download.ready(0, MiB) is None  # half of it has arrived
    download.advance(first, MiB // 2)
    assert download.ready(MiB - 1, MiB + 1) is None  # the next chunk has not

    window = Window({"window": {"behind": MiB, "ahead": MiB}, "size": 4 * MiB,
                     "url": "http://127.0.0.1:9/object"}, download, None)
    [(data, where, chunk)] = window.ready(10, 20)
    assert data is None and where == (10, 10) and chunk is first and first.pins == 1
    window.release([(data, where, chunk)])
    assert first.pins == 0
    assert window.ready(MiB, MiB + 10) is None  # not fetched yet: the pool's read waits for it
    assert download.limit == MiB + 10 + MiB  # and the fetch may go on from the read
    assert window.ready(3 * MiB, 3 * MiB + 10) is None  # far ahead: fetched on its own, by the pool
    download.fail(TransferFailed("gone"))
    assert download.ready(0, 10) is None and window.ready(0, 10) is None  # the pool replies with the error
