"""Block Storage volume groups on the local OCI, via the real SDK."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Callable, Iterator

import oci
import pytest
import requests

from localoci.process import RunningLocalOCI
from tests.localoci.test_objectstorage import signer_for
from tests import waiting

models = oci.core.models
NO_RETRY = oci.retry.NoneRetryStrategy()


def wait_for(blockstorage: oci.core.BlockstorageClient, get: Callable[..., Any], resource_id: str, state: str) -> Any:
    return waiting.wait_until(blockstorage, get(resource_id), "lifecycle_state", state,
                          max_wait_seconds=30, max_interval_seconds=0.2).data


def group_details(compartment_id: str, availability_domain: str, volume_ids: list[str], tag: str,
                  **extra: Any) -> models.CreateVolumeGroupDetails:
    return models.CreateVolumeGroupDetails(
        compartment_id=compartment_id, availability_domain=availability_domain, freeform_tags={"test": tag},
        source_details=models.VolumeGroupSourceFromVolumesDetails(volume_ids=volume_ids), **extra)


@pytest.fixture
def tag(localoci: RunningLocalOCI, blockstorage: oci.core.BlockstorageClient) -> Iterator[str]:
    """A freeform tag value for this test's volumes and groups; every live one carrying it is deleted at the end."""
    value = uuid.uuid4().hex[:12]
    yield value
    left = localoci.inventory(test=value)
    for group in left["volumeGroups"]:
        if group["lifecycleState"] != "TERMINATING":
            blockstorage.delete_volume_group(group["id"])
    for volume in left["volumes"]:
        volume_id = volume["id"]
        waiting.wait_until(blockstorage, blockstorage.get_volume(volume_id), max_wait_seconds=30, max_interval_seconds=0.2,
                       evaluate_response=lambda r: r.data.lifecycle_state != "PROVISIONING")
        if blockstorage.get_volume(volume_id).data.lifecycle_state != "TERMINATING":
            blockstorage.delete_volume(volume_id)


@pytest.fixture
def new_volume(blockstorage, compartment_id, availability_domains, tag) -> Callable[..., models.Volume]:
    """Make an AVAILABLE volume carrying the test's tag (in the first availability domain unless told)."""
    def make(size_in_gbs: int = 50, ad: str | None = None) -> models.Volume:
        volume = blockstorage.create_volume(models.CreateVolumeDetails(
            compartment_id=compartment_id, availability_domain=ad or availability_domains[0], size_in_gbs=size_in_gbs,
            freeform_tags={"test": tag})).data
        return wait_for(blockstorage, blockstorage.get_volume, volume.id, "AVAILABLE")
    return make


def refusal(call: Callable[[], Any]) -> oci.exceptions.ServiceError:
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        call()
    return refused.value


def test_group_of_several_volumes_becomes_available_and_its_volumes_name_it(blockstorage, compartment_id,
                                                                           availability_domains, new_volume, tag):
    volumes = [new_volume(50), new_volume(60), new_volume(70)]
    ids = [v.id for v in volumes]
    created = blockstorage.create_volume_group(group_details(
        compartment_id, availability_domains[0], ids, tag, display_name="machine-1",
        defined_tags={"Operations": {"CostCenter": "42"}}))
    assert created.status == 200 and created.headers["opc-request-id"]
    assert created.data.lifecycle_state == "PROVISIONING" and created.data.id.startswith("ocid1.volumegroup.")

    group = wait_for(blockstorage, blockstorage.get_volume_group, created.data.id, "AVAILABLE")
    assert isinstance(group, models.VolumeGroup)
    assert (group.display_name, group.compartment_id, group.availability_domain) == \
           ("machine-1", compartment_id, availability_domains[0])
    assert group.volume_ids == ids
    assert (group.size_in_gbs, group.size_in_mbs) == (180, 180 * 1024)
    assert isinstance(group.source_details, models.VolumeGroupSourceFromVolumesDetails)
    assert group.source_details.type == "volumeIds" and group.source_details.volume_ids == ids
    assert group.is_hydrated is True
    assert isinstance(group.time_created, dt.datetime)
    assert group.freeform_tags == {"test": tag} and group.defined_tags == {"Operations": {"CostCenter": "42"}}
    assert all(blockstorage.get_volume(v).data.volume_group_id == group.id for v in ids)
    members = blockstorage.list_volumes(compartment_id=compartment_id, volume_group_id=group.id).data
    assert sorted(v.id for v in members) == sorted(ids)

    # The group's size is its volumes' size as it is now.
    blockstorage.update_volume(ids[0], models.UpdateVolumeDetails(size_in_gbs=100))
    assert blockstorage.get_volume_group(group.id).data.size_in_gbs == 230


