"""Delta uploads at the import core, against the local OCI with the real SDK, sshd worker VMs and
qemu-img: ``oci-disk-delta push`` (in-process) uploads a guest disk whole, then only the blocks
that changed as a qcow2 over the last import; each sync applies it onto the same volume, which
is then bit-exact with the disk, having written and uploaded little more than what changed. A
delta whose reference is not an import of ours, or not the one the volume holds, is refused
before anything is created; a volume left half-synced is read back whole before it is trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import oci
import pytest

from diskimport import contract, delta
from diskimport.agent import manifest
from diskimport.contract import InvalidRequest
from diskimport.delta import client, qcow2
from diskimport.errors import ImageRejected
from tests.diskimport.conftest import import_object, version_of
from tests.diskimport.test_sync import holds_exactly, tags_of, volume_file
from tests.guest_disks import run_tool

MiB = 1024 * 1024
PAGE = 4096
BLOCK = manifest.BLOCK
NAME = "delta/db01.qcow2"
PART = MiB  # the partition's offset
pytestmark = [pytest.mark.usefixtures("no_faults", "small_volumes"), pytest.mark.heavy]


def fs(disk: Path) -> str:
    return f"{disk}?offset={PART}"  # e2fsprogs open the filesystem inside the disk file


def guest_disk(disk: Path, work: Path) -> None:
    """A GPT disk of 256 MiB with one 200 MiB ext4 partition holding two files."""
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
    run_tool("sfdisk", "--quiet", str(disk), stdin="label: gpt\nstart=2048, size=409600, type=L\n")
    run_tool("mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={PART}", str(disk), "200M")
    for name, size in (("base.bin", 24 * MiB), ("logs.bin", 6 * MiB)):
        put_file(disk, work, name, size)


def put_file(disk: Path, work: Path, name: str, size: int) -> None:
    source = work / name
    source.write_bytes(os.urandom(size))
    run_tool("debugfs", "-w", "-R", f"write {source} {name}", fs(disk))
    source.unlink()


def changed_pages(old: bytes, new_path: Path) -> int:
    """The bytes of the 4 KiB pages that differ between two versions of the disk (the ext4 block size)."""
    new = new_path.read_bytes()
    size = max(len(old), len(new))
    old, new = old.ljust(size, b"\0"), new.ljust(size, b"\0")
    return sum(PAGE for at in range(0, size, PAGE) if old[at:at + PAGE] != new[at:at + PAGE])


def push(object_storage: Any, localoci: Any, bucket: str, disk: Path, work: Path) -> dict[str, Any]:
    return client.push(object_storage, localoci.namespace, bucket, NAME, disk, work, out=io.StringIO())


def synced(make_importer: Any, localoci: Any, bucket: str) -> dict[str, Any]:
    importer = make_importer()
    return import_object(importer, version_of(importer, localoci, bucket, NAME), sync=True)


def test_three_delta_pushes_upload_and_write_what_changed_and_the_volume_is_each_version(
        localoci, make_importer, bucket, object_storage, tmp_path):
    disk, work = tmp_path / "db01.raw", tmp_path / "work"
    guest_disk(disk, tmp_path)
    first = push(object_storage, localoci, bucket, disk, work)
    assert first["base_import"] is None  # nothing imported before: the whole disk (its non-zero blocks)
    assert first["image_bytes"] < 40 * MiB
    imported = synced(make_importer, localoci, bucket)
    volume_id = imported["volume_id"]
    assert imported["synced_from"] is None and holds_exactly(localoci, volume_id, disk)
    tags = tags_of(localoci, volume_id)
    assert tags[contract.TAG_MANIFEST]  # the manifest of what it holds, hashed on the worker
    stored = object_storage.get_object(localoci.namespace, bucket,
                                       delta.manifest_object(imported["import_id"])).data.content
    assert manifest.decode(stored, 1 << 20)[1] == manifest.digest_file(os.open(disk, os.O_RDONLY),
                                                                     disk.stat().st_size)

    # A file written, one deleted: the delta holds what the filesystem changed.
    before = disk.read_bytes()
    put_file(disk, tmp_path, "orders.bin", 10 * MiB)
    run_tool("debugfs", "-w", "-R", "rm logs.bin", fs(disk))
    changed = changed_pages(before, disk)
    second = push(object_storage, localoci, bucket, disk, work)
    assert second["base_import"] == imported["import_id"]
    assert second["image_bytes"] <= 1.1 * changed, (second, changed)
    result = synced(make_importer, localoci, bucket)
    assert (result["volume_id"], result["synced_from"]) == (volume_id, imported["etag"])
    account = result["synced"]
    assert account["written"] + account["zeroed"] <= 1.1 * changed, (account, changed)
    assert holds_exactly(localoci, volume_id, disk)
    tags = tags_of(localoci, volume_id)
    assert (tags[contract.TAG_ETAG], tags[contract.TAG_STATE]) == (second["etag"], contract.STATE_IMPORTED)
    uploads = object_storage.list_objects(localoci.namespace, bucket, prefix=delta.UPLOADS).data.objects
    assert uploads == []  # the client's manifest became the import's

    # The disk grows and its partition and filesystem with it.
    before = disk.read_bytes()
    run_tool("e2fsck", "-fy", fs(disk))
    run_tool("resize2fs", fs(disk), "260M")  # sizes the file to the filesystem's end
    os.truncate(disk, 320 * MiB)
    run_tool("sfdisk", "--quiet", "--relocate", "gpt-bak-std", str(disk))
    run_tool("sfdisk", "--quiet", "-N", "1", str(disk), stdin=", 260M\n")
    put_file(disk, tmp_path, "grown.bin", 8 * MiB)
    changed = changed_pages(before, disk)
    third = push(object_storage, localoci, bucket, disk, work)
    assert third["base_import"] == result["import_id"] and third["image_bytes"] <= 1.1 * changed, (third, changed)
    result = synced(make_importer, localoci, bucket)
    assert result["volume_id"] == volume_id and holds_exactly(localoci, volume_id, disk)
    assert result["synced"]["written"] + result["synced"]["zeroed"] <= 1.1 * changed
    assert tags_of(localoci, volume_id)[contract.TAG_VIRTUAL_SIZE] == str(320 * MiB)
    fsck = subprocess.run(["e2fsck", "-fn", fs(disk)], capture_output=True)
    assert fsck.returncode == 0


def head_of(localoci: Any, volume_id: str) -> bytes:
    with open(volume_file(localoci, volume_id), "rb") as f:
        return f.read(64 * MiB)


def overlay(path: Path, size: int, backing: str | None, block: bytes | None = None) -> Path:
    """A qcow2 of one changed block (block 3: ``block``, random by default) over ``backing``."""
    with open(path, "wb") as f:
        qcow2.write(f, qcow2.Plan(size, [3], [], backing), lambda c: block or os.urandom(qcow2.CLUSTER))
    return path


def test_a_delta_is_applied_only_onto_the_import_it_names(localoci, make_importer, bucket, object_storage,
                                                           tmp_path):
    make = make_importer()
    disk = tmp_path / "small.raw"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(MiB))
    name = "delta/other.qcow2"

    def put(path: Path, metadata: dict[str, str] | None = None) -> Any:
        with open(path, "rb") as f:
            object_storage.put_object(localoci.namespace, bucket, name, f, opc_meta=metadata or {})
        return version_of(make, localoci, bucket, name)

    # A backing file that is a path, or another name, stays refused at the header.
    for backing in ("/etc/passwd", "oci-import:../../x", "json:{\"driver\": \"file\"}"):
        version = put(overlay(tmp_path / "evil.qcow2", 64 * MiB, backing))
        with pytest.raises(ImageRejected) as refused:
            make.inspect(version, make.options(version, contract.ImportOptions()))
        assert refused.value.code == "backing_file"

    # A well-formed reference to an import that is not ours: refused before anything is made.
    version = put(overlay(tmp_path / "foreign.qcow2", 64 * MiB, delta.backing_name("ab" * 16)),
                  {"sync": "true"})
    image = make.inspect(version, make.options(version, contract.ImportOptions()))
    assert image.delta_base == "ab" * 16
    with pytest.raises(InvalidRequest) as refused:
        make.previous_imports(version, sync=True, delta_base=image.delta_base)
    assert refused.value.code == "delta-base-mismatch"
    with pytest.raises(InvalidRequest) as refused:
        make.previous_imports(version, sync=False, delta_base=image.delta_base)
    assert refused.value.code == "delta-base-mismatch"
    assert not [v for v in localoci.inventory()["volumes"]
                if v["freeformTags"].get(contract.TAG_IMPORT_ID) == version.import_id]


def test_a_delta_sync_killed_midway_is_resumed_and_read_back_whole(
        localoci, make_importer, bucket, object_storage, tmp_path, active_runs):
    disk, work = tmp_path / "app.raw", tmp_path / "work"
    with open(disk, "wb") as f:
        f.truncate(128 * MiB)
        f.write(os.urandom(8 * MiB))
    push(object_storage, localoci, bucket, disk, work)
    first = synced(make_importer, localoci, bucket)
    changes = {MiB + 100: os.urandom(2 * MiB), 40 * MiB: os.urandom(MiB), 4 * MiB: bytes(MiB)}
    with open(disk, "r+b") as f:
        for offset, data in changes.items():
            f.seek(offset)
            f.write(data)
    assert push(object_storage, localoci, bucket, disk, work)["base_import"] == first["import_id"]

    # The run dies while its commit has written part of the delta (the rest of the volume is untouched).
    dying = make_importer()
    version = version_of(dying, localoci, bucket, NAME)
    options = dying.options(version, contract.ImportOptions())
    image = dying.inspect(version, options)
    previous = dying.previous_imports(version, sync=True, delta_base=image.delta_base)
    assert previous.sync_base is not None and previous.sync_base.id == first["volume_id"]
    worker, volume = dying.provision(version, image, options, previous)
    with open(volume_file(localoci, volume.id), "r+b") as f:
        f.seek(MiB + 100)
        f.write(changes[MiB + 100][:MiB])
    active_runs.discard(dying.run.run_id)
    dying.run.terminate_worker(worker)

    resumed = synced(make_importer, localoci, bucket)
    assert resumed["volume_id"] == first["volume_id"] and resumed["resumed"] is True
    assert resumed["verified_bytes"] == 128 * MiB  # a volume a sync left half-written is read back whole
    assert holds_exactly(localoci, first["volume_id"], disk)
    assert tags_of(localoci, first["volume_id"])[contract.TAG_STATE] == contract.STATE_IMPORTED


def test_a_delta_that_breaks_its_manifest_or_its_own_tables_is_refused_and_the_volume_kept(
        localoci, make_importer, bucket, object_storage, tmp_path):
    name = "delta/lying.qcow2"
    disk, work = tmp_path / "lying.raw", tmp_path / "work"
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(2 * MiB))
    pushed = client.push(object_storage, localoci.namespace, bucket, name, disk, work, out=io.StringIO())
    importer = make_importer()
    first = import_object(importer, version_of(importer, localoci, bucket, name), sync=True)
    base_import = first["import_id"]
    assert pushed["base_import"] is None

    def upload_delta(image: Path, digests: bytes) -> Any:
        data = manifest.encode({"virtual_size": 64 * MiB}, digests)
        sha = hashlib.sha256(data).hexdigest()
        source = contract.source_id(localoci.namespace, bucket, name)
        object_storage.put_object(localoci.namespace, bucket, delta.upload_object(source, sha), data)
        with open(image, "rb") as f:
            object_storage.put_object(localoci.namespace, bucket, name, f,
                                      opc_meta={"sync": "true", "delta-manifest": sha})
        importer = make_importer()
        return importer, version_of(importer, localoci, bucket, name)

    # Its tables point a cluster outside the file: qemu-img check refuses it before anything is written.
    new_block = os.urandom(BLOCK)
    corrupt = overlay(tmp_path / "corrupt.qcow2", 64 * MiB, delta.backing_name(base_import), new_block)
    layout = qcow2.Plan(64 * MiB, [3], [], delta.backing_name(base_import))
    with open(corrupt, "r+b") as f:  # the data cluster's L2 entry, pointed far past the end
        f.seek(layout.first_l2 * qcow2.CLUSTER + 3 * 8)
        f.write((qcow2.COPIED | (1 << 40)).to_bytes(8, "big"))
    with_block = bytearray(manifest.digest_file(os.open(disk, os.O_RDONLY), 64 * MiB))
    with_block[3 * manifest.DIGEST_BYTES:4 * manifest.DIGEST_BYTES] = manifest.block_digest(new_block)
    importer, version = upload_delta(corrupt, bytes(with_block))
    before = head_of(localoci, first["volume_id"])
    with pytest.raises(ImageRejected) as refused:
        import_object(importer, version, sync=True)
    assert refused.value.code == "qemu-check-failed"
    assert head_of(localoci, first["volume_id"]) == before

    # A delta whose manifest says another thing than it holds: applied, read back, refused; the volume
    # is kept (tagged failed) and its backup holds the version before.
    lying = overlay(tmp_path / "lying.qcow2", 64 * MiB, delta.backing_name(base_import), os.urandom(BLOCK))
    importer, version = upload_delta(lying, bytes(with_block))
    with pytest.raises(InvalidRequest) as refused:
        import_object(importer, version, sync=True)
    assert refused.value.code == "delta-manifest-mismatch" and "block 3 " in str(refused.value)
    tags = tags_of(localoci, first["volume_id"])
    assert tags[contract.TAG_STATE] == contract.STATE_FAILED
    # its manifest stays for a retry of the run; the next sync of the object that succeeds removes it
    source = contract.source_id(localoci.namespace, bucket, name)
    assert object_storage.list_objects(localoci.namespace, bucket, prefix=delta.uploads_of(source)).data.objects


def cut_short(localoci, object_storage, bucket: str, name: str, disk: Path, work: Path, data: int,
              failing_part: int) -> None:
    """A first push of a 64 MiB disk (``data`` bytes of it random) whose upload fails at one part."""
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(data))
    localoci.admin("POST", "faults", {"operation": "UploadPart", "status": 400, "code": "InvalidParameter",
                                      "message": "injected", "match": {"uploadPartNum": str(failing_part)}})
    with pytest.raises(oci.exceptions.ServiceError):
        client.push(object_storage, localoci.namespace, bucket, name, disk, work, parallel=1, part_size=MiB,
                    out=io.StringIO())


def test_a_push_cut_short_resumes_its_upload_where_it_stopped(localoci, bucket, object_storage, tmp_path):
    """The parts are made from the disk as they are sent (nothing but the upload's id is written to the
    work directory); run again, the push sends only the parts the upload does not hold yet."""
    name = "delta/resumed.qcow2"
    disk, work = tmp_path / "resumed.raw", tmp_path / "work"
    cut_short(localoci, object_storage, bucket, name, disk, work, data=6 * MiB, failing_part=4)
    assert [p.suffix for p in work.iterdir()] == [".upload"]  # the upload's id, kept for the next push
    said = io.StringIO()
    pushed = client.push(object_storage, localoci.namespace, bucket, name, disk, work, parallel=1, part_size=MiB,
                         out=said)
    resumed = re.search(r"resuming upload \S+: (\d+) of (\d+) parts already uploaded", said.getvalue())
    assert resumed and 3 <= int(resumed[1]) < int(resumed[2]) == -(-pushed["image_bytes"] // MiB), said.getvalue()
    assert not list(work.iterdir())
    uploaded = tmp_path / "uploaded.qcow2"
    uploaded.write_bytes(object_storage.get_object(localoci.namespace, bucket, name).data.content)
    assert uploaded.stat().st_size == pushed["image_bytes"]
    assert subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(uploaded), str(disk)]).returncode == 0
    head = object_storage.head_object(localoci.namespace, bucket, name).headers
    assert head["opc-meta-sync"] == "true" and head["opc-meta-delta-manifest"] == pushed["manifest_sha256"]


def test_a_push_of_a_disk_changed_since_a_push_cut_short_aborts_that_upload(localoci, bucket, object_storage,
                                                                            tmp_path):
    name = "delta/changed-since.qcow2"
    disk, work = tmp_path / "changed.raw", tmp_path / "work"
    cut_short(localoci, object_storage, bucket, name, disk, work, data=4 * MiB, failing_part=2)
    (unfinished,) = object_storage.list_multipart_uploads(localoci.namespace, bucket).data
    with open(disk, "r+b") as f:
        f.write(os.urandom(BLOCK))
    said = io.StringIO()
    client.push(object_storage, localoci.namespace, bucket, name, disk, work, parallel=2, part_size=MiB, out=said)
    assert f"aborted upload {unfinished.upload_id}" in said.getvalue() and "resuming" not in said.getvalue()
    assert object_storage.list_multipart_uploads(localoci.namespace, bucket).data == []
    assert not list(work.iterdir())


def dirty_areas(live: Path, bitmap: str, out: Path) -> Path:
    """The areas QEMU's persistent dirty bitmap ``bitmap`` of ``live`` marks as written, read as an
    operator reads them (``qemu-nbd -B`` exports the bitmap, ``qemu-img map`` reads it: a dirty area
    shows as ``"data": false``), written in the client's format."""
    sock, pid_file = out.with_suffix(".sock"), out.with_suffix(".pid")
    subprocess.run(["qemu-nbd", "--fork", "--pid-file", str(pid_file), "-r", "-k", str(sock), "-f", "qcow2",
                    "-B", bitmap, str(live)], check=True)
    try:  # the server serves this one client and exits
        mapped = subprocess.run(["qemu-img", "map", "--output=json", "--image-opts",
                                 f"driver=nbd,server.type=unix,server.path={sock},"
                                 f"x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}"],
                                capture_output=True, text=True, check=True)
    finally:
        if subprocess.run(["kill", "-0", pid_file.read_text().strip()], capture_output=True).returncode == 0:
            subprocess.run(["kill", pid_file.read_text().strip()])
    dirty = [{"start": e["start"], "length": e["length"]} for e in json.loads(mapped.stdout) if not e["data"]]
    out.write_text(json.dumps(dirty))
    return out


