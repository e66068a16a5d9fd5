"""Copies to another region through the core (:mod:`diskimport.regions`), against a local OCI
serving two regions with the real SDK, without Prefect: a three-disk machine restored in the
second region with identical volumes in one volume group, a boot volume restored as a boot
volume, a fault mid-copy leaving nothing in either region, and an interrupted copy resumed
without a second backup.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from typing import Any

import oci
import pytest

from diskimport import contract
from diskimport.contract import InvalidRequest
from diskimport.regions import RegionCopy
from localoci.process import RunningLocalOCI
from tests.diskimport.conftest import everything
from tests.workers import WORKER_IMAGE_ID
from tests import waiting

MiB = 1024 * 1024
GiB = 1024 * MiB
# heavy: copies between regions take a few seconds each (make test-fast leaves them out).
pytestmark = [pytest.mark.usefixtures("small_volumes", "no_faults"), pytest.mark.heavy]


@pytest.fixture
def make_copier(make_run: Any, credentials: Any) -> Any:
    def make(**kwargs: Any) -> RegionCopy:
        return RegionCopy(make_run(), credentials.clients("local-2"), poll_seconds=0.1, **kwargs)
    return make


def wait(client: Any, response: Any, state: str = "AVAILABLE") -> Any:
    return waiting.wait_until(client, response, "lifecycle_state", state, max_wait_seconds=60,
                          max_interval_seconds=0.1).data


def backing(localoci: RunningLocalOCI, volume_id: str) -> str:
    inventory = localoci.inventory()
    return next(v["backingFile"] for v in inventory["volumes"] + inventory.get("bootVolumes", [])
                if v["id"] == volume_id)


def write_volume(localoci: RunningLocalOCI, volume_id: str, seed: int) -> None:
    """Distinct bytes at the start, middle and end of a volume."""
    path = backing(localoci, volume_id)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for offset in (0, size // 2, size - 2 * MiB):
            f.seek(offset)
            f.write(os.urandom(MiB) + bytes([seed]) * MiB)


def same_volume(localoci: RunningLocalOCI, a: str, b: str) -> bool:
    """Every byte the same (qemu-img compare reads data only where either file has some)."""
    return subprocess.run(["qemu-img", "compare", "-q", "-s", "-f", "raw", "-F", "raw", backing(localoci, a),
                           backing(localoci, b)]).returncode == 0


@pytest.fixture
def machine(localoci: RunningLocalOCI, blockstorage: Any, compartment_id: str,
            availability_domains: list[str]) -> dict[str, Any]:
    """Three 1 GB volumes with distinct bytes (tagged as a machine import's disks 0-2), in a group."""
    ids = []
    for position in range(3):
        volume = blockstorage.create_volume(oci.core.models.CreateVolumeDetails(
            compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=1,
            display_name=f"db-01-disk{position}", freeform_tags={contract.TAG_DISK: str(2 - position)})).data
        wait(blockstorage, blockstorage.get_volume(volume.id))
        write_volume(localoci, volume.id, position)
        ids.append(volume.id)
    group = blockstorage.create_volume_group(oci.core.models.CreateVolumeGroupDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[0], display_name="db-01",
        source_details=oci.core.models.VolumeGroupSourceFromVolumesDetails(volume_ids=ids))).data
    wait(blockstorage, blockstorage.get_volume_group(group.id))
    return {"group_id": group.id, "volume_ids": ids}


def region_backups(localoci: RunningLocalOCI, copy_id: str) -> list[dict[str, Any]]:
    inventory = localoci.inventory()
    return [b for b in inventory["volumeBackups"] + inventory["bootVolumeBackups"]
            if b["lifecycleState"] not in ("TERMINATING", "TERMINATED")
            and b["displayName"].startswith(f"copy-{copy_id[:12]}")]


def copy(copier: RegionCopy, job: Any) -> dict[str, Any]:
    """The flow's order of steps, without Prefect."""
    with copier.run:
        copied = copier.copy_all(job, range(len(job.sources)))
        group_id = copier.finish(job, copied)
    return copier.summary(job, copied, group_id).as_dict()