@pytest.mark.heavy
def test_list_volume_groups_filters_and_pages(localoci, oci_config, blockstorage, compartment_id, availability_domains,
                                              new_volume, tag):
    name = f"listed-{tag}"
    ids = [blockstorage.create_volume_group(group_details(compartment_id, availability_domains[0], [new_volume().id],
                                                          tag, display_name=name)).data.id for _ in range(3)]
    other = blockstorage.create_volume_group(group_details(
        compartment_id, availability_domains[1], [new_volume(ad=availability_domains[1]).id], tag, display_name=name)).data
    for group_id in [*ids, other.id]:
        wait_for(blockstorage, blockstorage.get_volume_group, group_id, "AVAILABLE")

    first = blockstorage.list_volume_groups(compartment_id, availability_domain=availability_domains[0],
                                            display_name=name, limit=2)
    assert len(first.data) == 2 and first.next_page
    every = oci.pagination.list_call_get_all_results(
        blockstorage.list_volume_groups, compartment_id, availability_domain=availability_domains[0],
        display_name=name, limit=2).data
    assert sorted(g.id for g in every) == sorted(ids)
    assert all(g.size_in_gbs == 50 and len(g.volume_ids) == 1 for g in every)
    in_both = blockstorage.list_volume_groups(compartment_id, display_name=name).data
    assert sorted(g.id for g in in_both) == sorted([*ids, other.id])

    blockstorage.delete_volume_group(ids[0])
    wait_for(blockstorage, blockstorage.get_volume_group, ids[0], "TERMINATED")
    available = blockstorage.list_volume_groups(compartment_id, display_name=name, lifecycle_state="AVAILABLE").data
    assert sorted(g.id for g in available) == sorted([*ids[1:], other.id])
    terminated = blockstorage.list_volume_groups(compartment_id, display_name=name, lifecycle_state="TERMINATED").data
    assert [g.id for g in terminated] == [ids[0]]

    # The compartment is required, as in OCI.
    reply = requests.get(f"{localoci.endpoint}/20160918/volumeGroups", auth=signer_for(oci_config), timeout=30)
    assert reply.status_code == 400 and "compartmentId" in reply.json()["message"]


def test_update_replaces_the_volumes_and_changes_name_and_tags(blockstorage, compartment_id, availability_domains,
                                                               new_volume, tag):
    v1, v2, v3 = new_volume(50), new_volume(60), new_volume(80)
    group = blockstorage.create_volume_group(group_details(compartment_id, availability_domains[0], [v1.id, v2.id], tag)).data
    wait_for(blockstorage, blockstorage.get_volume_group, group.id, "AVAILABLE")

    updated = blockstorage.update_volume_group(group.id, models.UpdateVolumeGroupDetails(
        volume_ids=[v2.id, v3.id], display_name="renamed", freeform_tags={"test": tag, "machine": "m2"},
        defined_tags={"Operations": {"CostCenter": "7"}})).data
    assert updated.volume_ids == [v2.id, v3.id] and updated.size_in_gbs == 140
    assert (updated.display_name, updated.freeform_tags, updated.defined_tags) == \
           ("renamed", {"test": tag, "machine": "m2"}, {"Operations": {"CostCenter": "7"}})
    assert blockstorage.get_volume_group(group.id).data == updated
    assert blockstorage.get_volume(v1.id).data.volume_group_id is None
    assert blockstorage.get_volume(v3.id).data.volume_group_id == group.id
    # What the group was made from stays as it was.
    assert group.source_details.volume_ids == updated.source_details.volume_ids == [v1.id, v2.id]

    # A name alone leaves the volumes as they are.
    renamed = blockstorage.update_volume_group(group.id, models.UpdateVolumeGroupDetails(display_name="again")).data
    assert renamed.display_name == "again" and renamed.volume_ids == [v2.id, v3.id]


