"""Syncs at the import core, against the local OCI with the real SDK, sshd worker VMs and qemu-img:
a new version of an object imported before is written onto that import's volume, only what
differs (grown when the disk grew, zeros again past a disk that shrank), with the volume's tags
saying which version it holds; each sync backed up first and rolled back to the version before;
a sync that failed or whose run died is synced again to the same result; syncs of one object
run one at a time; a sync is refused, changing nothing, over a newer version or under a running
machine.
"""

from __future__ import annotations

import logging
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import oci
import pytest

from diskimport import cloud, contract, sync_backups
from diskimport.contract import ImportOptions, InvalidRequest
from diskimport.importer import Importer
from tests.diskimport.conftest import import_object, version_of
from tests.guest_disks import data_ranges
from tests.waiting import wait_for
from tests.workers import launch_details

MiB = 1024 * 1024
GiB = 1024 * MiB
NAME = "sync/app.qcow2"
PAGE = 4096
pytestmark = [pytest.mark.usefixtures("no_faults", "small_volumes"), pytest.mark.heavy]


def upload(localoci: Any, object_storage: Any, bucket: str, raw: Path, tmp_path: Path) -> str:
    """The raw disk as a qcow2 at NAME: a new version of the object. Its ETag."""
    image = tmp_path / "upload.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True)
    with open(image, "rb") as f:
        return object_storage.put_object(localoci.namespace, bucket, NAME, f).headers["etag"]


def change(raw: Path, writes: dict[int, bytes], size: int | None = None) -> int:
    """Write ``writes`` into the raw disk (resized first to ``size``); the bytes written."""
    if size is not None:
        os.truncate(raw, size)
    with open(raw, "r+b") as f:
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return sum(len(data) for data in writes.values())


def volume_file(localoci: Any, volume_id: str) -> Path:
    return Path(next(v["backingFile"] for v in localoci.inventory()["volumes"] if v["id"] == volume_id))


def holds_exactly(localoci: Any, volume_id: str, raw: Path) -> bool:
    """The whole volume is the disk: its bytes, then zeros to the volume's end."""
    path, size = volume_file(localoci, volume_id), raw.stat().st_size
    if subprocess.run(["cmp", "-n", str(size), str(raw), str(path)], capture_output=True).returncode != 0:
        return False
    with open(path, "rb") as f:  # past the disk: the file's data extents (the rest are holes) read as zeros
        for start, end in data_ranges(path, size):
            f.seek(max(start, size))
            for at in range(max(start, size), end, 16 * MiB):
                chunk = f.read(min(16 * MiB, end - at))
                if chunk.count(0) != len(chunk):
                    return False
    return True


def first_mib(localoci: Any, volume_id: str) -> bytes:
    with open(volume_file(localoci, volume_id), "rb") as f:
        return f.read(MiB)


def tags_of(localoci: Any, volume_id: str) -> dict[str, str]:
    return next(v["freeformTags"] for v in localoci.inventory()["volumes"] if v["id"] == volume_id)


def sync(make_importer: Any, localoci: Any, bucket: str) -> tuple[Importer, dict[str, Any]]:
    importer = make_importer()
    return importer, import_object(importer, version_of(importer, localoci, bucket, NAME), sync=True)


