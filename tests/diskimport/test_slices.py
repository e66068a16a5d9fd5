"""The slice-by-slice write with verification behind it (diskimport.worker_vm.slices), on real qemu-img.

The image streams from the real local OCI through the real streamer; each slice is
converted from NBD onto a volume file and compared behind the write. A sync writes a new version
through the agent's sync target onto a volume holding an earlier one, only the pages that differ.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from diskimport.worker_vm import slices, transfer
from diskimport.worker_vm.commands import LocalRunner
from diskimport.worker_vm.qemu_img import QemuImg
from diskimport.worker_vm.sync_target import SyncTarget

from .conftest import head_and_tail

MiB = 1024 * 1024
GiB = 1024 * MiB
VIRTUAL = 3 * GiB
DATA = [(0, 8 * MiB), (1600 * MiB, 24 * MiB), (VIRTUAL - 4 * MiB, 4 * MiB)]  # a long zero run between


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A sparse qcow2: 3 GiB virtual, incompressible data at its start, middle and end."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(VIRTUAL)
        for offset, length in DATA:
            f.seek(offset)
            f.write(os.urandom(length))
    target = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(target)], check=True)
    raw.unlink()
    return target


def test_plan_slices_cover_the_disk_in_whole_mib_pieces():
    assert slices.plan_slices(128 * MiB) == [(0, 128 * MiB)]
    assert slices.plan_slices(GiB) == [(n * 256 * MiB, 256 * MiB) for n in range(4)]
    planned = slices.plan_slices(64 * GiB + 3 * MiB)
    assert len(planned) == slices.MAX_SLICES
    assert planned[0][0] == 0 and sum(length for _, length in planned) == 64 * GiB + 3 * MiB
    assert all(offset % MiB == 0 for offset, _ in planned)
    assert all(a + la == b for (a, la), (b, _) in zip(planned, planned[1:]))
    # A sparse image gets a slice per 256 MiB of its file, not of its virtual disk.
    assert len(slices.plan_slices(64 * GiB, image_bytes=GiB + MiB)) == 4
    assert len(slices.plan_slices(64 * GiB, image_bytes=MiB)) == 1


def test_pieces_split_a_slice_around_long_zero_runs():
    zeros = [(100, 50), (400, 1000)]
    assert slices.pieces_for(0, 300, zeros) == [
        slices.Piece("compare", 0, 100), slices.Piece("zero", 100, 50), slices.Piece("compare", 150, 150)]
    assert slices.pieces_for(300, 200, zeros) == [slices.Piece("compare", 300, 100), slices.Piece("zero", 400, 100)]
    assert slices.pieces_for(500, 100, zeros) == [slices.Piece("zero", 500, 100)]


def start(uploaded, image: Path, staging: str) -> transfer.ObjectStream:
    runner = LocalRunner()
    stream = transfer.start_stream(runner, runner, uploaded["url"], uploaded["etag"], uploaded["size"], staging,
                                   head_and_tail(image), transfer.TransferSettings(connections=2, chunk_bytes=MiB))
    transfer.second_opinion(QemuImg(runner), stream.nbd_url, "qcow2", VIRTUAL)
    return stream


def volume(tmp_path: Path, garbage_at: list[int] = ()) -> Path:
    path = tmp_path / "volume.img"
    with open(path, "wb") as f:
        f.truncate(VIRTUAL)
        for offset in garbage_at:
            f.seek(offset)
            f.write(b"left over from an earlier life")
    return path


def test_each_slice_is_written_and_verified_behind_the_write(localoci, uploaded, image, staging, tmp_path):
    runner = LocalRunner()
    stream = start(uploaded, image, staging)
    target = volume(tmp_path)
    progress: list[float] = []
    verified: list[int] = []
    writer = slices.SliceWriter(runner, QemuImg(runner), "qcow2", VIRTUAL, stream.socket, stream.path, str(target),
                                target_is_zero=True, on_progress=progress.append,
                                on_verified=lambda done, total: verified.append(done))
    account = writer.write(stream.finish)

    assert account["fetched_bytes"] > 0
    summary = writer.summary()
    assert summary["slices"] == 12 and summary["verified_bytes"] == VIRTUAL
    assert summary["zero_runs_bytes"] >= GiB  # the middle run was zero-checked in one piece
    assert verified == sorted(verified) and verified[-1] == VIRTUAL
    assert progress and max(progress) <= 100 and progress[-1] > 80
    # An independent look: qemu-img compare of the original file with the volume.
    assert QemuImg(runner).compare(str(image), "qcow2", str(target))[0]


@pytest.mark.parametrize("where", ["in a long zero run", "in a short hole between data"])
def test_a_volume_that_does_not_read_back_as_the_image_fails_the_write(localoci, uploaded, image, staging,
                                                                       tmp_path, where):
    # The write skips zeros (the volume is said to be fresh), so what was on the volume before stays.
    offset = 1 * GiB if where == "in a long zero run" else 12 * MiB
    runner = LocalRunner()
    stream = start(uploaded, image, staging)
    writer = slices.SliceWriter(runner, QemuImg(runner), "qcow2", VIRTUAL, stream.socket, stream.path,
                                str(volume(tmp_path, [offset])), target_is_zero=True)
    with pytest.raises(slices.VerificationFailed, match="does not hold the image's content") as failure:
        writer.write(stream.finish)
    start_byte = int(str(failure.value).split("bytes ")[1].split("-")[0])
    assert start_byte <= offset  # the message names the slice that differs
    stream.abort()


def test_compressed_grains_are_read_back_through_the_page_cache(tmp_path):
    raw = tmp_path / "small.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(MiB))
    runner = LocalRunner()
    found = {}
    for name, options in (("stream.vmdk", ["-o", "subformat=streamOptimized"]), ("flat.vmdk", []),
                          ("plain.qcow2", [])):
        fmt = name.split(".")[1]
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(tmp_path / name)],
                       check=True)
        found[name] = slices.compressed_grains(fmt, QemuImg(runner).info(str(tmp_path / name), fmt))
    assert found == {"stream.vmdk": True, "flat.vmdk": False, "plain.qcow2": False}


def test_a_volume_that_was_not_fresh_is_written_in_full(localoci, uploaded, image, staging, tmp_path):
    runner = LocalRunner()
    stream = start(uploaded, image, staging)
    target = volume(tmp_path, [1 * GiB, 12 * MiB])
    writer = slices.SliceWriter(runner, QemuImg(runner), "qcow2", VIRTUAL, stream.socket, stream.path, str(target),
                                target_is_zero=False, direct_io=False)  # and through the page cache
    writer.write(stream.finish)
    assert writer.summary()["verified_bytes"] == VIRTUAL
    assert QemuImg(runner).compare(str(image), "qcow2", str(target))[0]


@pytest.mark.heavy  # compares 6 GiB
def test_a_sync_writes_only_the_pages_that_differ_and_the_volume_ends_as_the_image(localoci, uploaded, image,
                                                                                  staging, tmp_path):
    """A volume holding an earlier version of the disk (the image, then changed in places) is synced:
    qemu-img writes every slice through the agent's sync target, which writes only what differs."""
    runner = LocalRunner()
    target = tmp_path / "volume.img"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(target)], check=True)
    changes = {5 * MiB + 100: os.urandom(3 * MiB),         # data rewritten (unaligned: 4 KiB pages either side)
               1 * GiB: os.urandom(2 * MiB),               # data where the image has a long zero run
               1600 * MiB + 4096: bytes(MiB),              # zeros where the image has data
               VIRTUAL - 4096: b"one page at the end"}
    write_at(target, changes)
    changed = sum(len(data) for data in changes.values())
    stream = start(uploaded, image, staging)
    sync = SyncTarget(runner, runner, stream.script, staging, str(target)).start()
    writer = slices.SliceWriter(runner, QemuImg(runner), "qcow2", VIRTUAL, stream.socket, stream.path, str(target),
                                target_is_zero=True, sync_socket=sync.socket)  # a sync never skips zeros
    writer.write(stream.finish)
    account = sync.stop()

    assert writer.summary()["verified_bytes"] == VIRTUAL
    assert QemuImg(runner).compare(str(image), "qcow2", str(target))[0]
    assert account["compared"] == VIRTUAL and account["unchanged"] >= VIRTUAL - 2 * changed
    # Whole pages only: at most a page more at each end of each change.
    assert changed <= account["written"] + account["zeroed"] <= changed + 2 * 4096 * len(changes)
    assert account["zeroed"] >= 2 * MiB - 4096  # the data written into the zero run is zeroed again
    # The image's pages now; a second sync of the same version writes nothing.
    (tmp_path / "again").mkdir(mode=0o700)
    stream = start(uploaded, image, str(tmp_path / "again"))
    sync = SyncTarget(runner, runner, stream.script, str(tmp_path / "again"), str(target)).start()
    slices.SliceWriter(runner, QemuImg(runner), "qcow2", VIRTUAL, stream.socket, stream.path, str(target),
                       target_is_zero=False, sync_socket=sync.socket).write(stream.finish)
    again = sync.stop()
    assert (again["written"], again["zeroed"], again["unchanged"]) == (0, 0, VIRTUAL)


def write_at(path: Path, writes: dict[int, bytes]) -> None:
    with open(path, "r+b") as f:
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
