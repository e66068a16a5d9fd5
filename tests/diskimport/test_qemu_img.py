"""The qemu-img wrapper against the real qemu-img."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from diskimport.worker_vm.commands import CommandFailed, LocalRunner
from diskimport.guest.filesystems import check_device
from diskimport.worker_vm.qemu_img import QemuImg


@pytest.fixture
def qemu() -> QemuImg:
    return QemuImg(LocalRunner())


def test_info_parses_format_and_virtual_size(qemu, gpt_disk, tmp_path):
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(gpt_disk), str(image)], check=True)
    info = qemu.info(str(image), "qcow2")
    assert info.format == "qcow2" and info.virtual_size == gpt_disk.stat().st_size
    assert info.backing_filename is None and info.data_file is None


def test_info_with_the_wrong_format_fails_instead_of_guessing(qemu, gpt_disk, tmp_path):
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(gpt_disk), str(image)], check=True)
    with pytest.raises(CommandFailed):
        qemu.info(str(image), "vmdk")


def test_info_reports_a_backing_file(qemu, tmp_path):
    image = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", str(image), "1M"],
                   check=True, capture_output=True)
    assert qemu.info(str(image), "qcow2").backing_filename == "/etc/hostname"


def test_unsupported_format_name_is_refused_before_running(qemu):
    with pytest.raises(ValueError, match="unsupported image format 'qed'"):
        qemu.info("/dev/null", "qed")


def test_convert_reports_progress_and_compare_confirms_the_copy(qemu, gpt_disk, tmp_path):
    image = tmp_path / "d.vdi"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vdi", str(gpt_disk), str(image)], check=True)
    target = tmp_path / "volume.img"
    with open(target, "wb") as f:
        f.truncate(gpt_disk.stat().st_size + 1024 * 1024)
    seen: list[float] = []
    qemu.convert(str(image), "vdi", str(target), on_progress=seen.append)
    assert seen and seen[-1] == 100.0 and seen == sorted(seen)
    same, _ = qemu.compare(str(image), "vdi", str(target))
    assert same
    with open(target, "r+b") as f:
        f.seek(2 * 1024 * 1024)
        f.write(b"changed")
    assert qemu.compare(str(image), "vdi", str(target))[0] is False


def test_check_reports_a_clean_image_and_unsupported_formats(qemu, gpt_disk, tmp_path):
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(gpt_disk), str(image)], check=True)
    clean = qemu.check(str(image), "qcow2")
    assert clean.ok and clean.supported and clean.corruptions == 0
    assert qemu.check(str(gpt_disk), "raw").supported is False


def test_filesystem_checks_cover_every_partition(gpt_disk):
    results = check_device(LocalRunner(), str(gpt_disk), gpt_disk.stat().st_size)
    assert [(r.partition, r.filesystem, r.status) for r in results] == [
        (1, "ext4", "clean"), (2, "xfs", "clean"), (3, "vfat", "clean")]


def test_partition_without_filesystem_is_reported_not_checked(tmp_path: Path):
    disk = tmp_path / "empty.raw"
    with open(disk, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    subprocess.run(["sfdisk", "--quiet", str(disk)], input="label: gpt\nstart=2048, size=4096, type=L\n", text=True,
                   check=True)
    [result] = check_device(LocalRunner(), str(disk), 8 * 1024 * 1024)
    assert result.status == "not checked" and "no filesystem" in result.detail