def synced_disk(localoci: Any, make_importer: Any, bucket: str, object_storage: Any, tmp_path: Path, size: int,
                data: int) -> tuple[Path, dict[str, Any]]:
    """A raw disk of ``size`` bytes starting with ``data`` random bytes, uploaded and synced (its first import)."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(data))
    upload(localoci, object_storage, bucket, raw, tmp_path)
    return raw, sync(make_importer, localoci, bucket)[1]


def test_three_syncs_write_what_changed_onto_one_volume_and_it_ends_as_each_version(
        localoci, make_importer, bucket, object_storage, tmp_path):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(768 * MiB)
        for offset in (0, 100 * MiB, 700 * MiB):
            f.seek(offset)
            f.write(os.urandom(8 * MiB))
    first_etag = upload(localoci, object_storage, bucket, raw, tmp_path)
    _, first = sync(make_importer, localoci, bucket)  # nothing to sync onto: a new volume
    volume_id = first["volume_id"]
    assert first["synced_from"] is None and first["volume_size_gb"] == 50
    assert holds_exactly(localoci, volume_id, raw)
    tags = tags_of(localoci, volume_id)
    assert tags[contract.TAG_VIRTUAL_SIZE] == str(768 * MiB) and tags[contract.TAG_VERSION_TIME].isdigit()

    # Data rewritten (not page-aligned), data where zeros were, zeros where data was.
    changed = change(raw, {3 * MiB + 100: os.urandom(2 * MiB), 300 * MiB: os.urandom(MiB),
                           700 * MiB + PAGE: bytes(MiB)})
    second_etag = upload(localoci, object_storage, bucket, raw, tmp_path)
    _, second = sync(make_importer, localoci, bucket)
    assert (second["volume_id"], second["synced_from"], second["etag"]) == (volume_id, first_etag, second_etag)
    account = second["synced"]
    # whole pages: at most a page more at each end of each change
    assert changed - 2 * PAGE * 3 <= account["written"] + account["zeroed"] <= changed + 2 * PAGE * 3
    assert account["zeroed"] >= MiB - PAGE and account["compared"] >= 768 * MiB
    assert holds_exactly(localoci, volume_id, raw)
    tags = tags_of(localoci, volume_id)
    assert (tags[contract.TAG_ETAG], tags[contract.TAG_SYNCED_FROM], tags[contract.TAG_STATE]) == (
        second_etag, first_etag, contract.STATE_IMPORTED)

    # The disk grows (a partition grown into the new space): the new end is the news.
    changed = change(raw, {1200 * MiB: os.urandom(4 * MiB)}, size=1280 * MiB)
    upload(localoci, object_storage, bucket, raw, tmp_path)
    _, third = sync(make_importer, localoci, bucket)
    assert third["volume_id"] == volume_id and third["volume_size_gb"] == 50
    assert third["synced"]["written"] + third["synced"]["zeroed"] <= changed + 2 * PAGE
    assert holds_exactly(localoci, volume_id, raw)

    # And shrinks: what the larger disk held past the new end reads as zeros again.
    os.truncate(raw, 512 * MiB)
    upload(localoci, object_storage, bucket, raw, tmp_path)
    _, fourth = sync(make_importer, localoci, bucket)
    # past 512 MiB the disk held 7 MiB at 700 MiB (a page, a zeroed MiB, the rest) and 4 MiB at 1200 MiB
    assert fourth["volume_id"] == volume_id
    assert (fourth["synced"]["written"], fourth["synced"]["zeroed"]) == (0, 11 * MiB)
    assert holds_exactly(localoci, volume_id, raw)
    assert tags_of(localoci, volume_id)[contract.TAG_VIRTUAL_SIZE] == str(512 * MiB)
    # Without sync, a new version gets a volume of its own, as before.
    change(raw, {0: os.urandom(PAGE)})
    upload(localoci, object_storage, bucket, raw, tmp_path)
    importer = make_importer()
    apart = import_object(importer, version_of(importer, localoci, bucket, NAME))
    assert apart["volume_id"] != volume_id and apart["synced_from"] is None
    cloud.delete_volume(importer.clients, apart["volume_id"])


def test_a_sync_past_the_end_of_the_volume_grows_it_first(localoci, make_importer, bucket, object_storage, tmp_path,
                                                          blockstorage, compartment_id, availability_domains):
    """A 1 GB volume (as the local OCI's limits allow) holding the earlier version as an import leaves it."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(768 * MiB)
        f.write(os.urandom(4 * MiB))
    upload(localoci, object_storage, bucket, raw, tmp_path)
    importer = make_importer()
    earlier = version_of(importer, localoci, bucket, NAME)
    volume = blockstorage.create_volume(oci.core.models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=1,
        freeform_tags={**importer.run.tags(earlier.subject), **importer.version_tags(earlier, 768 * MiB),
                       contract.TAG_STATE: contract.STATE_IMPORTED})).data
    cloud.wait_volume_available(importer.clients, volume.id)
    with open(volume_file(localoci, volume.id), "r+b") as f:
        f.write(raw.read_bytes())
    change(raw, {1200 * MiB: os.urandom(4 * MiB)}, size=1280 * MiB)
    upload(localoci, object_storage, bucket, raw, tmp_path)
    _, grown = sync(make_importer, localoci, bucket)
    assert (grown["volume_id"], grown["volume_size_gb"], grown["synced_from"]) == (volume.id, 50, earlier.etag)
    assert grown["synced"]["written"] == 4 * MiB
    assert holds_exactly(localoci, volume.id, raw)


