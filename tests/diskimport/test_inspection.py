"""Header inspection of local files standing in for objects (the reader takes byte ranges)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from diskimport.contract import InvalidRequest
from diskimport.errors import ImageRejected
from diskimport.images.inspection import claimed_format, inspect

TIB = 1024**4


def inspect_file(path: Path, claimed: str | None = None, max_virtual: int = 32 * TIB):
    data = path.read_bytes()
    return inspect(lambda a, b: data[a:b], len(data), claimed, max_virtual)


@pytest.mark.parametrize("fmt,options,expected", [
    ("qcow2", None, "qcow2"), ("vmdk", "subformat=monolithicSparse", "vmdk"),
    ("vmdk", "subformat=streamOptimized", "vmdk"), ("vhdx", None, "vhdx"), ("vpc", None, "vpc"),
    ("vpc", "subformat=fixed", "vpc"), ("vdi", None, "vdi"),
])
def test_each_format_is_detected_with_its_virtual_size(gpt_disk, tmp_path, fmt, options, expected):
    image = tmp_path / f"d.{fmt}"
    argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt, *(["-o", options] if options else []), str(gpt_disk),
            str(image)]
    subprocess.run(argv, check=True)
    found = inspect_file(image, claimed=expected)
    info = subprocess.run(["qemu-img", "info", "-f", expected, "--output=json", str(image)], capture_output=True,
                          text=True, check=True).stdout
    import json

    assert found.format == expected and found.virtual_size == json.loads(info)["virtual-size"]


def test_raw_disk_with_gpt_is_raw_of_its_own_size(gpt_disk):
    found = inspect_file(gpt_disk, claimed="raw")
    assert (found.format, found.virtual_size, found.detected_as) == ("raw", gpt_disk.stat().st_size, "gpt")


def test_backing_file_is_refused(tmp_path):
    image = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(image), "1G"],
                   check=True, capture_output=True)
    with pytest.raises(ImageRejected, match="^backing_file: "):
        inspect_file(image)


def test_claimed_and_detected_format_must_agree(gpt_disk, tmp_path):
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(gpt_disk), str(image)], check=True)
    with pytest.raises(ImageRejected, match="^claimed-format-mismatch: "):
        inspect_file(image, claimed="vmdk")


def test_empty_object_and_oversized_images_are_refused(tmp_path, gpt_disk):
    with pytest.raises(ImageRejected, match="^empty: "):
        inspect(lambda a, b: b"", 0, None, TIB)
    with pytest.raises(ImageRejected, match="^too-large: "):
        inspect_file(gpt_disk, max_virtual=1024)


def test_claimed_format_comes_from_metadata_then_suffix():
    assert claimed_format("a/b/disk.VHD") == "vpc"
    assert claimed_format("disk.bin") is None
    assert claimed_format("disk.bin", "QCOW2") == "qcow2"
    with pytest.raises(InvalidRequest, match="^invalid-format: metadata format 'iso'"):
        claimed_format("disk.iso", "iso")
