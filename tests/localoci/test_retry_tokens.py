"""Retry tokens, faults that strike after the operation took effect, and resources that fail to provision, through the real SDK."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import oci
import pytest
import requests

from localoci import process
from localoci.http import Request, Response
from localoci.process import RunningLocalOCI
from localoci.retrytokens import RetryTokens
from localoci.store import Store
# clean_server (autouse): the session's server is left with no fault, latency or bandwidth cap.
from tests.localoci.test_faults import NO_RETRY, admin_error, clean_server, wait_state  # noqa: F401
from tests.localoci.test_objectstorage import signer_for
from tests.workers import launch_details
from tests.waiting import wait_until_past
from tests import waiting

models = oci.core.models


def new_token() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def tag(localoci: RunningLocalOCI, compute: oci.core.ComputeClient, blockstorage: oci.core.BlockstorageClient) -> Iterator[str]:
    """A freeform tag value for this test's resources; every live one carrying it is removed at the end."""
    value = uuid.uuid4().hex[:12]
    yield value
    left = localoci.inventory(test=value)
    for instance in left["instances"]:
        compute.terminate_instance(instance["id"])
    for instance in left["instances"]:
        wait_state(lambda: compute.get_instance(instance["id"]).data, "TERMINATED")
    for volume in left["volumes"]:
        volume_id = volume["id"]
        waiting.wait_until(blockstorage, blockstorage.get_volume(volume_id), max_wait_seconds=30, max_interval_seconds=0.2,
                       evaluate_response=lambda r: r.data.lifecycle_state != "PROVISIONING")
        blockstorage.delete_volume(volume_id)
        wait_state(lambda: blockstorage.get_volume(volume_id).data, "TERMINATED")


def volume_details(compartment_id: str, availability_domain: str, tag: str, size_in_gbs: int = 50) -> models.CreateVolumeDetails:
    return models.CreateVolumeDetails(compartment_id=compartment_id, availability_domain=availability_domain,
                                      size_in_gbs=size_in_gbs, freeform_tags={"test": tag})


def tagged_volumes(localoci: RunningLocalOCI, tag: str) -> list[str]:
    return [v["id"] for v in localoci.inventory(test=tag)["volumes"]]


# -- retry tokens ---------------------------------------------------------------------


def test_create_sent_again_with_its_token_gets_the_one_volume(localoci, blockstorage, compartment_id, availability_domains, tag):
    details, token = volume_details(compartment_id, availability_domains[0], tag), new_token()
    first = blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY)
    wait_state(lambda: blockstorage.get_volume(first.data.id).data, "AVAILABLE")

    again = blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY)
    assert again.status == first.status == 200
    # The first reply, replayed as it was: the volume as it was then, though it is AVAILABLE by now.
    assert again.data == first.data and again.data.lifecycle_state == "PROVISIONING"
    assert tagged_volumes(localoci, tag) == [first.data.id]

    # Without a token (or with another one) the same request is a new volume.
    other = blockstorage.create_volume(details, retry_strategy=NO_RETRY).data
    assert sorted(tagged_volumes(localoci, tag)) == sorted([first.data.id, other.id])


def test_retry_token_body_is_compared_whatever_the_order_of_its_keys(localoci, oci_config, compartment_id,
                                                                    availability_domains, tag):
    body = {"compartmentId": compartment_id, "availabilityDomain": availability_domains[0], "sizeInGBs": 50,
            "freeformTags": {"test": tag, "other": "x"}}
    reordered = {"freeformTags": {"other": "x", "test": tag}, "sizeInGBs": 50,
                 "availabilityDomain": availability_domains[0], "compartmentId": compartment_id}
    token = new_token()

    def post(document: dict[str, Any]) -> requests.Response:
        return requests.post(f"{localoci.endpoint}/20160918/volumes", data=json.dumps(document), timeout=30,
                             auth=signer_for(oci_config),
                             headers={"Content-Type": "application/json", "opc-retry-token": token})

    first, second = post(body), post(reordered)
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert tagged_volumes(localoci, tag) == [first.json()["id"]]


