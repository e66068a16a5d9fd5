"""Fixed VHDs (Azure's only VHD, what Hyper-V and ``qemu-img -o subformat=fixed`` make): found by
the footer in the object's last 512 bytes, sized by the footer's current size, and written so
the volume holds exactly that many bytes of the disk.

Images are made by qemu-img, or as Hyper-V and Azure make them: the raw disk, then a footer
whose CHS geometry covers less than its current size (the spec's geometry rounds down).
The commands run here as they run on a worker VM (real qemu-img, real files).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from diskimport.images import nested
from diskimport.worker_vm import slices, transfer
from diskimport.worker_vm.commands import LocalRunner
from diskimport.errors import ImageRejected
from diskimport.images.inspection import Inspection, inspect
from diskimport.worker_vm.qemu_img import QemuImg

from .test_hostile_images import fixed_vhd, fixed_vhd_of, rewrite_vhd_footer, vhd_checksum

MiB = 1024 * 1024
TIB = 1024**4


def chs(size: int) -> tuple[int, int, int]:
    """The VHD specification's CHS geometry for a disk of ``size`` bytes (rounds down)."""
    total = min(size // 512, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def footer(current_size: int, *, creator: bytes = b"win ", geometry: tuple[int, int, int] | None = None) -> bytes:
    """A fixed VHD footer as Hyper-V writes it."""
    cylinders, heads, sectors = geometry or chs(current_size)
    fields = struct.pack(">8sIIQI4sI4sQQHBBII16sB", b"conectix", 2, 0x00010000, 0xFFFFFFFFFFFFFFFF, 0, creator,
                         0x000A0000, b"Wi2k", current_size, current_size, cylinders, heads, sectors, 2, 0,
                         uuid.uuid4().bytes, 0)
    sector = bytearray(fields.ljust(512, b"\0"))
    sector[64:68] = struct.pack(">I", vhd_checksum(bytes(sector)))
    return bytes(sector)


def disk(tmp: Path, size: int) -> Path:
    """A raw disk with incompressible data at its start, its middle and in its last MiB."""
    path = tmp / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in (0, size // 2, size - MiB):
            f.seek(offset)
            f.write(os.urandom(MiB))
    return path


def as_fixed_vhd(raw: Path, target: Path, **footer_fields) -> Path:
    """The disk followed by its footer, as Hyper-V and Azure lay a fixed VHD out."""
    shutil.copyfile(raw, target)
    with open(target, "ab") as f:
        f.write(footer(raw.stat().st_size, **footer_fields))
    return target


def inspect_file(path: Path, claimed: str | None = "vpc") -> Inspection:
    """The header inspection of ``path`` as an upload: only the ranges it asks for are read."""
    with open(path, "rb") as f:
        def read_range(start: int, end: int) -> bytes:
            f.seek(start)
            return f.read(end - start)

        return inspect(read_range, path.stat().st_size, claimed, 32 * TIB)


def qemu_vpc_size(path: Path) -> int:
    """The virtual size qemu's ``vpc`` driver gives the image by default."""
    out = subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)["virtual-size"]


def refusal(path: Path, claimed: str | None = "vpc") -> str:
    with pytest.raises(ImageRejected) as refused:
        inspect_file(path, claimed)
    return refused.value.code


# -- found and sized by the footer ----------------------------------------------------------------

@pytest.mark.parametrize("claimed", ["vpc", None])
def test_a_fixed_vhd_made_by_qemu_img_is_accepted_with_its_footers_size(gpt_disk, tmp_path, claimed):
    image = fixed_vhd_of(tmp_path, gpt_disk)
    found = inspect_file(image, claimed)
    assert (found.format, found.detected_as, found.driver) == ("vpc", "vhd-fixed", "raw")
    assert found.virtual_size == image.stat().st_size - 512 == qemu_vpc_size(image)
    assert found.virtual_size >= gpt_disk.stat().st_size  # qemu-img rounds up to a whole geometry


def test_a_vhd_made_like_hyper_v_is_sized_by_its_current_size_not_its_geometry(tmp_path):
    raw = disk(tmp_path, 100 * MiB)
    cylinders, heads, sectors = chs(100 * MiB)
    assert cylinders * heads * sectors * 512 < 100 * MiB  # the last sectors lie beyond the geometry
    image = as_fixed_vhd(raw, tmp_path / "azure.vhd")
    assert inspect_file(image).virtual_size == 100 * MiB
    assert inspect_file(image, None).virtual_size == 100 * MiB
    # qemu's vpc driver believes the geometry of a VHD whose creator is Virtual PC: the reason
    # the disk is not read through it.
    vpc_made = as_fixed_vhd(raw, tmp_path / "virtualpc.vhd", creator=b"vpc ")
    assert inspect_file(vpc_made).virtual_size == 100 * MiB
    assert qemu_vpc_size(vpc_made) == cylinders * heads * sectors * 512


def test_a_footer_that_straddles_the_head_and_the_tail_is_found(tmp_path):
    # 4 MiB are read from the start: this object's last 512 bytes begin 256 bytes before that.
    image = tmp_path / "odd.vhd"
    with open(image, "wb") as f:
        f.truncate(4 * MiB - 256)
        f.seek(0, 2)
        f.write(footer(4 * MiB - 256, geometry=(1, 1, 1)))
    assert refusal(image) == "vhd-size-mismatch"  # a footer, refused for a size of no whole sectors


def test_a_tiny_fixed_vhd_read_in_one_piece(tmp_path):
    image = fixed_vhd(tmp_path, "1M")
    assert inspect_file(image).virtual_size == image.stat().st_size - 512


# -- refused (the hostile corpus has the common cases; these are the finer points) ----------------

def test_a_footer_pointing_at_a_next_structure_is_not_a_fixed_disk(tmp_path):
    assert refusal(rewrite_vhd_footer(fixed_vhd(tmp_path), data_offset=512)) == "vhd-not-fixed"


def test_a_footer_whose_size_is_smaller_than_the_data(tmp_path):
    image = fixed_vhd(tmp_path)
    assert refusal(rewrite_vhd_footer(image, current_size=image.stat().st_size - 512 - MiB)) == "vhd-size-mismatch"


def test_bytes_after_the_footer_make_it_no_fixed_vhd(tmp_path):
    image = fixed_vhd(tmp_path)
    with open(image, "ab") as f:
        f.write(bytes(512))
    assert refusal(image) == "claimed-format-mismatch"  # the end is not a footer: the object is raw


def test_a_fixed_vhd_inside_a_fixed_vhd(tmp_path):
    inner = fixed_vhd(tmp_path, "4M", name="inner.vhd")
    outer = tmp_path / "outer.vhd"
    shutil.copyfile(inner, outer)
    with open(outer, "ab") as f:
        f.write(footer(inner.stat().st_size, geometry=(1, 1, 1)))
    assert refusal(outer) == "nested-image"


def test_the_written_disk_of_a_fixed_vhd_written_whole_is_a_nested_image(tmp_path):
    # What the check after the write sees if a fixed VHD had been written as raw, footer and all.
    image = fixed_vhd(tmp_path)
    with pytest.raises(ImageRejected) as refused:
        nested.check_not_nested(LocalRunner(), str(image), image.stat().st_size)
    assert refused.value.code == "nested-image"
    nested.check_not_nested(LocalRunner(), str(image), image.stat().st_size - 512)


# -- the second opinion and the write --------------------------------------------------------------

@pytest.mark.parametrize("creator", [b"win ", b"vpc "])
def test_the_second_opinion_reads_the_footers_size(tmp_path, creator):
    image = as_fixed_vhd(disk(tmp_path, 100 * MiB), tmp_path / "image.vhd", creator=creator)
    qemu = QemuImg(LocalRunner())
    info = transfer.second_opinion(qemu, str(image), "vpc", 100 * MiB, "raw")
    assert (info.format, info.virtual_size) == ("raw", 100 * MiB)
    for wrong in (100 * MiB - 512, 100 * MiB + 512):
        with pytest.raises(ImageRejected) as refused:
            transfer.second_opinion(qemu, str(image), "vpc", wrong, "raw")
        assert refused.value.code == "qemu-disagrees"
    with pytest.raises(ImageRejected) as refused:  # a window beyond the object's end does not open
        transfer.second_opinion(qemu, str(image), "vpc", 101 * MiB, "raw")
    assert refused.value.code == "qemu-cannot-read"


def test_a_fixed_vhd_above_qemus_vpc_limit_is_read_as_its_raw_data(tmp_path):
    size = 3 * TIB  # Azure's fixed VHDs may pass 2040 GiB, which qemu's vpc driver refuses
    image = tmp_path / "large.vhd"
    with open(image, "wb") as f:
        f.truncate(size)
        f.seek(size)
        f.write(footer(size))
    found = inspect_file(image)
    assert (found.virtual_size, found.driver) == (size, "raw")
    assert transfer.second_opinion(QemuImg(LocalRunner()), str(image), "vpc", size, "raw").virtual_size == size


@pytest.mark.parametrize("made_by", ["qemu-img", "hyper-v", "virtual-pc"])
def test_the_volume_holds_the_raw_disk_exactly(tmp_path, made_by):
    size = 100 * MiB + 512  # not a whole geometry: its last sectors lie beyond the CHS size
    raw = disk(tmp_path, size)
    if made_by == "qemu-img":
        image = fixed_vhd_of(tmp_path, raw)  # qemu-img pads the disk up to a whole geometry
    else:
        image = as_fixed_vhd(raw, tmp_path / "image.vhd", creator=b"win " if made_by == "hyper-v" else b"vpc ")
    found = inspect_file(image)
    expected = raw.read_bytes().ljust(found.virtual_size, b"\0")
    assert found.virtual_size == image.stat().st_size - 512 >= size

    # The write as the importer makes it: qemu-img convert, slice by slice, from the image's node
    # onto a volume larger than the disk.
    qemu = QemuImg(LocalRunner())
    info = transfer.second_opinion(qemu, str(image), found.format, found.virtual_size, found.driver)
    volume = tmp_path / "volume"
    with open(volume, "wb") as f:
        f.truncate(found.virtual_size + 64 * MiB)
    for offset, length in slices.plan_slices(info.virtual_size):
        qemu.convert_nodes(slices.format_node(found.driver or found.format, offset, length, filename=str(image)),
                           slices.device_node(str(volume), offset, length, direct=False), target_is_zero=True)
    written = volume.read_bytes()
    assert written[:found.virtual_size] == expected
    assert written[found.virtual_size:] == bytes(64 * MiB)