def test_deleted_group_terminates_and_its_volumes_stay_out_of_any_group(blockstorage, compartment_id,
                                                                        availability_domains, new_volume, tag):
    ids = [new_volume().id, new_volume().id]
    group = blockstorage.create_volume_group(group_details(compartment_id, availability_domains[0], ids, tag)).data
    wait_for(blockstorage, blockstorage.get_volume_group, group.id, "AVAILABLE")

    deleted = blockstorage.delete_volume_group(group.id)
    assert deleted.status == 204
    assert blockstorage.get_volume_group(group.id).data.lifecycle_state in ("TERMINATING", "TERMINATED")
    wait_for(blockstorage, blockstorage.get_volume_group, group.id, "TERMINATED")
    for volume_id in ids:
        volume = blockstorage.get_volume(volume_id).data
        assert (volume.lifecycle_state, volume.volume_group_id) == ("AVAILABLE", None)
    again = refusal(lambda: blockstorage.delete_volume_group(group.id))
    assert (again.status, again.code) == (409, "IncorrectState")
    terminated = refusal(lambda: blockstorage.update_volume_group(group.id, models.UpdateVolumeGroupDetails(display_name="x")))
    assert (terminated.status, terminated.code) == (409, "IncorrectState")

    # Free again, the volumes can make up a new group.
    regrouped = blockstorage.create_volume_group(group_details(compartment_id, availability_domains[0], ids, tag)).data
    assert regrouped.volume_ids == ids


def test_deleted_volume_leaves_its_group(blockstorage, compartment_id, availability_domains, new_volume, tag):
    kept, deleted = new_volume(50), new_volume(60)
    group = blockstorage.create_volume_group(group_details(compartment_id, availability_domains[0], [kept.id, deleted.id],
                                                           tag)).data
    wait_for(blockstorage, blockstorage.get_volume_group, group.id, "AVAILABLE")
    blockstorage.delete_volume(deleted.id)
    after = blockstorage.get_volume_group(group.id).data
    assert (after.lifecycle_state, after.volume_ids, after.size_in_gbs) == ("AVAILABLE", [kept.id], 50)
    assert wait_for(blockstorage, blockstorage.get_volume, deleted.id, "TERMINATED").volume_group_id is None