def test_retry_token_reused_for_another_request_is_a_conflict(localoci, blockstorage, network, compartment_id,
                                                              availability_domains, tag):
    token = new_token()
    volume = blockstorage.create_volume(volume_details(compartment_id, availability_domains[0], tag),
                                        opc_retry_token=token, retry_strategy=NO_RETRY).data

    with pytest.raises(oci.exceptions.ServiceError) as err:  # another body
        blockstorage.create_volume(volume_details(compartment_id, availability_domains[0], tag, size_in_gbs=60),
                                   opc_retry_token=token, retry_strategy=NO_RETRY)
    assert (err.value.status, err.value.code) == (409, "Conflict")
    assert "retry token" in err.value.message
    with pytest.raises(oci.exceptions.ServiceError) as err:  # another operation
        network.create_vcn(models.CreateVcnDetails(compartment_id=compartment_id, cidr_block="10.9.0.0/16"),
                           opc_retry_token=token, retry_strategy=NO_RETRY)
    assert (err.value.status, err.value.code) == (409, "Conflict")
    assert tagged_volumes(localoci, tag) == [volume.id]


def test_retry_token_longer_than_64_characters_is_refused(localoci, blockstorage, compartment_id, availability_domains, tag):
    details = volume_details(compartment_id, availability_domains[0], tag)
    with pytest.raises(oci.exceptions.ServiceError) as err:
        blockstorage.create_volume(details, opc_retry_token="t" * 65, retry_strategy=NO_RETRY)
    assert (err.value.status, err.value.code) == (400, "InvalidParameter")
    assert tagged_volumes(localoci, tag) == []

    volume = blockstorage.create_volume(details, opc_retry_token=new_token() * 2, retry_strategy=NO_RETRY).data
    assert tagged_volumes(localoci, tag) == [volume.id]


def test_failed_call_leaves_its_token_unused(localoci, blockstorage, compartment_id, availability_domains, tag):
    details, token = volume_details(compartment_id, availability_domains[0], tag), new_token()
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "status": 500, "code": "InternalError"})
    with pytest.raises(oci.exceptions.ServiceError) as err:
        blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY)
    assert err.value.status == 500
    assert tagged_volumes(localoci, tag) == []

    # The retry runs afresh: the failure is not what the token replays.
    volume = blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert tagged_volumes(localoci, tag) == [volume.id]


def test_concurrent_calls_with_one_token_create_one_volume(localoci, blockstorage, compartment_id, availability_domains, tag):
    details, token = volume_details(compartment_id, availability_domains[0], tag), new_token()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: blockstorage.create_volume(details, opc_retry_token=token,
                                                                 retry_strategy=NO_RETRY).data.id, range(8)))
    assert len(set(ids)) == 1
    assert tagged_volumes(localoci, tag) == ids[:1]


def test_retry_tokens_survive_a_restart(tmp_path):
    server = process.start(tmp_path / "data")
    try:
        config = oci.config.from_file(server.oci_config_file, server.oci_profile)
        details = models.CreateVolumeDetails(compartment_id=server.tenancy_id, availability_domain="local:LOCAL-AD-1",
                                             size_in_gbs=50)
        volume = oci.core.BlockstorageClient(config, service_endpoint=server.endpoint).create_volume(
            details, opc_retry_token="kept", retry_strategy=NO_RETRY).data
    finally:
        server.stop()

    server = process.start(tmp_path / "data")
    try:
        blockstorage = oci.core.BlockstorageClient(config, service_endpoint=server.endpoint)
        again = blockstorage.create_volume(details, opc_retry_token="kept", retry_strategy=NO_RETRY).data
        assert again.id == volume.id
        assert [v["id"] for v in server.inventory()["volumes"]] == [volume.id]
        details.size_in_gbs = 60
        with pytest.raises(oci.exceptions.ServiceError) as err:
            blockstorage.create_volume(details, opc_retry_token="kept", retry_strategy=NO_RETRY)
        assert err.value.status == 409
    finally:
        server.stop()