def test_a_failed_sync_keeps_its_volume_and_a_dead_ones_is_resumed_to_the_same_result(
        localoci, make_importer, bucket, object_storage, tmp_path, active_runs):
    raw, first = synced_disk(localoci, make_importer, bucket, object_storage, tmp_path, 256 * MiB, 16 * MiB)
    change(raw, {MiB: os.urandom(3 * MiB)})
    upload(localoci, object_storage, bucket, raw, tmp_path)

    # A sync that fails after it took the volume: the volume is kept (detached), tagged failed.
    importer = make_importer()
    version = version_of(importer, localoci, bucket, NAME)
    options = importer.options(version, ImportOptions())
    image = importer.inspect(version, options)
    previous = importer.previous_imports(version, sync=True)
    assert previous.sync_base is not None and previous.sync_base.id == first["volume_id"]
    with pytest.raises(RuntimeError, match="injected"):
        with importer.run:
            importer.provision(version, image, options, previous)
            raise RuntimeError("injected failure after the sync took the volume")
    tags = tags_of(localoci, first["volume_id"])
    assert tags[contract.TAG_STATE] == contract.STATE_FAILED and tags[contract.TAG_SYNCED_FROM] == first["etag"]
    # A run whose process dies mid-write leaves it tagged writing, its run gone.
    dying = make_importer()
    previous = dying.previous_imports(version, sync=True)
    assert previous.sync_base.id == first["volume_id"]
    worker, volume = dying.provision(version, image, options, previous)
    with open(volume_file(localoci, volume.id), "r+b") as f:  # half of the new version, and garbage
        f.seek(0)
        f.write(raw.read_bytes()[:2 * MiB] + os.urandom(MiB))
    active_runs.discard(dying.run.run_id)
    dying.run.terminate_worker(worker)

    _, resumed = sync(make_importer, localoci, bucket)
    assert resumed["volume_id"] == first["volume_id"] and resumed["resumed"] is True
    assert resumed["synced_from"] == first["etag"] and resumed["synced"]["written"] <= 4 * MiB
    assert holds_exactly(localoci, first["volume_id"], raw)
    assert tags_of(localoci, first["volume_id"])[contract.TAG_STATE] == contract.STATE_IMPORTED


