"""The upload trigger against a real Prefect server (SQLite and PostgreSQL) and the local OCI."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from function_trigger.func import head_object
from function_trigger.trigger import PrefectApi, TriggerConfig, handle
from tests.trigger.conftest import CREATE, event, put, runs_for


def invoke(config: dict[str, str], raw: bytes):
    settings = TriggerConfig.from_mapping(config)
    return handle(raw, settings, head_object(config), PrefectApi(settings))


@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_one_event_gives_one_flow_run_with_the_right_parameters(config, prefect_api, localoci, object_storage,
                                                                bucket, version):
    name = f"team a/{uuid.uuid4().hex}.QCOW2"
    etag = put(object_storage, localoci, bucket, name, {"ad_number": "2", "vpus": "20", "display_name": "web01"})
    decision = invoke(config, event(localoci.namespace, bucket, name, etag, version=version))
    assert decision.decision == "started" and decision.created is True, decision
    [run] = runs_for(prefect_api, {name})
    assert run["id"] == decision.flow_run_id
    assert run["idempotency_key"] == f"{localoci.namespace}/{bucket}/{name}@{etag}"
    assert run["parameters"] == {"credentials_block": "local-oci", "namespace": localoci.namespace,
                                 "bucket": bucket, "object_name": name, "etag": etag, "ad_number": 2, "vpus": 20,
                                 "display_name": "web01"}


def test_the_same_event_twenty_times_at_once_gives_exactly_one_run(config, prefect_api, localoci, object_storage,
                                                                   bucket):
    name = f"{uuid.uuid4().hex}.vmdk"
    raw = event(localoci.namespace, bucket, name, put(object_storage, localoci, bucket, name))
    with ThreadPoolExecutor(20) as pool:
        decisions = list(pool.map(lambda _: invoke(config, raw), range(20)))
    assert all(d.decision == "started" for d in decisions), [d.reason for d in decisions if d.decision != "started"]
    assert len({d.flow_run_id for d in decisions}) == 1
    assert len(runs_for(prefect_api, {name})) == 1


def test_fifty_different_events_at_once_give_fifty_runs(config, prefect_api, localoci, object_storage, bucket):
    names = [f"burst/{i:02d}-{uuid.uuid4().hex[:8]}.qcow2" for i in range(50)]
    events = [event(localoci.namespace, bucket, n, put(object_storage, localoci, bucket, n)) for n in names]
    with ThreadPoolExecutor(50) as pool:
        decisions = list(pool.map(lambda raw: invoke(config, raw), events))
    failed = [d.reason for d in decisions if d.decision != "started"]
    assert not failed, failed
    assert len({d.flow_run_id for d in decisions}) == 50
    assert len(runs_for(prefect_api, set(names))) == 50


@pytest.mark.parametrize("case,expected", [
    ("delete", "not-an-upload"),
    ("suffix", "not-an-image"),
    ("bucket", "not-watched"),
])
def test_events_not_for_the_importer_start_nothing(config, prefect_api, localoci, object_storage, bucket,
                                                   case, expected):
    name = f"{uuid.uuid4().hex}" + (".txt" if case == "suffix" else ".qcow2")
    etag = put(object_storage, localoci, bucket, name)
    kind = "com.oraclecloud.objectstorage.deleteobject" if case == "delete" else CREATE
    target_bucket = "some-other-bucket" if case == "bucket" else bucket
    decision = invoke(config, event(localoci.namespace, target_bucket, name, etag, kind=kind))
    assert decision.decision == "ignored" and decision.status == 200 and decision.code == expected
    assert runs_for(prefect_api, {name}) == []


@pytest.mark.parametrize("suffix", [".raw.gz", ".img.xz", ".qcow2.zst", ".tar", ".TGZ"])
def test_compressed_and_packed_images_start_a_run(config, prefect_api, localoci, object_storage, bucket, suffix):
    name = f"{uuid.uuid4().hex}{suffix}"
    etag = put(object_storage, localoci, bucket, name, {"virtual-size": "8589934592"})
    decision = invoke(config, event(localoci.namespace, bucket, name, etag))
    assert decision.decision == "started", decision
    [run] = runs_for(prefect_api, {name})
    assert "virtual_size" not in run["parameters"]  # it travels as the object's metadata


@pytest.mark.parametrize("suffix", [".ova", ".OVF", ".machine.json"])
def test_a_machine_starts_a_machine_import_with_its_metadata_left_aside(config, prefect_api, localoci, object_storage,
                                                                        bucket, suffix):
    name = f"machines/{uuid.uuid4().hex}{suffix}"
    etag = put(object_storage, localoci, bucket, name, {"vpus": "20"})
    decision = invoke(config, event(localoci.namespace, bucket, name, etag))
    assert decision.decision == "started", decision
    [run] = runs_for(prefect_api, {name}, "machine_deployment_id")
    assert run["parameters"] == {"credentials_block": "local-oci", "namespace": localoci.namespace,
                                 "bucket": bucket, "object_name": name, "etag": etag}
    assert runs_for(prefect_api, {name}) == []  # not a disk import


def test_a_machine_upload_asks_for_a_bootable_launched_adapted_machine_by_its_metadata(
        config, prefect_api, localoci, object_storage, bucket):
    name = f"machines/{uuid.uuid4().hex}.ova"
    etag = put(object_storage, localoci, bucket, name, {"bootable": "yes", "launch": "on", "adapt_guest": "OFF"})
    decision = invoke(config, event(localoci.namespace, bucket, name, etag))
    assert decision.decision == "started", decision
    [run] = runs_for(prefect_api, {name}, "machine_deployment_id")
    assert {k: run["parameters"].get(k) for k in ("bootable", "launch", "adapt_guest")} == {
        "bootable": True, "launch": True, "adapt_guest": "off"}


@pytest.mark.parametrize("metadata,expected", [
    ({"bootable": "maybe"}, "invalid-bootable"),
    ({"bootable": "false", "launch": "true"}, "invalid-launch"),
    ({"bootable": "true", "adapt_guest": "always"}, "invalid-adapt-guest"),
])
def test_bad_machine_metadata_is_refused_with_its_code_and_starts_nothing(config, prefect_api, localoci,
                                                                          object_storage, bucket, metadata, expected):
    name = f"machines/{uuid.uuid4().hex}.ova"
    etag = put(object_storage, localoci, bucket, name, metadata)
    decision = invoke(config, event(localoci.namespace, bucket, name, etag))
    assert decision.decision == "refused" and decision.status == 400 and decision.code == expected, decision
    assert runs_for(prefect_api, {name}, "machine_deployment_id") == []


def test_a_compressed_file_that_is_no_image_starts_nothing(config, prefect_api, localoci, object_storage, bucket):
    name = f"{uuid.uuid4().hex}.txt.gz"
    decision = invoke(config, event(localoci.namespace, bucket, name, put(object_storage, localoci, bucket, name)))
    assert decision.decision == "ignored" and decision.code == "not-an-image"


@pytest.mark.parametrize("raw,expected", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (None, "missing data.resourceName"),
    ("no-namespace", "missing data.additionalDetails.namespace"),
])
def test_malformed_events_are_refused_with_a_reason(config, prefect_api, localoci, bucket, raw, expected):
    if raw is None:
        raw = event(localoci.namespace, bucket, None, "etag")
    elif raw == "no-namespace":
        raw = event("", bucket, "x.qcow2", "etag")
    decision = invoke(config, raw)
    assert decision.decision == "refused" and decision.status == 400 and decision.code == "invalid-event"
    assert expected in decision.reason  # one code for every malformed event; the reason says what is wrong


@pytest.mark.parametrize("metadata,expected", [
    ({"ad_number": "7"}, "invalid-ad-number"),
    ({"ad_number": "one"}, "invalid-ad-number"),
    ({"vpus": "25"}, "invalid-vpus"),
    ({"format": "iso"}, "invalid-format"),
    ({"virtual-size": "0"}, "invalid-virtual-size"),
    ({"sync": "sometimes"}, "invalid-sync"),
])
def test_bad_metadata_is_refused_and_starts_nothing(config, prefect_api, localoci, object_storage, bucket,
                                                    metadata, expected):
    name = f"{uuid.uuid4().hex}.qcow2"
    etag = put(object_storage, localoci, bucket, name, metadata)
    decision = invoke(config, event(localoci.namespace, bucket, name, etag))
    assert decision.decision == "refused" and decision.status == 400 and decision.code == expected
    assert runs_for(prefect_api, {name}) == []


def test_wrong_api_credential_gets_a_clear_error(config, prefect_api, localoci, object_storage, bucket):
    name = f"{uuid.uuid4().hex}.qcow2"
    etag = put(object_storage, localoci, bucket, name)
    decision = invoke({**config, "PREFECT_API_AUTH_STRING": "importer:wrong"}, event(localoci.namespace, bucket,
                                                                                      name, etag))
    assert decision.decision == "failed" and decision.status == 502 and decision.code == "prefect-unavailable"
    assert "refused the credentials" in decision.reason and "wrong" not in decision.reason
    assert runs_for(prefect_api, {name}) == []


def test_unreachable_prefect_api_fails_within_the_deadline(config, localoci, object_storage, bucket):
    name = f"{uuid.uuid4().hex}.qcow2"
    etag = put(object_storage, localoci, bucket, name)
    unreachable = {**config, "PREFECT_API_URL": "http://127.0.0.1:9/api", "TIMEOUT_SECONDS": "3"}
    decision = invoke(unreachable, event(localoci.namespace, bucket, name, etag))
    assert decision.decision == "failed" and decision.code == "prefect-unavailable"
    assert "before the deadline" in decision.reason


def test_prefect_api_refuses_requests_without_credentials(prefect_api):
    assert httpx.post(prefect_api["url"] + "/flows/filter", json={}).status_code == 401
