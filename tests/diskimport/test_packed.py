"""Inspection of compressed and packed uploads (diskimport.images.packed) on local files standing in for objects."""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from diskimport.errors import ImageRejected
from diskimport.images.packed import Packed, inspect_object

MiB = 1024 * 1024
TIB = 1024**4


def small_disk(path: Path, size: int = 16 * MiB, random_mib: int = 2) -> Path:
    """A raw disk with a GPT and some incompressible data."""
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", str(path)], input="label: gpt\n,,L\n", text=True, check=True,
                   capture_output=True)
    with open(path, "r+b") as f:
        f.seek(2 * MiB)
        f.write(os.urandom(random_mib * MiB))
    return path


def compress(path: Path, tool: str, *args: str) -> Path:
    ext = {"gzip": "gz", "xz": "xz", "zstd": "zst", "bzip2": "bz2"}[tool]
    target = path.with_name(f"{path.name}.{ext}")
    with open(target, "wb") as out:
        subprocess.run([tool, *args, "-c", str(path)], stdout=out, check=True)
    return target


def inspect_file(path: Path, name: str | None = None, declared: int | None = None, max_virtual: int = 32 * TIB,
                 metadata_format: str | None = None):
    data = path.read_bytes()
    reads: list[tuple[int, int]] = []

    def read_range(a: int, b: int) -> bytes:
        reads.append((a, b))
        return data[a:b]

    found, packed = inspect_object(read_range, len(data), name or path.name, metadata_format, declared, max_virtual)
    return found, packed


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return small_disk(tmp_path / "disk.raw")


@pytest.mark.parametrize("tool,container", [("gzip", "gzip"), ("xz", "xz"), ("zstd", "zstd")])
def test_a_small_compressed_raw_disk_is_sized_exactly(disk, tool, container):
    found, packed = inspect_file(compress(disk, tool))
    assert (found.format, found.virtual_size, found.detected_as) == ("raw", 16 * MiB, "gpt")
    assert packed == Packed(container, 0, 16 * MiB)


def test_a_disk_that_decompresses_whole_within_the_head_needs_no_record(tmp_path):
    disk = small_disk(tmp_path / "tiny.raw", size=3 * MiB, random_mib=0)
    found, packed = inspect_file(compress(disk, "bzip2"))
    assert found.virtual_size == 3 * MiB and packed == Packed("bzip2", 0, 3 * MiB)


@pytest.mark.parametrize("tool,args", [("gzip", ["-1"]), ("xz", ["-0", "-T1", "--block-size=1MiB"]),
                                       ("zstd", ["-1", "-q"])])
@pytest.mark.heavy
def test_a_large_compressed_raw_disk_is_sized_from_the_containers_record(tmp_path, tool, args):
    disk = small_disk(tmp_path / "big.img", size=24 * MiB, random_mib=12)  # more than the 4 MiB head compressed
    target = compress(disk, tool, *args)
    assert target.stat().st_size > 4 * MiB
    found, packed = inspect_file(target)
    assert (found.format, found.virtual_size) == ("raw", 24 * MiB) and packed.inner_size == 24 * MiB


def test_xz_sizes_add_up_over_concatenated_streams(tmp_path):
    disk = small_disk(tmp_path / "two.raw", size=8 * MiB, random_mib=5)
    data = disk.read_bytes()
    half = tmp_path / "half"
    parts = []
    for n, piece in enumerate((data[:6 * MiB], data[6 * MiB:])):
        half.write_bytes(piece)
        parts.append(subprocess.run(["xz", "-0", "-c", str(half)], capture_output=True, check=True).stdout)
    target = tmp_path / "two.raw.xz"
    target.write_bytes(parts[0] + bytes(8) + parts[1])  # with stream padding between
    assert inspect_file(target)[0].virtual_size == 8 * MiB


def test_an_unrecorded_size_is_refused_naming_the_metadata_and_taken_from_it(tmp_path):
    disk = small_disk(tmp_path / "d.raw", size=24 * MiB, random_mib=12)
    target = compress(disk, "bzip2", "-1")
    with pytest.raises(ImageRejected, match="^virtual-size-unknown: .*opc-meta-virtual-size"):
        inspect_file(target)
    found, packed = inspect_file(target, declared=24 * MiB)
    assert found.virtual_size == 24 * MiB and packed == Packed("bzip2", 0, 24 * MiB)


def test_zstd_from_a_pipe_records_no_size(tmp_path):
    disk = small_disk(tmp_path / "d.raw", size=24 * MiB, random_mib=12)
    target = tmp_path / "d.raw.zst"
    with open(disk, "rb") as src, open(target, "wb") as out:
        subprocess.run(["zstd", "-1", "-q", "-c"], stdin=src, stdout=out, check=True)
    with pytest.raises(ImageRejected, match="^virtual-size-unknown: "):
        inspect_file(target)
    assert inspect_file(target, declared=24 * MiB)[0].virtual_size == 24 * MiB


def test_a_declared_size_must_agree_with_the_container(disk):
    with pytest.raises(ImageRejected, match="^virtual-size-mismatch: "):
        inspect_file(compress(disk, "xz"), declared=32 * MiB)


def test_a_recorded_size_above_the_maximum_is_too_large(disk):
    with pytest.raises(ImageRejected, match="^too-large: "):
        inspect_file(compress(disk, "zstd", "-q"), max_virtual=8 * MiB)


