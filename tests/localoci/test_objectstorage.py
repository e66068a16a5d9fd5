"""Object Storage of the local OCI, driven by the real ``oci`` SDK (and plain HTTP where OCI allows it)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import time
import uuid
from pathlib import Path

import httpx
import oci
import pytest
import requests
from oci.exceptions import ServiceError
from oci.object_storage import models

from localoci.process import RunningLocalOCI
from tests.waiting import wait_until_past

ObjectStorageClient = oci.object_storage.ObjectStorageClient
MiB = 1024 * 1024


def b64md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def put(os_client: ObjectStorageClient, ns: str, bucket: str, name: str, data: bytes, **kwargs: object) -> oci.response.Response:
    return os_client.put_object(ns, bucket, name, data, **kwargs)


def read(os_client: ObjectStorageClient, ns: str, bucket: str, name: str, **kwargs: object) -> oci.response.Response:
    return os_client.get_object(ns, bucket, name, **kwargs)


def signer_for(oci_config: dict) -> oci.signer.Signer:
    return oci.signer.Signer(oci_config["tenancy"], oci_config["user"], oci_config["fingerprint"], oci_config["key_file"])


def signed_get(oci_config: dict, url: str) -> requests.Response:
    return requests.get(url, auth=signer_for(oci_config), timeout=30)


def in_minutes(minutes: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=minutes)


def par_details(object_name: str, access: str = "ObjectRead", expires: dt.datetime | None = None) -> models.CreatePreauthenticatedRequestDetails:
    return models.CreatePreauthenticatedRequestDetails(
        name=f"par-{uuid.uuid4().hex[:8]}", object_name=object_name, access_type=access,
        time_expires=expires or in_minutes(10),
    )


# -- namespace and buckets -------------------------------------------------------


def test_get_namespace_returns_the_servers_namespace(object_storage: ObjectStorageClient, localoci: RunningLocalOCI) -> None:
    assert object_storage.get_namespace().data == localoci.namespace


def test_create_bucket_then_get_bucket_returns_it(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, compartment_id: str) -> None:
    name = f"b-{uuid.uuid4().hex[:10]}"
    created = object_storage.create_bucket(
        localoci.namespace, models.CreateBucketDetails(name=name, compartment_id=compartment_id, metadata={"k": "v"})
    )
    assert created.status == 200
    got = object_storage.get_bucket(localoci.namespace, name).data
    assert (got.name, got.namespace, got.compartment_id) == (name, localoci.namespace, compartment_id)
    assert got.id == created.data.id
    assert got.metadata == {"k": "v"}
    assert got.object_events_enabled is False
    assert name in [b.name for b in object_storage.list_buckets(localoci.namespace, compartment_id).data]


def test_create_existing_bucket_is_409_bucket_already_exists(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, compartment_id: str) -> None:
    with pytest.raises(ServiceError) as exc:
        object_storage.create_bucket(localoci.namespace, models.CreateBucketDetails(name=bucket, compartment_id=compartment_id))
    assert exc.value.status == 409
    assert exc.value.code == "BucketAlreadyExists"


def test_create_bucket_with_bad_name_is_400(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, compartment_id: str) -> None:
    with pytest.raises(ServiceError) as exc:
        object_storage.create_bucket(localoci.namespace, models.CreateBucketDetails(name="bad name/with slash", compartment_id=compartment_id))
    assert exc.value.status == 400


def test_get_missing_bucket_is_404(object_storage: ObjectStorageClient, localoci: RunningLocalOCI) -> None:
    with pytest.raises(ServiceError) as exc:
        object_storage.get_bucket(localoci.namespace, f"missing-{uuid.uuid4().hex[:8]}")
    assert exc.value.status == 404


def test_get_namespace_metadata_names_the_namespace(object_storage: ObjectStorageClient, localoci: RunningLocalOCI) -> None:
    meta = object_storage.get_namespace_metadata(localoci.namespace).data
    assert meta.namespace == localoci.namespace
    assert meta.default_s3_compartment_id == localoci.tenancy_id
    with pytest.raises(ServiceError) as exc:
        object_storage.get_namespace_metadata("not-my-namespace")
    assert exc.value.status == 404


def test_head_bucket_returns_its_etag_and_404_when_missing(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    head = object_storage.head_bucket(localoci.namespace, bucket)
    assert head.status == 200
    assert head.headers["etag"] == object_storage.get_bucket(localoci.namespace, bucket).data.etag
    with pytest.raises(ServiceError) as exc:
        object_storage.head_bucket(localoci.namespace, f"missing-{uuid.uuid4().hex[:8]}")
    assert exc.value.status == 404


def test_update_bucket_changes_settings_and_etag(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    before = object_storage.get_bucket(localoci.namespace, bucket).data
    assert before.object_events_enabled is True
    updated = object_storage.update_bucket(localoci.namespace, bucket, models.UpdateBucketDetails(
        object_events_enabled=False, metadata={"purpose": "test"}, freeform_tags={"team": "disk"})).data
    assert (updated.object_events_enabled, updated.metadata, updated.freeform_tags) == (False, {"purpose": "test"}, {"team": "disk"})
    assert updated.etag != before.etag
    again = object_storage.get_bucket(localoci.namespace, bucket).data
    assert (again.object_events_enabled, again.metadata, again.etag) == (False, {"purpose": "test"}, updated.etag)


def test_delete_non_empty_bucket_is_409_then_empty_bucket_deletes(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "left-behind", b"x")
    with pytest.raises(ServiceError) as exc:
        object_storage.delete_bucket(localoci.namespace, bucket)
    assert exc.value.status == 409
    assert exc.value.code == "BucketNotEmpty"
    object_storage.delete_object(localoci.namespace, bucket, "left-behind")
    assert object_storage.delete_bucket(localoci.namespace, bucket).status == 204
    with pytest.raises(ServiceError) as exc:
        object_storage.get_bucket(localoci.namespace, bucket)
    assert exc.value.status == 404


# -- objects ---------------------------------------------------------------------


def test_put_object_returns_etag_and_content_md5_matching_head_and_get(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    data = os.urandom(100_000)
    reply = put(object_storage, localoci.namespace, bucket, "blob", data, content_type="application/x-test")
    assert reply.headers["opc-content-md5"] == b64md5(data)
    etag = reply.headers["etag"]
    assert etag

    head = object_storage.head_object(localoci.namespace, bucket, "blob")
    assert head.status == 200
    assert head.headers["etag"] == etag
    assert head.headers["content-md5"] == b64md5(data)
    assert int(head.headers["content-length"]) == len(data)
    assert head.headers["content-type"] == "application/x-test"

    got = read(object_storage, localoci.namespace, bucket, "blob")
    assert got.status == 200
    assert got.data.content == data
    assert got.headers["etag"] == etag
    assert got.headers["content-md5"] == b64md5(data)


def test_get_object_if_none_match_current_etag_is_304(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    etag = put(object_storage, localoci.namespace, bucket, "cached", b"cached bytes").headers["etag"]
    with pytest.raises(ServiceError) as exc:  # the SDK treats 304 as an error status
        read(object_storage, localoci.namespace, bucket, "cached", if_none_match=etag)
    assert exc.value.status == 304
    assert exc.value.headers["etag"] == etag
    assert read(object_storage, localoci.namespace, bucket, "cached", if_none_match="other").data.content == b"cached bytes"


def test_put_object_replaces_content_and_changes_etag(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    first = put(object_storage, localoci.namespace, bucket, "o", b"one").headers["etag"]
    second = put(object_storage, localoci.namespace, bucket, "o", b"two!").headers["etag"]
    assert first != second
    assert read(object_storage, localoci.namespace, bucket, "o").data.content == b"two!"


def test_empty_object_round_trips(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "empty", b"")
    head = object_storage.head_object(localoci.namespace, bucket, "empty")
    assert head.headers["content-length"] == "0"
    assert head.headers["content-md5"] == b64md5(b"")
    assert read(object_storage, localoci.namespace, bucket, "empty").data.content == b""


def test_chunked_put_object_stores_the_whole_body(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, oci_config: dict) -> None:
    chunks = [os.urandom(n) for n in (1, 70_000, 1024 * 1024 + 3, 5)]
    url = f"{localoci.endpoint}/n/{localoci.namespace}/b/{bucket}/o/chunked%20upload"
    request = requests.Request("PUT", url, data=iter(chunks)).prepare()
    assert request.headers["Transfer-Encoding"] == "chunked"
    signer_for(oci_config).do_request_sign(request, enforce_content_headers=False)  # as the SDK signs PutObject
    with requests.Session() as session:
        reply = session.send(request, timeout=30)
    assert reply.status_code == 200, reply.text
    body = b"".join(chunks)
    assert reply.headers["opc-content-md5"] == b64md5(body)
    assert read(object_storage, localoci.namespace, bucket, "chunked upload").data.content == body


def test_opc_meta_metadata_round_trips_in_head_object_headers(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "meta", b"x", opc_meta={"owner": "alice", "disk-format": "qcow2"})
    head = object_storage.head_object(localoci.namespace, bucket, "meta")
    assert head.headers["opc-meta-owner"] == "alice"
    assert head.headers["opc-meta-disk-format"] == "qcow2"
    get_headers = read(object_storage, localoci.namespace, bucket, "meta").headers
    assert get_headers["opc-meta-owner"] == "alice"


@pytest.fixture
def digits(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> bytes:
    data = bytes(range(256)) * 4  # 1024 bytes
    put(object_storage, localoci.namespace, bucket, "digits", data)
    return data


def test_range_get_returns_206_with_content_range(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, digits: bytes) -> None:
    reply = read(object_storage, localoci.namespace, bucket, "digits", range="bytes=10-19")
    assert reply.status == 206
    assert reply.data.content == digits[10:20]
    assert reply.headers["content-range"] == f"bytes 10-19/{len(digits)}"
    assert reply.headers["content-length"] == "10"


def test_range_get_open_ended_returns_the_tail_from_offset(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, digits: bytes) -> None:
    reply = read(object_storage, localoci.namespace, bucket, "digits", range="bytes=1000-")
    assert reply.status == 206
    assert reply.data.content == digits[1000:]
    assert reply.headers["content-range"] == f"bytes 1000-1023/{len(digits)}"


def test_range_get_suffix_returns_the_last_bytes(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, digits: bytes) -> None:
    reply = read(object_storage, localoci.namespace, bucket, "digits", range="bytes=-7")
    assert reply.status == 206
    assert reply.data.content == digits[-7:]
    assert reply.headers["content-range"] == f"bytes 1017-1023/{len(digits)}"


def test_range_get_past_the_end_is_clamped(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, digits: bytes) -> None:
    reply = read(object_storage, localoci.namespace, bucket, "digits", range="bytes=1020-5000")
    assert reply.status == 206
    assert reply.data.content == digits[1020:]


def test_unsatisfiable_range_is_416(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, digits: bytes) -> None:
    with pytest.raises(ServiceError) as exc:
        read(object_storage, localoci.namespace, bucket, "digits", range=f"bytes={len(digits)}-")
    assert exc.value.status == 416


ODD_NAMES = [
    "dir/sub dir/file name.img",
    "a//double/slash",
    "semi;colon",
    "$(touch /tmp/pwned)",
    "`id`",
    "quo\"te's",
    "back\\slash\\",
    "percent%20and%2F%25",
    "plus+and&amp=?#hash",
    "ünïcødé/日本語/🙂",
    "trailing/",
    "..",
    "a/./b/../c",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_object_names_round_trip_exactly(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, name: str) -> None:
    data = name.encode() * 3
    put(object_storage, localoci.namespace, bucket, name, data)
    assert read(object_storage, localoci.namespace, bucket, name).data.content == data
    assert object_storage.head_object(localoci.namespace, bucket, name).headers["content-md5"] == b64md5(data)
    listed = object_storage.list_objects(localoci.namespace, bucket).data.objects
    assert [o.name for o in listed] == [name]
    object_storage.delete_object(localoci.namespace, bucket, name)
    assert object_storage.list_objects(localoci.namespace, bucket).data.objects == []


def test_head_missing_object_is_404(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    with pytest.raises(ServiceError) as exc:
        object_storage.head_object(localoci.namespace, bucket, "nope")
    assert exc.value.status == 404
    # The connection stays usable after a HEAD 404 (no stray body on the wire).
    put(object_storage, localoci.namespace, bucket, "after", b"fine")
    assert object_storage.head_object(localoci.namespace, bucket, "after").status == 200


def test_head_404_leaves_no_body_on_the_connection(localoci: RunningLocalOCI, bucket: str, oci_config: dict) -> None:
    import http.client
    from urllib.parse import urlsplit

    signer = signer_for(oci_config)
    url = f"{localoci.endpoint}/n/{localoci.namespace}/b/{bucket}/o/nope"
    parts = urlsplit(localoci.endpoint)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        # Two HEADs on one connection: stray body bytes after the first would garble the second reply.
        for _ in range(2):
            prepared = signer(requests.Request("HEAD", url).prepare())
            conn.request("HEAD", urlsplit(url).path, headers=dict(prepared.headers))
            reply = conn.getresponse()
            assert reply.status == 404
            assert reply.read() == b""
    finally:
        conn.close()


def test_get_missing_object_is_404_object_not_found(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    with pytest.raises(ServiceError) as exc:
        read(object_storage, localoci.namespace, bucket, "nope")
    assert exc.value.status == 404
    assert exc.value.code == "ObjectNotFound"


def test_delete_object_then_get_is_404(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "doomed", b"bye")
    assert object_storage.delete_object(localoci.namespace, bucket, "doomed").status == 204
    with pytest.raises(ServiceError) as exc:
        read(object_storage, localoci.namespace, bucket, "doomed")
    assert exc.value.status == 404
    with pytest.raises(ServiceError) as exc:
        object_storage.delete_object(localoci.namespace, bucket, "doomed")
    assert exc.value.status == 404


def test_put_with_wrong_content_md5_is_400_and_creates_nothing(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    with pytest.raises(ServiceError) as exc:
        put(object_storage, localoci.namespace, bucket, "bad-md5", b"payload", content_md5=b64md5(b"other"))
    assert exc.value.status == 400
    with pytest.raises(ServiceError) as exc:
        object_storage.head_object(localoci.namespace, bucket, "bad-md5")
    assert exc.value.status == 404


def test_put_with_wrong_content_md5_keeps_the_previous_object(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "keep", b"original")
    with pytest.raises(ServiceError) as exc:
        put(object_storage, localoci.namespace, bucket, "keep", b"replacement", content_md5=b64md5(b"nope"))
    assert exc.value.status == 400
    assert read(object_storage, localoci.namespace, bucket, "keep").data.content == b"original"


def test_put_with_right_content_md5_succeeds(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    reply = put(object_storage, localoci.namespace, bucket, "good-md5", b"payload", content_md5=b64md5(b"payload"))
    assert reply.status == 200
    assert read(object_storage, localoci.namespace, bucket, "good-md5").data.content == b"payload"


def test_put_if_none_match_star_on_existing_object_is_refused(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "exists", b"first")
    with pytest.raises(ServiceError) as exc:
        put(object_storage, localoci.namespace, bucket, "exists", b"second", if_none_match="*")
    assert exc.value.status in (409, 412)
    assert read(object_storage, localoci.namespace, bucket, "exists").data.content == b"first"
    # ... while creating a new object with If-None-Match: * works.
    put(object_storage, localoci.namespace, bucket, "fresh", b"new", if_none_match="*")
    assert read(object_storage, localoci.namespace, bucket, "fresh").data.content == b"new"


def test_put_if_match_stale_etag_is_412(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    stale = put(object_storage, localoci.namespace, bucket, "cas", b"v1").headers["etag"]
    current = put(object_storage, localoci.namespace, bucket, "cas", b"v2").headers["etag"]
    with pytest.raises(ServiceError) as exc:
        put(object_storage, localoci.namespace, bucket, "cas", b"v3", if_match=stale)
    assert exc.value.status == 412
    assert read(object_storage, localoci.namespace, bucket, "cas").data.content == b"v2"
    put(object_storage, localoci.namespace, bucket, "cas", b"v3", if_match=current)
    assert read(object_storage, localoci.namespace, bucket, "cas").data.content == b"v3"


def test_get_and_delete_if_match_stale_etag_is_412(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    stale = put(object_storage, localoci.namespace, bucket, "cas", b"v1").headers["etag"]
    put(object_storage, localoci.namespace, bucket, "cas", b"v2")
    with pytest.raises(ServiceError) as exc:
        read(object_storage, localoci.namespace, bucket, "cas", if_match=stale)
    assert exc.value.status == 412
    with pytest.raises(ServiceError) as exc:
        object_storage.delete_object(localoci.namespace, bucket, "cas", if_match=stale)
    assert exc.value.status == 412
    assert read(object_storage, localoci.namespace, bucket, "cas").data.content == b"v2"


# -- listing ---------------------------------------------------------------------


@pytest.fixture
def tree(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> dict[str, bytes]:
    names = ["a/1", "a/2", "a/b/3", "c/4", "d", "e", "f", "g"]
    content = {name: name.encode() * (i + 1) for i, name in enumerate(names)}
    for name, data in content.items():
        put(object_storage, localoci.namespace, bucket, name, data)
    return content


def test_list_objects_with_prefix_returns_only_matching_names(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, tree: dict[str, bytes]) -> None:
    listed = object_storage.list_objects(localoci.namespace, bucket, prefix="a/").data
    assert [o.name for o in listed.objects] == ["a/1", "a/2", "a/b/3"]
    assert listed.next_start_with is None


def test_list_objects_fields_returns_name_size_md5_etag(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, tree: dict[str, bytes]) -> None:
    listed = object_storage.list_objects(localoci.namespace, bucket, fields="name,size,md5,etag").data.objects
    assert sorted(o.name for o in listed) == sorted(tree)
    for o in listed:
        assert o.size == len(tree[o.name])
        assert o.md5 == b64md5(tree[o.name])
        assert o.etag == object_storage.head_object(localoci.namespace, bucket, o.name).headers["etag"]
    plain = object_storage.list_objects(localoci.namespace, bucket).data.objects
    assert all(o.size is None and o.md5 is None for o in plain)


def test_list_objects_limit_and_start_page_with_next_start_with(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, tree: dict[str, bytes]) -> None:
    seen: list[str] = []
    start = None
    pages = 0
    while True:
        page = object_storage.list_objects(localoci.namespace, bucket, limit=3, start=start).data
        assert len(page.objects) <= 3
        seen += [o.name for o in page.objects]
        pages += 1
        if page.next_start_with is None:
            break
        assert page.next_start_with not in seen
        start = page.next_start_with
    assert seen == sorted(tree)
    assert pages == 3


def test_list_objects_delimiter_returns_common_prefixes(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, tree: dict[str, bytes]) -> None:
    top = object_storage.list_objects(localoci.namespace, bucket, delimiter="/").data
    assert [o.name for o in top.objects] == ["d", "e", "f", "g"]
    assert top.prefixes == ["a/", "c/"]
    nested = object_storage.list_objects(localoci.namespace, bucket, prefix="a/", delimiter="/").data
    assert [o.name for o in nested.objects] == ["a/1", "a/2"]
    assert nested.prefixes == ["a/b/"]


def test_list_objects_end_is_exclusive(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, tree: dict[str, bytes]) -> None:
    listed = object_storage.list_objects(localoci.namespace, bucket, start="c/4", end="f").data.objects
    assert [o.name for o in listed] == ["c/4", "d", "e"]


def test_list_call_get_all_results_pages_through_every_object(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, tree: dict[str, bytes]) -> None:
    result = oci.pagination.list_call_get_all_results(
        object_storage.list_objects, localoci.namespace, bucket, limit=2, fields="name,size"
    )
    assert [o.name for o in result.data.objects] == sorted(tree)
    assert {o.name: o.size for o in result.data.objects} == {k: len(v) for k, v in tree.items()}


def test_list_objects_of_missing_bucket_is_404(object_storage: ObjectStorageClient, localoci: RunningLocalOCI) -> None:
    with pytest.raises(ServiceError) as exc:
        object_storage.list_objects(localoci.namespace, f"missing-{uuid.uuid4().hex[:8]}")
    assert exc.value.status == 404


# -- multipart uploads -----------------------------------------------------------


def test_upload_manager_parallel_multipart_upload_round_trips(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, tmp_path: Path) -> None:
    block = os.urandom(MiB)
    data = b"".join(bytes([i]) + block[1:] for i in range(25))  # 25 MiB, every MiB different
    source = tmp_path / "disk.img"
    source.write_bytes(data)
    manager = oci.object_storage.UploadManager(object_storage, allow_parallel_uploads=True, parallel_process_count=3)
    reply = manager.upload_file(localoci.namespace, bucket, "images/dïsk 1 日本.img", str(source), part_size=10 * MiB,
                                metadata={"opc-meta-format": "raw"})
    assert reply.status == 200

    head = object_storage.head_object(localoci.namespace, bucket, "images/dïsk 1 日本.img")
    assert int(head.headers["content-length"]) == len(data)
    part_md5s = [hashlib.md5(data[i:i + 10 * MiB]).digest() for i in range(0, len(data), 10 * MiB)]
    assert head.headers["opc-multipart-md5"] == base64.b64encode(hashlib.md5(b"".join(part_md5s)).digest()).decode() + "-3"
    assert head.headers["opc-meta-format"] == "raw"
    assert reply.headers["opc-multipart-md5"] == head.headers["opc-multipart-md5"]

    got = read(object_storage, localoci.namespace, bucket, "images/dïsk 1 日本.img")
    assert hashlib.md5(got.data.content).hexdigest() == hashlib.md5(data).hexdigest()
    assert object_storage.list_multipart_uploads(localoci.namespace, bucket).data == []


def test_commit_multipart_upload_with_a_part_excluded_joins_only_the_committed_parts(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object="joined")).data
    chunks = {1: b"A" * 1000, 2: b"B" * 500, 3: b"C" * 700}
    etags = {}
    for num, data in chunks.items():
        reply = object_storage.upload_part(ns, bucket, "joined", upload.upload_id, num, data, content_md5=b64md5(data))
        assert reply.headers["opc-content-md5"] == b64md5(data)
        etags[num] = reply.headers["etag"]

    parts = object_storage.list_multipart_upload_parts(ns, bucket, "joined", upload.upload_id).data
    assert [(p.part_number, p.size, p.md5, p.etag) for p in parts] == [(n, len(d), b64md5(d), etags[n]) for n, d in chunks.items()]
    listed = object_storage.list_multipart_uploads(ns, bucket).data
    assert [(u.object, u.upload_id) for u in listed] == [("joined", upload.upload_id)]

    object_storage.commit_multipart_upload(ns, bucket, "joined", upload.upload_id, models.CommitMultipartUploadDetails(
        parts_to_commit=[models.CommitMultipartUploadPartDetails(part_num=n, etag=etags[n]) for n in (1, 3)],
        parts_to_exclude=[2],
    ))
    assert read(object_storage, ns, bucket, "joined").data.content == chunks[1] + chunks[3]
    head = object_storage.head_object(ns, bucket, "joined")
    expected = base64.b64encode(hashlib.md5(hashlib.md5(chunks[1]).digest() + hashlib.md5(chunks[3]).digest()).digest()).decode()
    assert head.headers["opc-multipart-md5"] == f"{expected}-2"
    assert object_storage.list_multipart_uploads(ns, bucket).data == []
    # ranges across the parts' boundary, kept as they arrived (a commit copies no bytes)
    joined = chunks[1] + chunks[3]
    for first, last in ((990, 1009), (0, 1699), (1000, 1000), (999, 999), (1500, 1699)):
        got = object_storage.get_object(ns, bucket, "joined", range=f"bytes={first}-{last}").data.content
        assert got == joined[first:last + 1], (first, last)


def test_a_committed_upload_keeps_its_parts_as_the_objects_files(object_storage: ObjectStorageClient,
                                                                   localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    objects = localoci.data_dir / "objects"
    before = set(objects.iterdir())
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object="big")).data
    parts = [os.urandom(3000), os.urandom(2000)]
    etags = [object_storage.upload_part(ns, bucket, "big", upload.upload_id, n, data).headers["etag"]
             for n, data in enumerate(parts, 1)]
    object_storage.commit_multipart_upload(ns, bucket, "big", upload.upload_id, models.CommitMultipartUploadDetails(
        parts_to_commit=[models.CommitMultipartUploadPartDetails(part_num=n, etag=e) for n, e in enumerate(etags, 1)]))
    made = set(objects.iterdir()) - before
    assert sorted(path.stat().st_size for path in made) == [2000, 3000]  # the parts, no joined copy
    assert read(object_storage, ns, bucket, "big").data.content == b"".join(parts)
    object_storage.put_object(ns, bucket, "big", b"replaced")
    assert not any(path.exists() for path in made)  # the replaced object's parts are gone


def test_commit_multipart_upload_with_wrong_part_etag_is_400(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object="bad")).data
    object_storage.upload_part(ns, bucket, "bad", upload.upload_id, 1, b"data")
    with pytest.raises(ServiceError) as exc:
        object_storage.commit_multipart_upload(ns, bucket, "bad", upload.upload_id, models.CommitMultipartUploadDetails(
            parts_to_commit=[models.CommitMultipartUploadPartDetails(part_num=1, etag="not-the-etag")],
        ))
    assert exc.value.status == 400
    with pytest.raises(ServiceError) as exc:
        object_storage.head_object(ns, bucket, "bad")
    assert exc.value.status == 404


def test_upload_part_with_wrong_content_md5_is_400(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object="p")).data
    with pytest.raises(ServiceError) as exc:
        object_storage.upload_part(ns, bucket, "p", upload.upload_id, 1, b"data", content_md5=b64md5(b"other"))
    assert exc.value.status == 400
    assert object_storage.list_multipart_upload_parts(ns, bucket, "p", upload.upload_id).data == []


def test_abort_multipart_upload_removes_the_upload(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object="aborted")).data
    object_storage.upload_part(ns, bucket, "aborted", upload.upload_id, 1, b"x" * 100)
    assert [u.upload_id for u in object_storage.list_multipart_uploads(ns, bucket).data] == [upload.upload_id]

    assert object_storage.abort_multipart_upload(ns, bucket, "aborted", upload.upload_id).status == 204
    assert object_storage.list_multipart_uploads(ns, bucket).data == []
    with pytest.raises(ServiceError) as exc:
        object_storage.list_multipart_upload_parts(ns, bucket, "aborted", upload.upload_id)
    assert exc.value.status == 404
    with pytest.raises(ServiceError) as exc:
        object_storage.upload_part(ns, bucket, "aborted", upload.upload_id, 2, b"late")
    assert exc.value.status == 404
    with pytest.raises(ServiceError) as exc:
        object_storage.head_object(ns, bucket, "aborted")
    assert exc.value.status == 404


def test_commit_multipart_upload_if_none_match_star_on_existing_object_is_refused(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    put(object_storage, ns, bucket, "taken", b"first")
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object="taken")).data
    etag = object_storage.upload_part(ns, bucket, "taken", upload.upload_id, 1, b"second").headers["etag"]
    details = models.CommitMultipartUploadDetails(parts_to_commit=[models.CommitMultipartUploadPartDetails(part_num=1, etag=etag)])
    with pytest.raises(ServiceError) as exc:
        object_storage.commit_multipart_upload(ns, bucket, "taken", upload.upload_id, details, if_none_match="*")
    assert exc.value.status in (409, 412)
    assert read(object_storage, ns, bucket, "taken").data.content == b"first"


def test_commit_multipart_upload_if_match_stale_etag_is_412(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    stale = put(object_storage, ns, bucket, "cas", b"v1").headers["etag"]
    current = put(object_storage, ns, bucket, "cas", b"v2").headers["etag"]
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object="cas")).data
    etag = object_storage.upload_part(ns, bucket, "cas", upload.upload_id, 1, b"v3").headers["etag"]
    details = models.CommitMultipartUploadDetails(parts_to_commit=[models.CommitMultipartUploadPartDetails(part_num=1, etag=etag)])
    with pytest.raises(ServiceError) as exc:
        object_storage.commit_multipart_upload(ns, bucket, "cas", upload.upload_id, details, if_match=stale)
    assert exc.value.status == 412
    assert read(object_storage, ns, bucket, "cas").data.content == b"v2"
    # The upload survives a failed precondition and commits with the current ETag.
    object_storage.commit_multipart_upload(ns, bucket, "cas", upload.upload_id, details, if_match=current)
    assert read(object_storage, ns, bucket, "cas").data.content == b"v3"


def test_create_multipart_upload_with_non_ascii_object_name_succeeds(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns, name = localoci.namespace, "ünï/日本語 disk.img"
    reply = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(object=name))
    assert reply.data.object == name
    assert reply.headers["location"].isascii()
    etag = object_storage.upload_part(ns, bucket, name, reply.data.upload_id, 1, b"bytes").headers["etag"]
    object_storage.commit_multipart_upload(ns, bucket, name, reply.data.upload_id, models.CommitMultipartUploadDetails(
        parts_to_commit=[models.CommitMultipartUploadPartDetails(part_num=1, etag=etag)]))
    assert read(object_storage, ns, bucket, name).data.content == b"bytes"


@pytest.mark.parametrize("name", ["line\nfeed", "carriage\rreturn", "nul\x00byte"])
def test_object_name_with_cr_lf_or_nul_is_400(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, name: str) -> None:
    with pytest.raises(ServiceError) as exc:
        put(object_storage, localoci.namespace, bucket, name, b"x")
    assert exc.value.status == 400
    with pytest.raises(ServiceError) as exc:
        object_storage.create_multipart_upload(localoci.namespace, bucket, models.CreateMultipartUploadDetails(object=name))
    assert exc.value.status == 400
    assert object_storage.list_objects(localoci.namespace, bucket).data.objects == []


@pytest.mark.parametrize(
    ("metadata", "content_type"),
    [
        ({"opc-meta-owner": "日本"}, None),  # not expressible in an HTTP header
        ({"opc-meta-owner": "x\r\nX-Injected: yes"}, None),  # header injection
        ({"content-length": "1"}, None),  # not user metadata: would override the real header
        ({}, "text/plain\r\nX-Injected: yes"),
    ],
    ids=["non-latin1-value", "crlf-value", "non-opc-meta-key", "crlf-content-type"],
)
def test_create_multipart_upload_with_metadata_unfit_for_headers_is_400(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, metadata: dict, content_type: str | None) -> None:
    with pytest.raises(ServiceError) as exc:
        object_storage.create_multipart_upload(localoci.namespace, bucket, models.CreateMultipartUploadDetails(
            object="m", metadata=metadata, content_type=content_type))
    assert exc.value.status == 400
    assert object_storage.list_multipart_uploads(localoci.namespace, bucket).data == []


def test_multipart_upload_metadata_and_content_type_round_trip(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    ns = localoci.namespace
    upload = object_storage.create_multipart_upload(ns, bucket, models.CreateMultipartUploadDetails(
        object="m", metadata={"opc-meta-Owner": "bob"}, content_type="application/x-qemu-disk")).data
    etag = object_storage.upload_part(ns, bucket, "m", upload.upload_id, 1, b"12345").headers["etag"]
    object_storage.commit_multipart_upload(ns, bucket, "m", upload.upload_id, models.CommitMultipartUploadDetails(
        parts_to_commit=[models.CommitMultipartUploadPartDetails(part_num=1, etag=etag)]))
    head = object_storage.head_object(ns, bucket, "m")
    assert head.headers["opc-meta-owner"] == "bob"
    assert head.headers["content-type"] == "application/x-qemu-disk"
    assert head.headers["content-length"] == "5"


# -- pre-authenticated requests ----------------------------------------------------


def test_object_read_par_serves_the_object_without_a_signature(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    data = os.urandom(5000)
    put(object_storage, localoci.namespace, bucket, "dir/shared file", data)
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("dir/shared file")).data
    assert par.access_uri.startswith("/p/")
    reply = httpx.get(localoci.endpoint + par.access_uri)
    assert reply.status_code == 200
    assert reply.content == data
    assert reply.headers["content-md5"] == b64md5(data)


def test_object_read_par_honours_range(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    data = os.urandom(5000)
    put(object_storage, localoci.namespace, bucket, "ranged", data)
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("ranged")).data
    reply = httpx.get(localoci.endpoint + par.access_uri, headers={"Range": "bytes=100-199"})
    assert reply.status_code == 206
    assert reply.content == data[100:200]
    assert reply.headers["content-range"] == "bytes 100-199/5000"


def test_object_read_par_honours_if_match(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    data = os.urandom(5000)
    etag = put(object_storage, localoci.namespace, bucket, "matched", data).headers["ETag"]
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("matched")).data
    url = localoci.endpoint + par.access_uri

    reply = httpx.get(url, headers={"If-Match": etag, "Range": "bytes=10-19"})
    assert (reply.status_code, reply.content) == (206, data[10:20])
    reply = httpx.get(url, headers={"If-Match": etag})
    assert (reply.status_code, reply.content) == (200, data)
    reply = httpx.get(url, headers={"If-Match": '"some-other-etag"', "Range": "bytes=10-19"})
    assert reply.status_code == 412
    assert reply.json()["code"] == "PreconditionFailed"

    # Once the object is replaced, a transfer pinned to the old ETag cannot go on with the new bytes.
    put(object_storage, localoci.namespace, bucket, "matched", b"replaced")
    assert httpx.get(url, headers={"If-Match": etag, "Range": "bytes=0-3"}).status_code == 412
    assert httpx.get(url).content == b"replaced"


def test_object_read_par_answers_head_with_size_and_md5(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    data = os.urandom(3000)
    put(object_storage, localoci.namespace, bucket, "headed", data)
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("headed")).data
    reply = httpx.head(localoci.endpoint + par.access_uri)
    assert reply.status_code == 200
    assert reply.headers["content-length"] == "3000"
    assert reply.headers["content-md5"] == b64md5(data)
    assert reply.content == b""


def test_put_through_read_only_par_is_refused(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "ro", b"original")
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("ro")).data
    reply = httpx.put(localoci.endpoint + par.access_uri, content=b"overwritten")
    assert reply.status_code in (403, 404)
    assert read(object_storage, localoci.namespace, bucket, "ro").data.content == b"original"


def test_object_write_par_accepts_a_put_but_not_a_get(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("upload/here", "ObjectWrite")).data
    reply = httpx.put(localoci.endpoint + par.access_uri, content=b"dropped off")
    assert reply.status_code == 200
    assert read(object_storage, localoci.namespace, bucket, "upload/here").data.content == b"dropped off"
    assert httpx.get(localoci.endpoint + par.access_uri).status_code in (403, 404)


def test_object_read_par_for_one_object_does_not_read_another(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "A", b"object A")
    put(object_storage, localoci.namespace, bucket, "B", b"secret B")
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("A")).data
    assert httpx.get(localoci.endpoint + par.access_uri).content == b"object A"
    other = par.access_uri.rsplit("/o/", 1)[0] + "/o/B"
    reply = httpx.get(localoci.endpoint + other)
    assert reply.status_code == 404
    assert b"secret B" not in reply.content


def test_par_token_is_bound_to_its_bucket(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, compartment_id: str) -> None:
    other_bucket = f"other-{uuid.uuid4().hex[:8]}"
    object_storage.create_bucket(localoci.namespace, models.CreateBucketDetails(name=other_bucket, compartment_id=compartment_id))
    put(object_storage, localoci.namespace, bucket, "A", b"mine")
    put(object_storage, localoci.namespace, other_bucket, "A", b"theirs")
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("A")).data
    moved = par.access_uri.replace(f"/b/{bucket}/", f"/b/{other_bucket}/")
    assert httpx.get(localoci.endpoint + moved).status_code == 404


def test_create_par_with_expiry_in_the_past_is_400(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "x", b"x")
    with pytest.raises(ServiceError) as exc:
        object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("x", expires=in_minutes(-1)))
    assert exc.value.status == 400
    assert object_storage.list_preauthenticated_requests(localoci.namespace, bucket).data == []


def test_expired_par_is_refused_on_read(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "short", b"short-lived")
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("short", expires=expires)).data
    assert httpx.get(localoci.endpoint + par.access_uri).content == b"short-lived"
    wait_until_past(expires)
    reply = httpx.get(localoci.endpoint + par.access_uri)
    assert reply.status_code == 404
    assert b"short-lived" not in reply.content


def test_deleted_par_no_longer_reads(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "gone", b"data")
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("gone")).data
    assert httpx.get(localoci.endpoint + par.access_uri).status_code == 200
    assert object_storage.delete_preauthenticated_request(localoci.namespace, bucket, par.id).status == 204
    assert httpx.get(localoci.endpoint + par.access_uri).status_code == 404
    with pytest.raises(ServiceError) as exc:
        object_storage.get_preauthenticated_request(localoci.namespace, bucket, par.id)
    assert exc.value.status == 404


def test_get_and_list_par_do_not_reveal_access_uri(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, oci_config: dict) -> None:
    put(object_storage, localoci.namespace, bucket, "p", b"p")
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details("p")).data
    token = par.access_uri.split("/")[2]
    assert len(token) >= 32

    got = object_storage.get_preauthenticated_request(localoci.namespace, bucket, par.id).data
    assert (got.id, got.object_name, got.access_type) == (par.id, "p", "ObjectRead")
    assert abs(got.time_expires - par.time_expires) < dt.timedelta(seconds=1)
    assert [p.id for p in object_storage.list_preauthenticated_requests(localoci.namespace, bucket).data] == [par.id]

    # The SDK drops unknown fields, so look at the raw replies.
    base = f"{localoci.endpoint}/n/{localoci.namespace}/b/{bucket}/p"
    for url in (f"{base}/{par.id}", base):
        raw = signed_get(oci_config, url)
        assert raw.status_code == 200
        assert "accessUri" not in raw.text
        assert token not in raw.text


def test_par_for_odd_object_name_reads_it(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    name = "dir/ünï cødé; $(x) `y` 'q' %2F"
    put(object_storage, localoci.namespace, bucket, name, b"odd")
    par = object_storage.create_preauthenticated_request(localoci.namespace, bucket, par_details(name)).data
    assert httpx.get(localoci.endpoint + par.access_uri).content == b"odd"


# -- authentication --------------------------------------------------------------


def test_unsigned_request_is_401_not_authenticated(localoci: RunningLocalOCI) -> None:
    reply = httpx.get(f"{localoci.endpoint}/n/")
    assert reply.status_code == 401
    assert reply.json()["code"] == "NotAuthenticated"


def test_unsigned_object_get_is_401(object_storage: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> None:
    put(object_storage, localoci.namespace, bucket, "private", b"private")
    reply = httpx.get(f"{localoci.endpoint}/n/{localoci.namespace}/b/{bucket}/o/private")
    assert reply.status_code == 401
    assert b"private" not in reply.content
