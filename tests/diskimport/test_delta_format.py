"""The delta upload's formats, with real qemu-img: the qcow2 the client writes (checked clean,
reading as the disk it describes over its backing, committed onto a raw disk as nothing but its
clusters), the block manifest (holes skipped, hostile manifests refused), the client's plan of
what to upload, and the backing names the importer accepts.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from diskimport import delta
from diskimport.agent import manifest
from diskimport.delta import client, qcow2

MiB = 1024 * 1024
BLOCK = manifest.BLOCK


def digests_of(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return bytes(manifest.digest_file(fd, path.stat().st_size))
    finally:
        os.close(fd)


def detached(path: Path) -> str:
    return "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)},
                                 "backing": None})


def test_a_delta_over_the_old_disk_reads_as_the_new_one_and_commits_only_its_blocks(tmp_path):
    old, new = tmp_path / "old.raw", tmp_path / "new.raw"
    size = 600 * MiB + 3 * BLOCK  # L2 tables of 32 MiB, and a disk no whole number of them
    with open(old, "wb") as f:
        f.truncate(size)
        for at in (0, 70 * MiB, 597 * MiB):
            f.seek(at)
            f.write(os.urandom(2 * MiB))
    new.write_bytes(b"")
    subprocess.run(["cp", "--sparse=always", str(old), str(new)], check=True)
    with open(new, "r+b") as f:
        for at, data in ((100, os.urandom(5000)), (70 * MiB, bytes(MiB)), (300 * MiB, os.urandom(BLOCK)),
                         (size - 1000, os.urandom(1000))):
            f.seek(at)
            f.write(data)
    base = manifest.encode({"virtual_size": size}, digests_of(old))
    plan = client.plan(digests_of(new), manifest.decode(base, 1 << 20), "0f" * 16)
    assert len(plan.zeros) == MiB // BLOCK and len(plan.data) == 1 + 1 + 1
    layout = qcow2.Plan(size, plan.data, plan.zeros, delta.backing_name("0f" * 16))
    image = tmp_path / "delta.qcow2"
    with open(new, "rb") as source, open(image, "wb") as out:
        qcow2.write(out, layout, lambda c: os.pread(source.fileno(), BLOCK, c * BLOCK))
    assert image.stat().st_size == layout.file_size < 200 * 1024
    assert subprocess.run(["qemu-img", "check", detached(image)], capture_output=True).returncode == 0
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", "qcow2", str(image)],
                                     capture_output=True, check=True).stdout)
    assert (info["backing-filename"], info["virtual-size"]) == (f"oci-import:{'0f' * 16}", size)

    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(old), "-F", "raw", str(image)], check=True)
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(new)]).returncode == 0
    subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", "-d", str(image)], check=True)
    assert old.read_bytes() == new.read_bytes()


@pytest.mark.parametrize("old_blocks", [1000, 700, 0])  # the same size, a disk that grew, no base
def test_the_plan_compares_block_by_block_whatever_runs_it_skips(old_blocks):
    """The plan skips unchanged (or all-zero) runs of blocks at once; what it keeps is exactly what a
    comparison of every block keeps, a block past the old disk's end counting as zeros."""
    import random

    rng = random.Random(old_blocks)
    pick = [manifest.ZERO, manifest.ZERO, b"\1" * 16, b"\2" * 16]
    old = b"".join(rng.choice(pick) for _ in range(old_blocks))
    new = bytearray(old + b"".join(rng.choice(pick) for _ in range(1000 - old_blocks)))
    for i in rng.sample(range(1000), 40):
        new[i * 16:i * 16 + 16] = rng.choice(pick)
    new = bytes(new)
    base = ({}, old) if old_blocks else None
    planned = client.plan(new, base, "0f" * 16 if base else None)
    data, zeros = [], []
    for i in range(1000):
        now, before = manifest.digest_at(new, i), manifest.digest_at(old, i)
        if base is None:
            if now != manifest.ZERO:
                data.append(i)
        elif now != before:
            (zeros if now == manifest.ZERO else data).append(i)
    assert (list(planned.data), list(planned.zeros)) == (data, zeros) and (data or zeros)


@pytest.mark.parametrize("data,zeros", [([64 * MiB // BLOCK], []), ([], [-1])])
def test_a_layout_with_a_cluster_outside_the_disk_is_refused(data, zeros):
    with pytest.raises(ValueError, match="outside the disk"):
        qcow2.Plan(64 * MiB, data, zeros, None)


def test_a_whole_push_is_a_qcow2_of_the_non_zero_blocks_alone(tmp_path):
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(10 * MiB)
        f.write(os.urandom(MiB) + bytes(MiB) + os.urandom(7))
    plan = client.plan(digests_of(disk), None, None)
    assert plan.base is None and not plan.zeros and len(plan.data) == MiB // BLOCK + 1
    image = tmp_path / "whole.qcow2"
    with open(disk, "rb") as source, open(image, "wb") as out:
        qcow2.write(out, qcow2.Plan(64 * MiB, plan.data, [], None), lambda c: os.pread(source.fileno(), BLOCK,
                                                                                         c * BLOCK))
    assert subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True).returncode == 0
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image), str(disk)]).returncode == 0


