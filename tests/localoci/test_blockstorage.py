"""Block Storage and Identity on the local OCI, via the real SDK."""

from __future__ import annotations

import os

import oci
import pytest
from tests import waiting

models = oci.core.models


def wait_available(blockstorage, volume_id: str):
    return waiting.wait_until(blockstorage, blockstorage.get_volume(volume_id), "lifecycle_state", "AVAILABLE",
                          max_wait_seconds=30, max_interval_seconds=0.2).data


@pytest.fixture
def volume(blockstorage, compartment_id, availability_domains):
    created = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=50,
        vpus_per_gb=20, display_name="disk", freeform_tags={"import-id": "t1"})).data
    yield wait_available(blockstorage, created.id)
    if blockstorage.get_volume(created.id).data.lifecycle_state == "AVAILABLE":
        blockstorage.delete_volume(created.id)


def test_region_has_three_availability_domains_each_with_three_fault_domains(identity, compartment_id):
    ads = identity.list_availability_domains(compartment_id).data
    assert len(ads) == 3
    for ad in ads:
        fds = identity.list_fault_domains(compartment_id, ad.name).data
        assert [fd.name for fd in fds] == ["FAULT-DOMAIN-1", "FAULT-DOMAIN-2", "FAULT-DOMAIN-3"]


def test_new_volume_is_a_sparse_file_of_its_size_with_tags(volume, localoci):
    assert volume.size_in_gbs == 50 and volume.vpus_per_gb == 20
    entry = next(v for v in localoci.inventory(**{"import-id": "t1"})["volumes"] if v["id"] == volume.id)
    assert entry["freeformTags"] == {"import-id": "t1"}
    assert entry["allocatedBytes"] < 1024 * 1024
    assert os.stat(entry["backingFile"]).st_size == 50 * 1024**3


@pytest.mark.parametrize("size", [49, 32769, 0])
def test_volume_size_outside_oci_limits_is_refused(blockstorage, compartment_id, availability_domains, size):
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        blockstorage.create_volume(models.CreateVolumeDetails(
            compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=size))
    assert refused.value.status == 400 and refused.value.code == "InvalidParameter"
    assert "sizeInGBs" in refused.value.message


@pytest.mark.parametrize("vpus", [5, 25, 130])
def test_vpus_outside_allowed_levels_are_refused(blockstorage, compartment_id, availability_domains, vpus):
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        blockstorage.create_volume(models.CreateVolumeDetails(
            compartment_id=compartment_id, availability_domain=availability_domains[0], size_in_gbs=50, vpus_per_gb=vpus))
    assert refused.value.status == 400 and "vpusPerGB" in refused.value.message


def test_update_grows_the_volume_and_changes_vpus_but_never_shrinks(blockstorage, volume, localoci):
    updated = blockstorage.update_volume(volume.id, models.UpdateVolumeDetails(size_in_gbs=60, vpus_per_gb=120)).data
    assert (updated.size_in_gbs, updated.vpus_per_gb) == (60, 120)
    backing = next(v for v in localoci.inventory()["volumes"] if v["id"] == volume.id)["backingFile"]
    assert os.stat(backing).st_size == 60 * 1024**3
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        blockstorage.update_volume(volume.id, models.UpdateVolumeDetails(size_in_gbs=55))
    assert refused.value.status == 400 and "shrink" in refused.value.message


def test_deleted_volume_terminates_and_leaves_the_inventory(blockstorage, volume, localoci):
    blockstorage.delete_volume(volume.id)
    waiting.wait_until(blockstorage, blockstorage.get_volume(volume.id), "lifecycle_state", "TERMINATED",
                   max_wait_seconds=30, max_interval_seconds=0.2)
    assert volume.id not in {v["id"] for v in localoci.inventory()["volumes"]}
    with pytest.raises(oci.exceptions.ServiceError) as again:
        blockstorage.delete_volume(volume.id)
    assert again.value.status == 409 and again.value.code == "IncorrectState"


def test_missing_volume_is_404_not_authorized_or_not_found(blockstorage):
    with pytest.raises(oci.exceptions.ServiceError) as missing:
        blockstorage.get_volume("ocid1.volume.oc1..nothing")
    assert missing.value.status == 404 and missing.value.code == "NotAuthorizedOrNotFound"


def test_backup_policy_assignment_lifecycle(blockstorage, volume):
    policies = {p.display_name: p.id for p in blockstorage.list_volume_backup_policies().data}
    assert set(policies) == {"gold", "silver", "bronze"}
    assignment = blockstorage.create_volume_backup_policy_assignment(models.CreateVolumeBackupPolicyAssignmentDetails(
        asset_id=volume.id, policy_id=policies["silver"])).data
    assert blockstorage.get_volume_backup_policy_assignment(assignment.id).data.policy_id == policies["silver"]
    by_asset = blockstorage.get_volume_backup_policy_asset_assignment(volume.id).data
    assert [a.id for a in by_asset] == [assignment.id]
    with pytest.raises(oci.exceptions.ServiceError) as twice:
        blockstorage.create_volume_backup_policy_assignment(models.CreateVolumeBackupPolicyAssignmentDetails(
            asset_id=volume.id, policy_id=policies["gold"]))
    assert twice.value.status == 409
    blockstorage.delete_volume_backup_policy_assignment(assignment.id)
    assert blockstorage.get_volume_backup_policy_asset_assignment(volume.id).data == []
    with pytest.raises(oci.exceptions.ServiceError) as unknown:
        blockstorage.create_volume_backup_policy_assignment(models.CreateVolumeBackupPolicyAssignmentDetails(
            asset_id=volume.id, policy_id="ocid1.volumebackuppolicy.oc1..platinum"))
    assert unknown.value.status == 400


def test_list_volumes_pages_with_opc_next_page(blockstorage, compartment_id, availability_domains):
    ids = [blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=availability_domains[1], size_in_gbs=50,
        display_name="paged")).data.id for _ in range(3)]
    first = blockstorage.list_volumes(compartment_id=compartment_id, display_name="paged", limit=2)
    assert len(first.data) == 2 and first.next_page
    everything = oci.pagination.list_call_get_all_results(
        blockstorage.list_volumes, compartment_id=compartment_id, display_name="paged", limit=2).data
    assert {v.id for v in everything} == set(ids)
    for volume_id in ids:
        wait_available(blockstorage, volume_id)
        blockstorage.delete_volume(volume_id)