def test_a_sync_over_a_newer_version_or_under_a_running_machine_is_refused_and_changes_nothing(
        localoci, make_importer, bucket, object_storage, tmp_path, compartment_id, subnet_id, client_key,
        blockstorage):
    """Refused: a sync of a version older than the volume's, and one under a running machine. Once that
    machine is gone, the sync goes on, with a backup of its own (asked again after a 409): the one
    taken ahead is older than the attachment."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)
        f.write(os.urandom(MiB))
    upload(localoci, object_storage, bucket, raw, tmp_path)
    _, first = sync(make_importer, localoci, bucket)
    volume_id = first["volume_id"]
    change(raw, {0: os.urandom(PAGE)})
    upload(localoci, object_storage, bucket, raw, tmp_path)
    importer = make_importer()
    tags = tags_of(localoci, volume_id)
    future = str(int(tags[contract.TAG_VERSION_TIME]) + 3600)
    cloud.tag_volume(importer.clients, volume_id, {contract.TAG_VERSION_TIME: future})
    before = first_mib(localoci, volume_id)
    with pytest.raises(InvalidRequest) as refused:
        import_object(importer, version_of(importer, localoci, bucket, NAME), sync=True)
    assert refused.value.code == "sync-older-version" and volume_id in str(refused.value)
    cloud.tag_volume(importer.clients, volume_id, {contract.TAG_VERSION_TIME: tags[contract.TAG_VERSION_TIME]})

    compute = importer.clients.compute
    instance = compute.launch_instance(launch_details(compartment_id, first["availability_domain"], subnet_id,
                                                      client_key)).data
    try:
        cloud.wait_instance_running(importer.clients, instance.id)
        attachment = compute.attach_volume(oci.core.models.AttachParavirtualizedVolumeDetails(
            instance_id=instance.id, volume_id=volume_id)).data
        oci.wait_until(compute, compute.get_volume_attachment(attachment.id), "lifecycle_state", "ATTACHED")
        importer = make_importer()
        with pytest.raises(InvalidRequest) as refused:
            import_object(importer, version_of(importer, localoci, bucket, NAME), sync=True)
        assert refused.value.code == "sync-volume-in-use" and instance.id in str(refused.value)
    finally:
        compute.terminate_instance(instance.id)
    assert first_mib(localoci, volume_id) == before
    tags_now = tags_of(localoci, volume_id)
    assert (tags_now[contract.TAG_ETAG], tags_now[contract.TAG_STATE]) == (first["etag"], contract.STATE_IMPORTED)

    # Attached to something since its backup was taken ahead, the volume may hold more than that
    # backup: the sync takes a backup of its own before it writes.
    [ahead] = sync_backups.sync_backups(importer.clients, compartment_id, volume_id)
    oci.wait_until(compute, compute.get_volume_attachment(attachment.id), "lifecycle_state", "DETACHED",
                   max_wait_seconds=300)
    # (OCI may refuse a backup while another of the volume is under way: the sync waits and asks again)
    localoci.admin("POST", "faults", {"operation": "CreateVolumeBackup", "status": 409, "code": "Conflict",
                                      "message": "injected: a backup of this volume is in progress",
                                      "match": {"volumeId": volume_id}})
    _, synced = sync(make_importer, localoci, bucket)
    used = [b for b in sync_backups.sync_backups(importer.clients, compartment_id, volume_id)
            if b.freeform_tags.get(sync_backups.TAG_SYNC_AFTER) == synced["etag"]]
    assert synced["volume_id"] == volume_id and [b.id for b in used] != [ahead.id] and len(used) == 1


def test_a_sync_is_backed_up_first_and_rolled_back_to_the_version_before(localoci, make_importer, bucket,
                                                                         object_storage, tmp_path, compartment_id):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(128 * MiB)
        f.write(os.urandom(8 * MiB))
    first_etag = upload(localoci, object_storage, bucket, raw, tmp_path)
    _, first = sync(make_importer, localoci, bucket)
    before = tmp_path / "before.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(before)], check=True)
    change(raw, {MiB: os.urandom(MiB)})
    second_etag = upload(localoci, object_storage, bucket, raw, tmp_path)
    clients = make_importer().clients
    # The first import's volume was backed up once ready, ahead of the next sync
    [ahead] = sync_backups.sync_backups(clients, compartment_id, first["volume_id"])
    assert ahead.freeform_tags[contract.TAG_ETAG] == first_etag
    assert sync_backups.TAG_SYNC_AFTER not in ahead.freeform_tags
    importer, second = sync(make_importer, localoci, bucket)
    # that sync wrote after it, and its own volume is backed up ahead of the next one
    newer, backup = sync_backups.sync_backups(clients, compartment_id, first["volume_id"])
    tags = backup.freeform_tags
    assert backup.id == ahead.id and backup.lifecycle_state == "AVAILABLE" and backup.volume_id == first["volume_id"]
    assert (tags[contract.TAG_ETAG], tags[sync_backups.TAG_SYNC_AFTER]) == (first_etag, second_etag)
    assert tags[contract.TAG_IMPORT_ID] == first["import_id"]
    assert newer.freeform_tags[contract.TAG_ETAG] == second_etag
    assert sync_backups.TAG_SYNC_AFTER not in newer.freeform_tags

    log = logging.getLogger("test")
    rolled = sync_backups.rollback(clients, compartment_id, first["volume_id"], "rollback-test", log)
    assert (rolled.etag, rolled.undone_etag, rolled.backup_id) == (first_etag, second_etag, backup.id)
    assert holds_exactly(localoci, rolled.restored_volume_id, before)
    restored = tags_of(localoci, rolled.restored_volume_id)
    assert (restored[contract.TAG_ETAG], restored[contract.TAG_STATE], restored[contract.TAG_IMPORT_ID]) == (
        first_etag, contract.STATE_IMPORTED, first["import_id"])
    synced = tags_of(localoci, first["volume_id"])
    assert synced[contract.TAG_STATE] == sync_backups.STATE_ROLLED_BACK and contract.TAG_SOURCE not in synced
    assert holds_exactly(localoci, first["volume_id"], raw)  # what the sync wrote is kept
    # Asked again, the rollback finds what it restored.
    assert sync_backups.rollback(clients, compartment_id, first["volume_id"], "rollback-test", log) == rolled

    # The next sync of the object takes the restored volume.
    change(raw, {3 * MiB: os.urandom(PAGE)})
    upload(localoci, object_storage, bucket, raw, tmp_path)
    _, third = sync(make_importer, localoci, bucket)
    assert (third["volume_id"], third["synced_from"]) == (rolled.restored_volume_id, first_etag)
    assert holds_exactly(localoci, rolled.restored_volume_id, raw)

    # A volume no sync wrote has nothing to roll back to.
    bare = cloud.create_volume(clients, compartment_id, first["availability_domain"], 1, 10, "bare", {}, None)
    with pytest.raises(InvalidRequest) as refused:
        sync_backups.rollback(clients, compartment_id, bare.id, "rollback-none", log)
    assert refused.value.code == "sync-backup-missing" and bare.id in str(refused.value)


def test_syncs_of_one_object_run_one_at_a_time(localoci, make_importer, bucket, object_storage, tmp_path, caplog):
    """A sync of a new version waits while another live run syncs the version before onto the
    object's volume, and then syncs onto that volume (never onto a new one beside it)."""
    caplog.set_level(logging.INFO)
    raw, first = synced_disk(localoci, make_importer, bucket, object_storage, tmp_path, 64 * MiB, 4 * MiB)
    change(raw, {MiB: os.urandom(MiB)})
    second_etag = upload(localoci, object_storage, bucket, raw, tmp_path)

    # The second version's sync has written the volume and is still checking it when the third arrives.
    syncing = make_importer()
    version = version_of(syncing, localoci, bucket, NAME)
    image = syncing.inspect(version, ImportOptions())
    with syncing.run:
        worker, volume = syncing.provision(version, image, ImportOptions(), syncing.previous_imports(version, sync=True))
        with syncing.run.session(worker) as session:
            syncing.run.prepare_worker(session)
            write = syncing.volume_write(session, worker, volume, version, image)
            write.write()
            change(raw, {8 * MiB: os.urandom(MiB)})
            upload(localoci, object_storage, bucket, raw, tmp_path)
            waiting = make_importer()
            third = version_of(waiting, localoci, bucket, NAME)
            with ThreadPoolExecutor(1) as pool:
                found = pool.submit(waiting.previous_imports, third, False, True)
                wait_for(lambda: "syncs of one object run one at a time" in caplog.text, what="the third sync waiting")
                assert not found.done()  # it waits for the second, which ends only below
                write.check()
                write.detach()
                syncing.finish_volume(volume, ImportOptions())
                syncing.run.terminate_worker(worker)
                previous = found.result()
    assert previous.sync_base is not None and previous.sync_base.id == first["volume_id"] == volume.id
    assert previous.sync_base.tags[contract.TAG_ETAG] == second_etag