def test_the_manifest_skips_holes_and_a_hostile_manifest_is_refused(tmp_path):
    disk = tmp_path / "sparse.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of holes: read by their data extents, in no time
        f.seek(5 * BLOCK + 10)
        f.write(b"x")
    digests = digests_of(disk)
    assert len(digests) == (64 << 30) // BLOCK * manifest.DIGEST_BYTES
    assert [i for i in range(6) if manifest.digest_at(digests, i) != manifest.ZERO] == [5]
    good = manifest.encode({"virtual_size": 64 * MiB}, bytes(64 * MiB // BLOCK * manifest.DIGEST_BYTES))
    header, _ = manifest.decode(good, 1 << 20)
    assert header["virtual_size"] == 64 * MiB

    def framed(head: dict, body: bytes) -> bytes:
        text = json.dumps(head).encode()
        return manifest.MAGIC + struct.pack(">I", len(text)) + text + body

    blocks = 64 * MiB // BLOCK
    head = {"block_size": BLOCK, "digest": manifest.DIGEST, "virtual_size": 64 * MiB, "blocks": blocks}
    hostile = {
        "not a manifest": b"QFI\xfb" + bytes(100),
        "a huge header": manifest.MAGIC + struct.pack(">I", 1 << 30),
        "another block size": framed({**head, "block_size": 4096}, b""),
        "a count that disagrees": framed({**head, "blocks": 3}, b""),
        "a bomb": framed(head, zlib.compress(bytes(1 << 26))),
        "too few digests": framed(head, zlib.compress(bytes(16))),
        "more blocks than asked for": framed({**head, "virtual_size": 1 << 50, "blocks": (1 << 50) // BLOCK}, b""),
    }
    for what, data in hostile.items():
        with pytest.raises(manifest.ManifestError):
            manifest.decode(data, blocks)
            pytest.fail(what)


@pytest.mark.parametrize("name, accepted", [
    ("oci-import:" + "a1" * 16, True),
    ("oci-import:" + "A1" * 16, False),
    ("oci-import:" + "a1" * 15, False),
    ("oci-import:" + "a1" * 16 + "/../x", False),
    ("/var/lib/images/base.raw", False),
    ("oci-import:", False),
    (None, False),
])
def test_only_an_import_id_is_a_delta_reference(name, accepted):
    assert (delta.base_import(name) is not None) == accepted


def test_a_push_of_an_image_file_is_refused_before_anything_goes_up(tmp_path):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MiB)
        f.write(os.urandom(MiB))
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    subprocess.run(["truncate", "-s", "%512", str(image)], check=True)  # sector-sized, as a raw disk must be
    with pytest.raises(client.PushRefused, match="is a qcow2 image, not a raw disk"):
        client.push(None, "ns", "bucket", "app/disk.qcow2", image, tmp_path / "work")
    with pytest.raises(client.PushRefused, match="must end in .qcow2"):
        client.push(None, "ns", "bucket", "app/disk.img", raw, tmp_path / "work")
    assert not (tmp_path / "work").exists()  # nothing was written, nothing was asked of the service


@pytest.mark.parametrize("text, expected", [
    ('[{"start": 0, "length": 1}, {"start": 65536, "length": 65536, "dirty": true}]', [(0, 1), (65536, 65536)]),
    ('{"startOffset": 0, "length": 1048576, "changedArea": [{"start": 16384, "length": 0}, '
     '{"start": 32768, "length": 8}]}', [(32768, 8)]),  # VMware's DiskChangeInfo; an empty area is dropped
    ("[]", []),
    ("not json", "is not JSON"),
    ('{"areas": []}', "neither a list of areas nor an object with a changedArea list"),
    ('[{"start": -1, "length": 10}]', "area 0 is not a start and a length"),
    ('[{"start": 0, "length": 1}, {"start": "0", "length": 1}]', "area 1 is not a start and a length"),
    ('[{"start": true, "length": 1}]', "area 0 is not a start and a length"),
    ('[[0, 1]]', "area 0 is not a start and a length"),
])
def test_changed_areas_are_read_from_a_list_or_vmware_s_shape_and_anything_else_is_refused(text, expected, tmp_path):
    from diskimport.delta import areas

    path = tmp_path / "areas.json"
    path.write_text(text)
    if isinstance(expected, list):
        assert areas.read(path) == expected
    else:
        with pytest.raises(areas.AreasError, match=expected):
            areas.read(path)


def test_changed_areas_become_the_blocks_they_touch_merged_and_one_past_the_disk_is_refused():
    from diskimport.delta import areas

    listed = [(5 * BLOCK + 1, BLOCK), (0, 1), (BLOCK - 1, 2), (6 * BLOCK, BLOCK), (20 * BLOCK, 3 * BLOCK)]
    # blocks 0-1 (the first two areas meet), 5-6 (the unaligned one spans 5 and 6, the next is 6), 20-22
    assert areas.blocks(listed, 64 * BLOCK, BLOCK) == [(0, 2), (5, 2), (20, 3)]
    assert areas.blocks([(64 * BLOCK - 1, 1)], 64 * BLOCK, BLOCK) == [(63, 1)]
    with pytest.raises(areas.AreasError, match="ends past the disk"):
        areas.blocks([(64 * BLOCK - 1, 2)], 64 * BLOCK, BLOCK)