def test_a_push_with_the_changed_areas_of_a_dirty_bitmap_reads_only_them_and_syncs_that_version(
        localoci, make_importer, bucket, object_storage, tmp_path):
    """Change tracking on the source: the disk runs as a qcow2 with a persistent dirty bitmap that
    QEMU keeps as it writes (qemu-io here, a VM's QEMU in production). The push reads only the
    areas the bitmap marks and takes every other block's digest from the last import's manifest;
    the volume is then bit-exact with the new version. Areas tracked since another version than the
    object's current one, or reaching past the disk, are refused with their codes."""
    disk, work, live = tmp_path / "db01.raw", tmp_path / "work", tmp_path / "live.qcow2"
    guest_disk(disk, tmp_path)
    with open(disk, "r+b") as f:  # data past the partition (which the writes below keep to: its filesystem is checked)
        f.seek(220 * MiB)
        f.write(os.urandom(MiB))
    first = push(object_storage, localoci, bucket, disk, work)
    volume_id = synced(make_importer, localoci, bucket)["volume_id"]
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk), str(live))
    run_tool("qemu-img", "bitmap", "--add", str(live), "since-first")  # the checkpoint of the first push
    run_tool("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 210M 1M", "-c", "write -P 0x33 235587k 64k",
             "-c", "write -z 220M 12k", "-c", "write -P 0x7e 254M 16k", str(live))
    areas = dirty_areas(live, "since-first", tmp_path / "areas.json")
    tracked = sum(a["length"] for a in json.loads(areas.read_text()))
    assert MiB + 64 * 1024 <= tracked <= 2 * MiB  # at the bitmap's 64 KiB granularity
    snapshot = tmp_path / "second.raw"
    run_tool("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(live), str(snapshot))
    said = io.StringIO()
    second = client.push(object_storage, localoci.namespace, bucket, NAME, snapshot, work, out=said,
                         changed_areas=areas, changes_since=first["etag"])
    assert second["changed_areas"] and second["read_bytes"] <= tracked + 2 * BLOCK, (second, said.getvalue())
    assert "reading the changed areas" in said.getvalue()
    assert 0 < second["changed_bytes"] <= tracked
    result = synced(make_importer, localoci, bucket)
    assert result["volume_id"] == volume_id and holds_exactly(localoci, volume_id, snapshot)

    # the same areas again: they are changes since the first version, the object is now at the second
    with pytest.raises(client.PushRefused, match=re.escape(second["etag"])) as stale:
        client.push(object_storage, localoci.namespace, bucket, NAME, snapshot, work, out=io.StringIO(),
                    changed_areas=areas, changes_since=first["etag"])
    assert stale.value.code == "push-changes-since-stale"
    beyond = tmp_path / "beyond.json"
    beyond.write_text(json.dumps({"changedArea": [{"start": 256 * MiB - BLOCK, "length": 2 * BLOCK}]}))
    with pytest.raises(client.PushRefused, match="ends past the disk") as outside:
        client.push(object_storage, localoci.namespace, bucket, NAME, snapshot, work, out=io.StringIO(),
                    changed_areas=beyond, changes_since=second["etag"])
    assert outside.value.code == "push-changed-areas-invalid"
    assert object_storage.head_object(localoci.namespace, bucket, NAME).headers["etag"] == second["etag"]