def test_a_qcow2_inside_is_checked_like_an_upload(disk, tmp_path):
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(image)], check=True)
    found, packed = inspect_file(compress(image, "zstd", "-q"))
    assert (found.format, found.virtual_size) == ("qcow2", 16 * MiB)
    assert packed.container == "zstd" and packed.inner_size == image.stat().st_size
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", str(overlay), "1G"],
                   check=True, capture_output=True)
    with pytest.raises(ImageRejected, match="^backing_file: "):
        inspect_file(compress(overlay, "gzip"))
    with pytest.raises(ImageRejected, match="^claimed-format-mismatch: "):
        inspect_file(compress(image, "xz"), name="d.raw.xz")


def test_what_does_not_decompress_is_refused(tmp_path, disk):
    bogus = tmp_path / "disk.raw.gz"
    bogus.write_bytes(b"this is not gzip" * 1000)
    with pytest.raises(ImageRejected, match="^decompression-failed: "):
        inspect_file(bogus)
    truncated = tmp_path / "cut.raw.xz"
    truncated.write_bytes(compress(disk, "xz").read_bytes()[:-100])
    with pytest.raises(ImageRejected, match="^decompression-failed: "):
        inspect_file(truncated)


def make_tar(path: Path, members: list[tuple[str, Path | None, bytes]], mode: str = "w",
             fmt: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, source, link in members:
            if source is not None:
                tar.add(str(source), arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, link.decode()
                tar.addfile(info)
    return path


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_a_tar_member_is_a_byte_range_of_the_object(tmp_path, disk, fmt):
    tar = make_tar(tmp_path / "vm.tar", [("images/" + "n" * 120 + ".raw" if fmt != tarfile.USTAR_FORMAT
                                          else "images/disk.raw", disk, b"")], fmt=fmt)
    found, packed = inspect_file(tar)
    assert (found.format, found.virtual_size) == ("raw", 16 * MiB)
    data = tar.read_bytes()
    assert packed.container == "tar" and packed.inner_size == 16 * MiB and packed.inner_offset % 512 == 0
    assert data[packed.inner_offset:packed.inner_offset + packed.inner_size] == disk.read_bytes()


def test_a_tar_gz_member_is_found_in_the_decompressed_head(tmp_path, disk):
    image = tmp_path / "d.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(disk), str(image)], check=True)
    tgz = make_tar(tmp_path / "vm.tgz", [("disk.vmdk", image, b"")], mode="w:gz")
    found, packed = inspect_file(tgz)
    assert (found.format, found.virtual_size) == ("vmdk", 16 * MiB)
    assert packed == Packed("tar.gz", 512, image.stat().st_size)


def test_a_tar_of_more_than_one_image_or_of_links_is_refused(tmp_path, disk):
    two = make_tar(tmp_path / "two.tar", [("a.raw", disk, b""), ("b.raw", disk, b"")])
    with pytest.raises(ImageRejected, match="^tar-not-one-image: .*more than one"):
        inspect_file(two)
    link = make_tar(tmp_path / "link.tar", [("a.raw", disk, b""), ("evil", None, b"/etc/shadow")])
    with pytest.raises(ImageRejected, match="^tar-not-one-image: .*symbolic link"):
        inspect_file(link)
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(disk.read_bytes())
    with pytest.raises(ImageRejected, match="^tar-not-one-image: "):
        inspect_file(not_tar)


def test_gzip_isize_is_trusted_only_when_it_can_be_right():
    from diskimport.images.packed import gzip_size

    isize = (24 * MiB).to_bytes(4, "little")
    assert gzip_size(isize, 13 * MiB, 4 * MiB) == 24 * MiB
    assert gzip_size(isize, 5 * 1024**3, 4 * MiB) is None        # the object is 4 GiB or more: modulo 2^32
    assert gzip_size(isize, 30 * MiB, 4 * MiB) is None           # less than the compressed data could hold
    assert gzip_size(isize, 13 * MiB, 25 * MiB) is None          # less than the head already gave
    assert gzip_size((24 * MiB + 1).to_bytes(4, "little"), 13 * MiB, 0) is None  # no whole number of sectors


def test_zstd_of_several_frames_records_no_single_size(tmp_path):
    first = small_disk(tmp_path / "a.raw", size=2 * MiB, random_mib=0)
    frame = subprocess.run(["zstd", "-q", "-c", str(first)], capture_output=True, check=True).stdout
    noise = tmp_path / "noise"
    noise.write_bytes(os.urandom(5 * MiB))
    rest = subprocess.run(["zstd", "-q", "-c", str(noise)], capture_output=True, check=True).stdout
    target = tmp_path / "frames.raw.zst"
    target.write_bytes(frame + rest)
    with pytest.raises(ImageRejected, match="^virtual-size-unknown: "):
        inspect_file(target)


def test_a_declared_size_agreeing_with_gzip_isize_modulo_4_gib_wins(tmp_path):
    """A 4 GiB + 24 MiB disk compressed below 4 GiB records 24 MiB: the uploader's size corrects it."""
    disk = small_disk(tmp_path / "d.raw", size=24 * MiB, random_mib=12)
    target = compress(disk, "gzip", "-1")
    assert inspect_file(target, declared=24 * MiB + 4 * 1024**3)[0].virtual_size == 24 * MiB + 4 * 1024**3
    with pytest.raises(ImageRejected, match="^virtual-size-mismatch: "):
        inspect_file(target, declared=25 * MiB)