def test_retry_token_expires(tmp_path):
    """After its lifetime (24 hours; here a moment) a token is forgotten: the same call runs again."""
    tokens = RetryTokens(Store(tmp_path), ttl_seconds=0.2)
    replies = iter([Response.json({"id": "first"}), Response.json({"id": "second"})])

    def call() -> Any:
        body = b'{"a": 1}'
        request = Request("POST", "/things", "", {"Content-Type": "application/json", "Content-Length": str(len(body))},
                          io.BytesIO(body), ("127.0.0.1", 0))
        reply = tokens.once("token", "CreateThing", request, lambda _: next(replies))
        return json.loads(reply.body)

    assert call() == call() == {"id": "first"}
    assert Store(tmp_path).collection("retry_tokens")["token"]["operation"] == "CreateThing"  # saved with the state
    wait_until_past(dt.datetime.fromtimestamp(Store(tmp_path).collection("retry_tokens")["token"]["expires"], dt.timezone.utc))
    assert call() == {"id": "second"}


# -- faults after the operation took effect ------------------------------------------------


@pytest.mark.parametrize("strike", [{"status": 500, "code": "InternalError"}, {"drop": True}], ids=["500", "drop"])
def test_reply_lost_after_create_volume_then_retry_with_token_gives_one_volume(localoci, blockstorage, compartment_id,
                                                                              availability_domains, tag, strike):
    details, token = volume_details(compartment_id, availability_domains[0], tag), new_token()
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "phase": "after", **strike})

    with pytest.raises((oci.exceptions.ServiceError, oci.exceptions.RequestException)) as err:
        blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY)
    if "drop" in strike:
        assert isinstance(err.value, oci.exceptions.RequestException)
        assert "closed connection without response" in str(err.value)
    else:
        assert (err.value.status, err.value.code) == (500, "InternalError")
    # The call failed, yet the volume exists.
    [created] = tagged_volumes(localoci, tag)

    volume = blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert volume.id == created
    assert tagged_volumes(localoci, tag) == [created]
    assert localoci.admin("GET", "faults") == []