def test_a_machine_is_restored_in_the_other_region_with_identical_volumes_in_one_group(
        localoci, make_copier, machine, credentials, compartment_id):
    copier = make_copier()
    job = copier.plan("local-1", "local-2", volume_group_id=machine["group_id"])
    assert job.machine == "db-01" and job.availability_domain.endswith("LOCAL-2-AD-1")
    # disk order: the import's positions, not the group's
    assert [s.id for s in job.sources] == machine["volume_ids"][::-1]
    stages: list[tuple[int, str]] = []
    with copier.run:
        copied = copier.copy_all(job, range(3), lambda p, s: stages.append((p, s)))
        group_id = copier.finish(job, copied)
    summary = copier.summary(job, copied, group_id).as_dict()
    assert {p for p, s in stages if s == "restored"} == {0, 1, 2}
    there = credentials.clients("local-2").blockstorage
    group = there.get_volume_group(summary["volume_group_id"]).data
    assert group.display_name == "db-01" and group.availability_domain == job.availability_domain
    restored = [d["volume_id"] for d in summary["disks"]]
    assert sorted(group.volume_ids) == sorted(restored)
    for disk in summary["disks"]:
        assert same_volume(localoci, disk["source_volume_id"], disk["volume_id"])
        volume = there.get_volume(disk["volume_id"]).data
        assert volume.freeform_tags[contract.TAG_STATE] == contract.STATE_IMPORTED
        assert volume.freeform_tags["copy-of"] == disk["source_volume_id"]
    # only the home region's client sees the source, only local-2's the copy
    with pytest.raises(oci.exceptions.ServiceError):
        copier.source.blockstorage.get_volume(restored[0])
    assert region_backups(localoci, job.copy_id) == []  # intermediate backups gone in both regions
    assert copier.run.ledger.pending() == []

    again = make_copier()  # a repeat finds the restored volumes and makes nothing
    repeat = copy(again, again.plan("local-1", "local-2", volume_group_id=machine["group_id"]))
    assert [d["volume_id"] for d in repeat["disks"]] == restored and all(d["reused"] for d in repeat["disks"])
    assert repeat["volume_group_id"] == summary["volume_group_id"]


def test_a_boot_volume_is_restored_as_a_boot_volume(localoci, make_copier, compute, blockstorage, compartment_id,
                                                     availability_domains, subnet_id, credentials):
    instance = compute.launch_instance(oci.core.models.LaunchInstanceDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[0], shape="VM.Standard.E4.Flex",
        source_details=oci.core.models.InstanceSourceViaImageDetails(image_id=WORKER_IMAGE_ID,
                                                                     boot_volume_size_in_gbs=50),
        create_vnic_details=oci.core.models.CreateVnicDetails(subnet_id=subnet_id))).data
    wait(compute, compute.get_instance(instance.id), "RUNNING")
    boot_id = compute.list_boot_volume_attachments(availability_domains[0], compartment_id,
                                                   instance_id=instance.id).data[0].boot_volume_id
    compute.terminate_instance(instance.id, preserve_boot_volume=True)
    wait(compute, compute.get_instance(instance.id), "TERMINATED")
    blockstorage.update_boot_volume(boot_id, oci.core.models.UpdateBootVolumeDetails(
        freeform_tags={contract.TAG_FIRMWARE: "UEFI_64"}))
    copier = make_copier()
    summary = copy(copier, copier.plan("local-1", "local-2", volume_id=boot_id))
    [disk] = summary["disks"]
    assert disk["boot"] and disk["volume_id"].startswith("ocid1.bootvolume.")
    restored = credentials.clients("local-2").blockstorage.get_boot_volume(disk["volume_id"]).data
    assert restored.size_in_gbs == 50 and restored.freeform_tags[contract.TAG_FIRMWARE] == "UEFI_64"
    assert same_volume(localoci, boot_id, disk["volume_id"])


@pytest.mark.parametrize("fault", [
    {"operation": "CopyVolumeBackup", "failResource": True},
    {"operation": "CreateVolume", "match": {"region": "local-2"}, "status": 400, "code": "InvalidParameter",
     "count": 3},
])
def test_a_fault_mid_copy_leaves_nothing_in_either_region(fault, localoci, make_copier, machine, credentials,
                                                          compartment_id):
    copier = make_copier()
    job = copier.plan("local-1", "local-2", volume_group_id=machine["group_id"])
    localoci.admin("POST", "faults", {"count": 1, **fault})
    with pytest.raises(Exception):
        copy(copier, job)
    localoci.admin("DELETE", "faults")
    assert region_backups(localoci, job.copy_id) == []
    there = credentials.clients("local-2").blockstorage
    left = [v for v in oci.pagination.list_call_get_all_results(there.list_volumes, compartment_id=compartment_id).data
            if (v.freeform_tags or {}).get(contract.TAG_COPY_ID) == job.copy_id
            and v.lifecycle_state not in ("TERMINATING", "TERMINATED")]
    assert left == [] and copier.run.ledger.pending() == []
    # the same copy afterwards completes
    again = make_copier()
    assert len(copy(again, job)["disks"]) == 3


def test_an_interrupted_copy_resumes_from_its_backups(localoci, make_copier, machine, credentials):
    dead = make_copier()
    job = dead.plan("local-1", "local-2", volume_group_id=machine["group_id"])
    backup, _ = dead._backup(job, 0, _kind(job, 0), f"copy-{job.copy_id[:12]}-disk0")
    made, _ = dead._copy(job, 0, _kind(job, 0), backup.id, f"copy-{job.copy_id[:12]}-disk0")
    # the run died here: its ledger never unwound; the next run takes over
    resumed = make_copier()
    summary = copy(resumed, job)
    assert same_volume(localoci, job.sources[0].id, summary["disks"][0]["volume_id"])
    inventory = localoci.admin("GET", "inventory?all=1")  # ended resources too
    made_backups = [b for b in inventory["volumeBackups"] if b["displayName"] == f"copy-{job.copy_id[:12]}-disk0"]
    assert {b["id"] for b in made_backups} == {backup.id, made.id}  # reused, not made again; both now deleted
    assert {b["lifecycleState"] for b in made_backups} <= {"TERMINATING", "TERMINATED"}


