"""The refusals made on the worker VM, each with its code: qemu-img's second opinion on the
staged image, and the nested-image check of the written disk. The commands run here as they
run on a worker VM (real qemu-img, real files)."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from diskimport.images import nested
from diskimport.worker_vm import transfer
from diskimport.worker_vm.commands import LocalRunner
from diskimport.errors import ImageRejected
from diskimport.worker_vm.qemu_img import QemuImg

MiB = 1024 * 1024


def qcow2_with_data(tmp: Path) -> Path:
    raw = tmp / "data.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        f.write(b"\x5a" * MiB)
    image = tmp / "image.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    return image


def refusal(call) -> str:
    with pytest.raises(ImageRejected) as refused:
        call()
    return refused.value.code


def test_an_image_qemu_img_cannot_open_as_its_format(tmp_path):
    image = tmp_path / "image.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(1020))
    code = refusal(lambda: transfer.second_opinion(QemuImg(LocalRunner()), str(image), "qcow2", 64 * MiB))
    assert code == "qemu-cannot-read"


def test_a_virtual_size_qemu_img_reads_otherwise_than_the_header(tmp_path):
    image = qcow2_with_data(tmp_path)
    code = refusal(lambda: transfer.second_opinion(QemuImg(LocalRunner()), str(image), "qcow2", 32 * MiB))
    assert code == "qemu-disagrees"
    assert transfer.second_opinion(QemuImg(LocalRunner()), str(image), "qcow2", 64 * MiB).virtual_size == 64 * MiB


def test_a_qcow2_whose_mapping_qemu_img_check_finds_corrupt(tmp_path):
    image = qcow2_with_data(tmp_path)
    with open(image, "r+b") as f:
        f.seek(40)  # l1_table_offset
        l1_offset = struct.unpack(">Q", f.read(8))[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        entry = struct.unpack(">Q", f.read(8))[0]
        f.seek(l2_offset)  # point the first data cluster at an unaligned offset
        f.write(struct.pack(">Q", entry | 0x200))
    code = refusal(lambda: transfer.second_opinion(QemuImg(LocalRunner()), str(image), "qcow2", 64 * MiB))
    assert code == "qemu-check-failed"


def test_a_written_disk_that_is_itself_an_image(tmp_path):
    image = qcow2_with_data(tmp_path)
    code = refusal(lambda: nested.check_not_nested(LocalRunner(), str(image), image.stat().st_size))
    assert code == "nested-image"
    disk = tmp_path / "plain.raw"
    disk.write_bytes(bytes(4 * MiB))
    nested.check_not_nested(LocalRunner(), str(disk), 4 * MiB)
