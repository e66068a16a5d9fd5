"""Events: object changes made through the real SDK reach a real HTTP endpoint as CloudEvents."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import oci
import pytest

from localoci.process import RunningLocalOCI
from tests.waiting import wait_for

CREATE = "com.oraclecloud.objectstorage.createobject"
UPDATE = "com.oraclecloud.objectstorage.updateobject"
DELETE = "com.oraclecloud.objectstorage.deleteobject"
ALL_OBJECT_EVENTS = [CREATE, UPDATE, DELETE]


class Receiver:
    """A tiny HTTP endpoint on loopback that records every POSTed JSON body."""

    def __init__(self) -> None:
        self.accepted: list[dict[str, Any]] = []  # bodies answered with 200
        self.attempts: list[dict[str, Any]] = []  # every POSTed body, refused or not
        self.headers: list[dict[str, str]] = []
        self.fail_first = 0
        self._cv = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw)
                with receiver._cv:
                    receiver.attempts.append(body)
                    refuse = len(receiver.attempts) <= receiver.fail_first
                    if not refuse:
                        receiver.accepted.append(body)
                        receiver.headers.append(dict(self.headers))
                    receiver._cv.notify_all()
                self.send_response(500 if refuse else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until ``predicate(accepted bodies)`` holds; return those bodies."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not predicate(self.accepted):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"events did not arrive within {timeout}s; got {self.accepted!r}")
                self._cv.wait(left)
            return list(self.accepted)

    def wait_count(self, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        return self.wait_for(lambda bodies: len(bodies) >= n, timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    """Make receivers; ``receiver(fail_first=N)`` answers 500 to its first N requests."""
    made: list[Receiver] = []

    def make(fail_first: int = 0) -> Receiver:
        r = Receiver()
        r.fail_first = fail_first
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def rule(localoci: RunningLocalOCI) -> Iterator[Callable[..., dict[str, Any]]]:
    """Create event rules through the admin API; every rule is removed at the end of the test."""
    created: list[str] = []

    def make(endpoint: str, condition: dict[str, Any], event_version: str = "1.0") -> dict[str, Any]:
        created_rule = localoci.admin("POST", "events/rules",
                                      {"endpoint": endpoint, "condition": condition, "eventVersion": event_version})
        created.append(created_rule["id"])
        return created_rule

    yield make
    for rule_id in created:
        try:
            localoci.admin("DELETE", f"events/rules/{rule_id}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
    remaining = {r["id"] for r in localoci.admin("GET", "events/rules")}
    assert not remaining & set(created)


def all_delivered(localoci: RunningLocalOCI) -> None:
    """The barrier before asserting that an event did not arrive: the local OCI queues an event's
    deliveries before its PUT or DELETE answers, and keeps each in its outbox until it is made, so
    an empty outbox means every event of the calls so far has reached (or not) its receivers."""
    wait_for(lambda: not localoci.admin("GET", "events")["pending"], what="every queued event delivered")


def bucket_condition(*bucket_names: str, event_types: list[str] = ALL_OBJECT_EVENTS) -> dict[str, Any]:
    return {"eventType": event_types, "data": {"additionalDetails": {"bucketName": list(bucket_names)}}}


def put(object_storage: oci.object_storage.ObjectStorageClient, namespace: str, bucket: str, name: str, body: bytes) -> str:
    """PUT an object; return its ETag."""
    return object_storage.put_object(namespace, bucket, name, body).headers["etag"]


def test_put_object_delivers_exactly_one_create_event(localoci, object_storage, bucket, receiver, rule):
    r = receiver()
    rule(r.url, bucket_condition(bucket))
    name = f"dir/obj-{uuid.uuid4().hex[:8]}.txt"

    etag = put(object_storage, localoci.namespace, bucket, name, b"hello events")

    r.wait_count(1)
    all_delivered(localoci)
    assert len(r.accepted) == 1, r.accepted
    assert len(r.attempts) == 1
    event = r.accepted[0]
    assert event["eventType"] == CREATE
    assert event["cloudEventsVersion"] == "0.1"
    assert event["source"] == "ObjectStorage"
    assert event["eventID"] and event["eventTime"]
    data = event["data"]
    assert data["resourceName"] == name
    assert data["compartmentId"]
    details = data["additionalDetails"]
    head = object_storage.head_object(localoci.namespace, bucket, name)
    bucket_id = object_storage.get_bucket(localoci.namespace, bucket).data.id
    assert details["namespace"] == localoci.namespace
    assert details["bucketName"] == bucket
    assert details["bucketId"] == bucket_id
    assert details["eTag"] == etag == head.headers["etag"]
    assert r.headers[0]["Content-Type"] == "application/json"


def test_overwrite_and_delete_give_update_and_delete_events(localoci, object_storage, bucket, receiver, rule):
    r = receiver()
    rule(r.url, bucket_condition(bucket))
    ns, name = localoci.namespace, "churn.bin"

    first = put(object_storage, ns, bucket, name, b"one")
    r.wait_count(1)
    second = put(object_storage, ns, bucket, name, b"two")
    r.wait_count(2)
    object_storage.delete_object(ns, bucket, name)
    events = r.wait_count(3)
    all_delivered(localoci)

    assert len(r.accepted) == 3, r.accepted
    assert [e["eventType"] for e in events] == [CREATE, UPDATE, DELETE]
    assert [e["data"]["resourceName"] for e in events] == [name] * 3
    assert first != second
    assert events[0]["data"]["additionalDetails"]["eTag"] == first
    assert events[1]["data"]["additionalDetails"]["eTag"] == second
    assert events[2]["data"]["additionalDetails"]["eTag"] == second
    assert len({e["eventID"] for e in events}) == 3


def test_event_version_2_is_cloudevents_1_0(localoci, object_storage, bucket, receiver, rule):
    r = receiver()
    rule(r.url, bucket_condition(bucket), event_version="2.0")
    etag = put(object_storage, localoci.namespace, bucket, "v2.txt", b"cloudevents")

    r.wait_count(1)
    all_delivered(localoci)
    assert len(r.accepted) == 1
    event = r.accepted[0]
    assert event["specversion"] == "1.0"
    assert event["type"] == CREATE
    assert event["id"]
    assert event["source"]
    assert "eventType" not in event and "cloudEventsVersion" not in event
    assert event["data"]["resourceName"] == "v2.txt"
    assert event["data"]["additionalDetails"]["eTag"] == etag
    assert event["data"]["additionalDetails"]["bucketName"] == bucket
    assert r.headers[0]["Content-Type"] == "application/cloudevents+json"


def test_one_event_reaches_every_matching_rule_in_its_version(localoci, object_storage, bucket, receiver, rule):
    r1, r2 = receiver(), receiver()
    rule(r1.url, bucket_condition(bucket), event_version="1.0")
    rule(r2.url, bucket_condition(bucket), event_version="2.0")
    put(object_storage, localoci.namespace, bucket, "both.txt", b"x")

    v1 = r1.wait_count(1)[0]
    v2 = r2.wait_count(1)[0]
    assert v1["eventID"] == v2["id"]
    assert v1["eventType"] == v2["type"] == CREATE


def test_condition_on_another_bucket_receives_nothing(localoci, object_storage, bucket, receiver, rule):
    mine, other = receiver(), receiver()
    rule(mine.url, bucket_condition(bucket))
    rule(other.url, bucket_condition("other"))
    # Only create events: the update below must not reach ``created_only``.
    created_only = receiver()
    rule(created_only.url, bucket_condition(bucket, event_types=[CREATE]))

    put(object_storage, localoci.namespace, bucket, "filtered.txt", b"1")
    put(object_storage, localoci.namespace, bucket, "filtered.txt", b"2")

    mine.wait_count(2)
    created_only.wait_count(1)
    all_delivered(localoci)
    assert other.attempts == []
    assert [e["eventType"] for e in created_only.accepted] == [CREATE]


def test_wildcard_and_string_conditions(localoci, object_storage, bucket, receiver, rule):
    r = receiver()
    rule(r.url, {"eventType": "com.oraclecloud.objectstorage.*",
                 "data": {"resourceName": "logs/*", "additionalDetails": {"bucketName": bucket}}})
    put(object_storage, localoci.namespace, bucket, "data/skip.txt", b"skip")
    put(object_storage, localoci.namespace, bucket, "logs/keep.txt", b"keep")

    r.wait_count(1)
    all_delivered(localoci)
    assert [e["data"]["resourceName"] for e in r.accepted] == ["logs/keep.txt"]


def test_only_star_is_a_wildcard(localoci, object_storage, bucket, receiver, rule):
    r = receiver()
    rule(r.url, {"eventType": CREATE, "data": {"resourceName": ["report[1].csv", "file?.txt"],
                                               "additionalDetails": {"bucketName": bucket}}})
    for name in ("report1.csv", "file1.txt", "report[1].csv", "file?.txt"):
        put(object_storage, localoci.namespace, bucket, name, b"x")

    r.wait_count(2)
    all_delivered(localoci)
    assert sorted(e["data"]["resourceName"] for e in r.accepted) == ["file?.txt", "report[1].csv"]


def test_bucket_without_object_events_emits_nothing(localoci, object_storage, compartment_id, bucket, receiver, rule):
    quiet = f"quiet-{uuid.uuid4().hex[:12]}"
    object_storage.create_bucket(
        localoci.namespace, oci.object_storage.models.CreateBucketDetails(name=quiet, compartment_id=compartment_id))
    assert not object_storage.get_bucket(localoci.namespace, quiet).data.object_events_enabled
    r = receiver()
    rule(r.url, bucket_condition(quiet, bucket))

    put(object_storage, localoci.namespace, quiet, "silent.txt", b"nothing")
    object_storage.delete_object(localoci.namespace, quiet, "silent.txt")
    put(object_storage, localoci.namespace, bucket, "loud.txt", b"something")

    r.wait_count(1)
    all_delivered(localoci)
    assert [(e["data"]["additionalDetails"]["bucketName"], e["data"]["resourceName"]) for e in r.accepted] == [
        (bucket, "loud.txt")
    ]
    object_storage.delete_bucket(localoci.namespace, quiet)


def test_failed_delivery_is_retried_and_outbox_drains(localoci, object_storage, bucket, receiver, rule):
    r = receiver(fail_first=2)
    created = rule(r.url, bucket_condition(bucket))
    etag = put(object_storage, localoci.namespace, bucket, "retry.txt", b"again")

    events = r.wait_count(1, timeout=20)
    assert len(r.attempts) >= 3
    assert all(a == r.attempts[0] for a in r.attempts), "every retry carries the same event"
    assert events[0]["eventType"] == CREATE
    assert events[0]["data"]["additionalDetails"]["eTag"] == etag

    status = wait_for(lambda: (s := localoci.admin("GET", "events")) and not [
        d for d in s["pending"] if d["ruleId"] == created["id"]] and s, what="the outbox drained")
    assert not [d for d in status["deadLetters"] if d["ruleId"] == created["id"]]
    assert status["delivered"] >= 1


def test_failing_delivery_stays_pending_with_its_error(localoci, object_storage, bucket, receiver, rule):
    r = receiver(fail_first=1000)
    created = rule(r.url, bucket_condition(bucket))
    put(object_storage, localoci.namespace, bucket, "stuck.txt", b"stuck")

    pending = wait_for(lambda: (p := [d for d in localoci.admin("GET", "events")["pending"] if d["ruleId"] == created["id"]])
                       and p[0]["attempts"] >= 2 and p, what="the delivery retried")
    assert pending[0]["lastError"] == "HTTP 500"
    assert pending[0]["event"]["data"]["resourceName"] == "stuck.txt"
    assert r.accepted == []

    # Removing the rule drops its pending deliveries.
    localoci.admin("DELETE", f"events/rules/{created['id']}")
    assert not [d for d in localoci.admin("GET", "events")["pending"] if d["ruleId"] == created["id"]]


def test_rule_admin_validation_and_removal(localoci, object_storage, bucket, receiver, rule):
    for bad in (
        {"endpoint": "ftp://127.0.0.1/x", "condition": {}},
        {"endpoint": "http://127.0.0.1:1/x", "eventVersion": "3.0"},
        {"endpoint": "http://127.0.0.1:1/x", "condition": "not json"},
        {"endpoint": "http://127.0.0.1:1/x", "condition": [1, 2]},
        ["http://127.0.0.1:1/x"],
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            localoci.admin("POST", "events/rules", bad)
        assert err.value.code == 400, bad
    with pytest.raises(urllib.error.HTTPError) as err:
        localoci.admin("DELETE", "events/rules/ocid1.eventrule.oc1..nosuchrule")
    assert err.value.code == 404

    r = receiver()
    created = rule(r.url, json.dumps(bucket_condition(bucket)))  # a condition may come as a JSON string
    assert created["condition"] == bucket_condition(bucket)
    assert created["id"] in {x["id"] for x in localoci.admin("GET", "events/rules")}
    localoci.admin("DELETE", f"events/rules/{created['id']}")
    assert created["id"] not in {x["id"] for x in localoci.admin("GET", "events/rules")}
    control = receiver()
    rule(control.url, bucket_condition(bucket))
    put(object_storage, localoci.namespace, bucket, "after-delete.txt", b"x")
    control.wait_count(1)
    all_delivered(localoci)
    assert r.attempts == []


def test_multipart_commit_delivers_one_create_event(localoci, object_storage, bucket, receiver, rule):
    r = receiver()
    rule(r.url, bucket_condition(bucket))
    ns, name, models = localoci.namespace, "multi/part.bin", oci.object_storage.models
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object=name)).data
    parts = []
    for num, chunk in ((1, b"a" * 1024), (2, b"b" * 10)):
        etag = object_storage.upload_part(ns, bucket, name, upload.upload_id, num, chunk).headers["etag"]
        parts.append(models.CommitMultipartUploadPartDetails(part_num=num, etag=etag))
    all_delivered(localoci)
    assert r.attempts == [], "parts are not objects: no event before the commit"
    commit = object_storage.commit_multipart_upload(
        ns, bucket, name, upload.upload_id, models.CommitMultipartUploadDetails(parts_to_commit=parts))

    r.wait_count(1)
    all_delivered(localoci)
    assert len(r.accepted) == 1
    event = r.accepted[0]
    assert event["eventType"] == CREATE
    assert event["data"]["resourceName"] == name
    assert event["data"]["additionalDetails"]["eTag"] == commit.headers["etag"]


def test_pending_event_survives_a_restart(tmp_path, receiver):
    """The outbox is durable: an event not yet delivered when the server stops is delivered by the next one."""
    from localoci import process

    data_dir = tmp_path / "restart"
    r = receiver(fail_first=10**6)
    server = process.start(data_dir)
    try:
        config = oci.config.from_file(server.oci_config_file, server.oci_profile)
        client = oci.object_storage.ObjectStorageClient(config, service_endpoint=server.endpoint)
        client.create_bucket(server.namespace, oci.object_storage.models.CreateBucketDetails(
            name="durable", compartment_id=server.tenancy_id, object_events_enabled=True))
        created = server.admin("POST", "events/rules", {"endpoint": r.url, "condition": bucket_condition("durable")})
        etag = client.put_object(server.namespace, "durable", "kept.txt", b"kept").headers["etag"]
        wait_for(lambda: r.attempts, what="a delivery attempt")
    finally:
        server.stop()
    refused = r.attempts[0]
    with r._cv:
        r.fail_first = 0

    server = process.start(data_dir)
    try:
        event = r.wait_count(1, timeout=20)[0]
        assert event["eventID"] == refused["eventID"]
        assert event["data"]["resourceName"] == "kept.txt"
        assert event["data"]["additionalDetails"]["eTag"] == etag
        wait_for(lambda: not [d for d in server.admin("GET", "events")["pending"] if d["ruleId"] == created["id"]],
                 what="the outbox drained after the restart")
    finally:
        server.stop()
