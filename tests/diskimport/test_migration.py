"""Rehearse, cut over, roll back (diskimport.migration) at the import core, against the local OCI
with the real SDK, sshd worker VMs, qemu-img and a machine booted by qemu: a BIOS boot disk
pushed with the delta client and synced; a rehearsal boots it from a clone and removes all it
made, leaving the sync volume untouched; a second push is synced; the cutover boots it and
reports the downtime, and no sync writes onto the volume after it; the rollback stops the
machine and gives the object back its volume as it was at the final sync.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blocks.target import TargetMachine
from diskimport import contract
from diskimport.contract import InvalidRequest
from diskimport.delta import client
from diskimport.migration import TAG_CUTOVER_TO, TAG_REHEARSAL_OF, Migration
from tests import boot_disks
from tests.diskimport.conftest import import_object, version_of
from tests.diskimport.test_sync import tags_of
from tests.workers import WORKER_IMAGE_ID

MiB = 1024 * 1024
NAME, DATA = "migrate/app.qcow2", "migrate/app-data.qcow2"
pytestmark = [pytest.mark.usefixtures("no_faults", "small_volumes"), pytest.mark.heavy,
              pytest.mark.skipif(bool(boot_disks.tools_missing()), reason="boot disk tools missing")]


def backing_file(localoci: Any, volume_id: str) -> Path:
    inventory = localoci.inventory()
    return Path(next(v["backingFile"] for v in inventory["volumes"] + inventory["bootVolumes"] if v["id"] == volume_id))


def head_of(localoci: Any, volume_id: str, size: int) -> bytes:
    with open(backing_file(localoci, volume_id), "rb") as f:
        return f.read(size)


def push_and_sync(localoci: Any, object_storage: Any, make_importer: Any, bucket: str, disk: Path,
                  work: Path, name: str = NAME) -> dict[str, Any]:
    client.push(object_storage, localoci.namespace, bucket, name, disk, work, out=io.StringIO())
    importer = make_importer()
    return import_object(importer, version_of(importer, localoci, bucket, name), sync=True)


def test_a_synced_boot_disk_is_rehearsed_cut_over_and_rolled_back(
        localoci, make_run, make_importer, bucket, object_storage, tmp_path, compartment_id, subnet_id):
    disk = boot_disks.bios_disk(tmp_path / "bios.raw")
    size = disk.stat().st_size
    first = push_and_sync(localoci, object_storage, make_importer, bucket, disk, tmp_path / "work")
    volume_id = first["volume_id"]
    data_disk = tmp_path / "data.raw"  # the machine's data disk, an object of its own, synced the same way
    with open(data_disk, "wb") as f:
        f.truncate(16 * MiB)
        f.write(b"data disk " * 100_000)
    data_id = push_and_sync(localoci, object_storage, make_importer, bucket, data_disk, tmp_path / "work",
                            DATA)["volume_id"]
    target = TargetMachine(compartment_id=compartment_id, subnet_id=subnet_id, image_id=WORKER_IMAGE_ID,
                           boot_timeout_seconds=600, console_poll_seconds=1, reach_timeout_seconds=0)

    # A rehearsal boots a clone and removes what it made; the sync volume is not touched.
    before = head_of(localoci, volume_id, size)
    rehearsed = Migration(make_run(), target).rehearse(localoci.namespace, bucket, NAME, [DATA])
    assert rehearsed["machine"]["booted"], rehearsed["machine"]["console_tail"]
    assert [d["volume_id"] for d in rehearsed["data_volumes"]] == [data_id]
    assert rehearsed["machine"]["firmware"] == "BIOS"
    inventory = localoci.inventory()
    assert not [v for v in inventory["volumes"] + inventory["bootVolumes"]
                if v["freeformTags"].get(TAG_REHEARSAL_OF) in (volume_id, data_id)
                and v["lifecycleState"] not in ("TERMINATING", "TERMINATED")], inventory
    assert not [i for i in inventory["instances"] if i["id"] == rehearsed["machine"]["instance_id"]
                and i["lifecycleState"] not in ("TERMINATING", "TERMINATED")]
    assert head_of(localoci, volume_id, size) == before
    assert tags_of(localoci, volume_id)[contract.TAG_STATE] == contract.STATE_IMPORTED

    # The final push (the source stopped) is synced, then the cutover boots it and keeps it.
    fat = f"{disk}@@{MiB}"
    (tmp_path / "final.txt").write_text("the source's last word\n")
    subprocess.run(["mcopy", "-o", "-i", fat, str(tmp_path / "final.txt"), "::/final.txt"], check=True)
    final = push_and_sync(localoci, object_storage, make_importer, bucket, disk, tmp_path / "work")
    assert final["volume_id"] == volume_id and final["synced"]["delta_bytes"] < MiB
    cut = Migration(make_run(), target).cutover(localoci.namespace, bucket, NAME, [DATA])
    machine = cut["machine"]
    assert machine["booted"] and cut["etag"] == final["etag"]
    [data_clone] = [d["clone_id"] for d in cut["data_volumes"]]
    attached = [a["volumeId"] for a in localoci.inventory()["attachments"]
                if a["instanceId"] == machine["instance_id"] and a["lifecycleState"] == "ATTACHED"]
    assert data_clone in attached and data_id not in attached  # the machine writes its clone
    assert tags_of(localoci, data_id)[TAG_CUTOVER_TO] == machine["instance_id"]
    assert 0 < cut["downtime_seconds"] < 600
    assert tags_of(localoci, volume_id)[TAG_CUTOVER_TO] == machine["instance_id"]
    instance = next(i for i in localoci.inventory()["instances"] if i["id"] == machine["instance_id"])
    assert instance["lifecycleState"] == "RUNNING"
    with pytest.raises(InvalidRequest) as refused:  # the machine holds the truth now
        push_and_sync(localoci, object_storage, make_importer, bucket, disk, tmp_path / "work")
    assert refused.value.code == "sync-volume-in-use"
    pre_cutover = head_of(localoci, volume_id, size)
    for written in (machine["boot_volume_id"], data_clone):  # the new machine writes its disks
        with open(backing_file(localoci, written), "r+b") as f:
            f.seek(MiB)
            f.write(b"written after the cutover" * 100)

    # The rollback stops the machine and gives the object its volume back as it was at the final sync.
    rolled = Migration(make_run(), target).rollback(localoci.namespace, bucket, NAME)
    assert (rolled["volume_id"], rolled["instance_id"]) == (volume_id, machine["instance_id"])
    instance = next(i for i in localoci.inventory()["instances"] if i["id"] == machine["instance_id"])
    assert instance["lifecycleState"] == "STOPPED"
    assert head_of(localoci, volume_id, size) == pre_cutover == disk.read_bytes()
    assert TAG_CUTOVER_TO not in tags_of(localoci, volume_id) and TAG_CUTOVER_TO not in tags_of(localoci, data_id)
    assert head_of(localoci, data_id, 16 * MiB) == data_disk.read_bytes()
    assert tags_of(localoci, data_clone)[contract.TAG_STATE] == "rolled-back"
    boot_tags = next(v for v in localoci.inventory()["bootVolumes"] if v["id"] == machine["boot_volume_id"])
    assert boot_tags["freeformTags"][contract.TAG_STATE] == "rolled-back"
    with pytest.raises(InvalidRequest) as refused:
        Migration(make_run(), target).rollback(localoci.namespace, bucket, NAME)
    assert refused.value.code == "not-cut-over"