def test_dropped_connection_before_the_operation_creates_nothing(localoci, blockstorage, compartment_id,
                                                                availability_domains, tag):
    details, token = volume_details(compartment_id, availability_domains[0], tag), new_token()
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "drop": True})
    with pytest.raises(oci.exceptions.RequestException):
        blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY)
    assert tagged_volumes(localoci, tag) == []
    volume = blockstorage.create_volume(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert tagged_volumes(localoci, tag) == [volume.id]


def test_launch_attach_and_stop_with_lost_replies_happen_once(localoci, compute, blockstorage, compartment_id,
                                                             availability_domains, subnet_id, client_key, tag):
    ad = availability_domains[0]
    details = launch_details(compartment_id, ad, subnet_id, client_key, freeform_tags={"test": tag})
    token = new_token()
    localoci.admin("POST", "faults", {"operation": "LaunchInstance", "phase": "after", "drop": True})
    with pytest.raises(oci.exceptions.RequestException):
        compute.launch_instance(details, opc_retry_token=token, retry_strategy=NO_RETRY)
    instance = compute.launch_instance(details, opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert [i["id"] for i in localoci.inventory(test=tag)["instances"]] == [instance.id]

    volume = blockstorage.create_volume(volume_details(compartment_id, ad, tag), retry_strategy=NO_RETRY).data
    wait_state(lambda: blockstorage.get_volume(volume.id).data, "AVAILABLE")
    wait_state(lambda: compute.get_instance(instance.id).data, "RUNNING")
    attach = models.AttachParavirtualizedVolumeDetails(instance_id=instance.id, volume_id=volume.id)
    token = new_token()
    localoci.admin("POST", "faults", {"operation": "AttachVolume", "phase": "after", "status": 503,
                                      "code": "ServiceUnavailable"})
    with pytest.raises(oci.exceptions.ServiceError) as err:
        compute.attach_volume(attach, opc_retry_token=token, retry_strategy=NO_RETRY)
    assert err.value.status == 503
    # Without its token the retry would be refused: the volume is already attached.
    with pytest.raises(oci.exceptions.ServiceError) as err:
        compute.attach_volume(attach, retry_strategy=NO_RETRY)
    assert (err.value.status, err.value.code) == (409, "Conflict")
    attachment = compute.attach_volume(attach, opc_retry_token=token, retry_strategy=NO_RETRY).data
    attachments = [a["id"] for a in localoci.inventory()["attachments"] if a["instanceId"] == instance.id]
    assert attachments == [attachment.id]
    wait_state(lambda: compute.get_volume_attachment(attachment.id).data, "ATTACHED")

    # An action is no create, but takes a token all the same: STOP sent again is not refused as STOPPING.
    token = new_token()
    stopping = compute.instance_action(instance.id, "STOP", opc_retry_token=token, retry_strategy=NO_RETRY).data
    again = compute.instance_action(instance.id, "STOP", opc_retry_token=token, retry_strategy=NO_RETRY).data
    assert stopping.lifecycle_state == again.lifecycle_state == "STOPPING"
    with pytest.raises(oci.exceptions.ServiceError) as err:
        compute.instance_action(instance.id, "STOP", retry_strategy=NO_RETRY)
    assert (err.value.status, err.value.code) == (409, "IncorrectState")


# -- resources that fail to provision -------------------------------------------------------


def test_fail_resource_makes_a_volume_faulty(localoci, blockstorage, compartment_id, availability_domains, tag):
    details = volume_details(compartment_id, availability_domains[0], tag)
    localoci.admin("POST", "faults", {"operation": "CreateVolume", "failResource": True})
    volume = blockstorage.create_volume(details, retry_strategy=NO_RETRY).data
    assert volume.lifecycle_state == "PROVISIONING"
    wait_state(lambda: blockstorage.get_volume(volume.id).data, "FAULTY")
    with pytest.raises(oci.exceptions.MaximumWaitTimeExceeded):
        waiting.wait_until(blockstorage, blockstorage.get_volume(volume.id), "lifecycle_state", "AVAILABLE",
                           max_wait_seconds=1)

    # The fault is spent: the next volume becomes AVAILABLE.
    assert localoci.admin("GET", "faults") == []
    healthy = blockstorage.create_volume(details, retry_strategy=NO_RETRY).data
    wait_state(lambda: blockstorage.get_volume(healthy.id).data, "AVAILABLE")


def test_fail_resource_terminates_a_launched_instance(localoci, compute, compartment_id, availability_domains,
                                                      subnet_id, client_key, tag):
    details = launch_details(compartment_id, availability_domains[0], subnet_id, client_key, freeform_tags={"test": tag})
    localoci.admin("POST", "faults", {"operation": "LaunchInstance", "failResource": True})
    instance = compute.launch_instance(details, retry_strategy=NO_RETRY).data
    assert instance.lifecycle_state == "PROVISIONING"
    wait_state(lambda: compute.get_instance(instance.id).data, "TERMINATED")
    assert localoci.inventory(test=tag)["instances"] == []
    [vnic] = compute.list_vnic_attachments(compartment_id, instance_id=instance.id).data
    assert vnic.lifecycle_state == "DETACHED"


@pytest.mark.parametrize("spec", [
    {"operation": "CreateVolume", "phase": "during"},                           # no such phase
    {"operation": "CreateVolume", "phase": 1},                                  # phase not a word
    {"operation": "CreateVolume", "drop": "yes"},                               # drop not a boolean
    {"operation": "CreateVolume", "failResource": 1},                           # failResource not a boolean
    {"operation": "GetObject", "failResource": True},                           # nothing to fail
    {"operation": "CreateVolume", "failResource": True, "phase": "after"},      # failResource answers normally
    {"operation": "CreateVolume", "failResource": True, "drop": True},
    {"operation": "GetObject", "cutAfterBytes": 10, "phase": "after"},          # cutAfterBytes has its own timing
    {"operation": "GetObject", "cutAfterBytes": 10, "drop": True},
])
def test_bad_new_fault_fields_are_refused(localoci, spec):
    err = admin_error(localoci, "POST", "faults", spec)
    assert err.code == 400
    assert json.loads(err.read())["code"] == "InvalidParameter"
    assert localoci.admin("GET", "faults") == []


def test_new_fault_fields_are_listed(localoci):
    fault = localoci.admin("POST", "faults", {"operation": "CreateVolume", "phase": "after", "drop": True})
    assert (fault["phase"], fault["drop"], fault["fail_resource"]) == ("after", True, False)
    assert localoci.admin("GET", "faults") == [fault]