def test_refusals_of_volumes_that_cannot_join_and_of_unknown_ids(localoci, blockstorage, compartment_id,
                                                                 availability_domains, new_volume, tag):
    ad = availability_domains[0]
    here, elsewhere, free = new_volume(), new_volume(ad=availability_domains[1]), new_volume()
    group = blockstorage.create_volume_group(group_details(compartment_id, ad, [here.id], tag)).data
    wait_for(blockstorage, blockstorage.get_volume_group, group.id, "AVAILABLE")

    other_ad = refusal(lambda: blockstorage.create_volume_group(group_details(compartment_id, ad, [free.id, elsewhere.id], tag)))
    assert (other_ad.status, other_ad.code) == (400, "InvalidParameter") and availability_domains[1] in other_ad.message
    taken = refusal(lambda: blockstorage.create_volume_group(group_details(compartment_id, ad, [free.id, here.id], tag)))
    assert (taken.status, taken.code) == (409, "Conflict") and group.id in taken.message
    unknown = refusal(lambda: blockstorage.create_volume_group(group_details(compartment_id, ad, ["ocid1.volume.oc1..none"], tag)))
    assert (unknown.status, unknown.code) == (404, "NotAuthorizedOrNotFound")
    twice = refusal(lambda: blockstorage.create_volume_group(group_details(compartment_id, ad, [free.id, free.id], tag)))
    assert (twice.status, twice.code) == (400, "InvalidParameter")
    empty = refusal(lambda: blockstorage.create_volume_group(group_details(compartment_id, ad, [], tag)))
    assert (empty.status, empty.code) == (400, "InvalidParameter")
    clone = refusal(lambda: blockstorage.create_volume_group(models.CreateVolumeGroupDetails(
        compartment_id=compartment_id, availability_domain=ad,
        source_details=models.VolumeGroupSourceFromVolumeGroupDetails(volume_group_id=group.id))))
    assert (clone.status, clone.code) == (400, "InvalidParameter") and "volumeGroupId" in clone.message
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "failResource": True})
    faulty = blockstorage.create_volume(models.CreateVolumeDetails(
        compartment_id=compartment_id, availability_domain=ad, size_in_gbs=50, freeform_tags={"test": tag})).data
    wait_for(blockstorage, blockstorage.get_volume, faulty.id, "FAULTY")
    not_available = refusal(lambda: blockstorage.create_volume_group(group_details(compartment_id, ad, [faulty.id], tag)))
    assert (not_available.status, not_available.code) == (409, "IncorrectState") and "FAULTY" in not_available.message
    # Nothing refused made a group, nor moved a volume.
    assert [g["id"] for g in localoci.inventory(test=tag)["volumeGroups"]] == [group.id]
    assert blockstorage.get_volume(free.id).data.volume_group_id is None

    # The same rules hold for the volumes an update names.
    second = blockstorage.create_volume_group(group_details(compartment_id, ad, [free.id], tag)).data
    wait_for(blockstorage, blockstorage.get_volume_group, second.id, "AVAILABLE")
    taken = refusal(lambda: blockstorage.update_volume_group(second.id, models.UpdateVolumeGroupDetails(
        volume_ids=[free.id, here.id])))
    assert (taken.status, taken.code) == (409, "Conflict")
    other_ad = refusal(lambda: blockstorage.update_volume_group(second.id, models.UpdateVolumeGroupDetails(
        volume_ids=[elsewhere.id])))
    assert (other_ad.status, other_ad.code) == (400, "InvalidParameter")
    assert blockstorage.get_volume_group(second.id).data.volume_ids == [free.id]
    assert blockstorage.get_volume(here.id).data.volume_group_id == group.id

    for call in (lambda: blockstorage.get_volume_group("ocid1.volumegroup.oc1..none"),
                 lambda: blockstorage.update_volume_group("ocid1.volumegroup.oc1..none",
                                                          models.UpdateVolumeGroupDetails(display_name="x")),
                 lambda: blockstorage.delete_volume_group("ocid1.volumegroup.oc1..none")):
        missing = refusal(call)
        assert (missing.status, missing.code) == (404, "NotAuthorizedOrNotFound")


def test_create_sent_again_with_its_retry_token_gets_the_one_group(localoci, blockstorage, compartment_id,
                                                                   availability_domains, new_volume, tag):
    ids = [new_volume().id, new_volume().id]
    details, token = group_details(compartment_id, availability_domains[0], ids, tag), uuid.uuid4().hex
    first = blockstorage.create_volume_group(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    wait_for(blockstorage, blockstorage.get_volume_group, first.id, "AVAILABLE")

    # Without its token the same call would be refused: its volumes are in a group already.
    again = blockstorage.create_volume_group(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert again == first and again.lifecycle_state == "PROVISIONING"
    assert [g["id"] for g in localoci.inventory(test=tag)["volumeGroups"]] == [first.id]

    details.display_name = "another"
    reused = refusal(lambda: blockstorage.create_volume_group(details, opc_retry_token=token, retry_strategy=NO_RETRY))
    assert (reused.status, reused.code) == (409, "Conflict") and "retry token" in reused.message
    assert [g["id"] for g in localoci.inventory(test=tag)["volumeGroups"]] == [first.id]