def _kind(job: Any, position: int) -> Any:
    from diskimport.regions import VolumeKind

    return VolumeKind(job.sources[position].boot)


def test_what_cannot_be_copied_is_refused_by_name(make_copier, machine):
    copier = make_copier()
    cases = [
        (dict(destination_region="local-1", volume_id=machine["volume_ids"][0]), "invalid-destination-region"),
        (dict(destination_region="local-2"), "invalid-source"),
        (dict(destination_region="local-2", volume_id="ocid1.volume.oc1..missing"), "volume-not-found"),
        (dict(destination_region="local-2", volume_id=machine["volume_ids"][0], availability_domain="nowhere"),
         "invalid-availability-domain"),
    ]
    for kwargs, code in cases:
        with pytest.raises(InvalidRequest) as refused:
            copier.plan("local-1", **kwargs)
        assert refused.value.code == code, kwargs


def test_a_copy_named_by_the_wrong_ocid_or_to_an_unknown_region_is_refused_before_anything_exists(
        localoci, make_copier, make_run, credentials, machine):
    """A volume's OCID given as the group, a group's as the volume, something that is no OCID, a
    missing group, a compartment that is no compartment, a destination region that is no region
    or does not answer: each refused with its code and a message that names what was wrong (never
    the SDK's bare error), and nothing is created in either region."""
    volume_id, group_id = machine["volume_ids"][0], machine["group_id"]
    cases = [
        (dict(volume_group_id=volume_id), "invalid-source", f"volume_group_id {volume_id!r} is the OCID of a block "
         "volume, not of a volume group (ocid1.volumegroup.…): pass it as volume_id"),
        (dict(volume_id=group_id), "invalid-source", f"volume_id {group_id!r} is the OCID of a volume group, not of "
         "a block volume (ocid1.volume.…) or a boot volume (ocid1.bootvolume.…): pass it as volume_group_id"),
        (dict(volume_id="db-01-disk0"), "invalid-source", "volume_id 'db-01-disk0' is not an OCID"),
        (dict(volume_group_id="ocid1.volumegroup.oc1..missing"), "volume-group-not-found",
         "volume group ocid1.volumegroup.oc1..missing not found"),
        (dict(volume_id=volume_id, compartment_id=volume_id), "invalid-compartment", f"compartment_id {volume_id!r} "
         "is the OCID of a block volume, not of a compartment (ocid1.compartment.…) or the tenancy"),
        (dict(volume_id=volume_id, destination_region="Local 2"), "invalid-destination-region",
         "destination_region 'Local 2' is not a region identifier"),
    ]
    copier = make_copier()
    before = everything(localoci)
    for kwargs, code, message in cases:
        with pytest.raises(InvalidRequest) as refused:
            copier.plan("local-1", **{"destination_region": "local-2", **kwargs})
        assert (refused.value.code, refused.value.message[:len(message)]) == (code, message)
    nowhere = RegionCopy(make_run(), credentials.clients("nowhere-9"), poll_seconds=0.1)
    with pytest.raises(InvalidRequest, match="^invalid-destination-region: region 'nowhere-9' does not answer"):
        nowhere.plan("local-1", "nowhere-9", volume_group_id=group_id)
    assert everything(localoci) == before


def test_the_sweep_deletes_backups_of_dead_copy_runs_only(localoci, make_copier, machine, active_runs):
    from diskimport import regions, sweeper

    dead, alive = make_copier(), make_copier()
    job = dead.plan("local-1", "local-2", volume_group_id=machine["group_id"])
    left, _ = dead._backup(job, 0, _kind(job, 0), "left-by-a-dead-run")
    kept, _ = alive._backup(job, 1, _kind(job, 1), "of-a-live-run")
    active_runs.discard(dead.run.run_id)
    orphaned = sweeper.orphan_test(active_runs.__contains__, dt.timedelta(0))
    removed = regions.sweep_backups(dead.source, [job.sources[0].compartment_id],
                                    {contract.TAG_MANAGED_BY: contract.MANAGED_BY}, orphaned)
    assert removed == [left.id]
    states = {b["id"]: b["lifecycleState"] for b in localoci.admin("GET", "inventory?all=1")["volumeBackups"]}
    assert states[left.id] in ("TERMINATING", "TERMINATED") and states[kept.id] == "AVAILABLE"
    alive.source.blockstorage.delete_volume_backup(kept.id)
