"""Multipart uploads through a pre-authenticated request, with plain HTTP against PARs the SDK made.

OCI's protocol ("Using multipart uploads with pre-authenticated requests"): a PUT of the PAR's
object URL with ``opc-multipart: true`` creates the upload and answers with its ``accessUri``;
PUT ``<accessUri><N>`` uploads part N, POST ``<accessUri>`` commits every uploaded part in
part-number order, DELETE ``<accessUri>`` aborts.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import oci
import pytest
from oci.object_storage import models

from localoci.process import RunningLocalOCI
from tests.localoci.test_objectstorage import b64md5, in_minutes, par_details
from tests.waiting import wait_until_past

ObjectStorageClient = oci.object_storage.ObjectStorageClient
NAME = "exports/disk 1.qcow2"


class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def call(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return Reply(reply.status, reply.headers, reply.read())
    except urllib.error.HTTPError as error:
        return Reply(error.code, error.headers, error.read())


def make_par(client: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str, access: str = "ObjectWrite",
             name: str = NAME, expires: dt.datetime | None = None) -> Any:
    return client.create_preauthenticated_request(localoci.namespace, bucket, par_details(name, access, expires)).data


def par_url(localoci: RunningLocalOCI, par: Any, name: str = NAME) -> str:
    url = localoci.endpoint + par.access_uri
    return url + urllib.request.quote(name, safe="") if par.access_type.startswith("Any") else url


def create(localoci: RunningLocalOCI, par: Any, headers: dict[str, str] | None = None, name: str = NAME) -> Reply:
    return call("PUT", par_url(localoci, par, name), headers={"opc-multipart": "true", **(headers or {})})


def part_files(localoci: RunningLocalOCI) -> set[str]:
    return {p.name for p in (Path(localoci.data_dir) / "objects").iterdir()}


def open_uploads(client: ObjectStorageClient, localoci: RunningLocalOCI, bucket: str) -> list[str]:
    return [u.upload_id for u in client.list_multipart_uploads(localoci.namespace, bucket).data]


@pytest.mark.parametrize("access", ["ObjectWrite", "ObjectReadWrite", "AnyObjectWrite"])
def test_the_whole_protocol_commits_the_parts_in_order_with_the_metadata(object_storage, localoci, bucket, access):
    par = make_par(object_storage, localoci, bucket, access)
    created = create(localoci, par, {"opc-meta-source": "volume-1", "Content-Type": "application/x-qemu-disk"})
    assert created.status == 200, created.body
    upload = created.json()
    assert set(upload) == {"namespace", "bucket", "object", "uploadId", "timeCreated", "storageTier", "accessUri"}
    assert (upload["namespace"], upload["bucket"], upload["object"]) == (localoci.namespace, bucket, NAME)
    token = par.access_uri.split("/")[2]
    assert upload["accessUri"] == (f"/p/{token}/n/{localoci.namespace}/b/{bucket}/u/exports%2Fdisk%201.qcow2"
                                   f"/id/{upload['uploadId']}/")

    base = localoci.endpoint + upload["accessUri"]
    data = {1: b"a" * 1000, 2: b"b" * 2000, 3: b"c" * 10}
    etags = {}
    for number in (3, 1, 2):  # any order, with and without Content-MD5
        headers = {"Content-MD5": b64md5(data[number])} if number != 2 else {}
        reply = call("PUT", f"{base}{number}", data[number], headers)
        assert reply.status == 200, reply.body
        assert reply.headers["opc-content-md5"] == b64md5(data[number])
        etags[number] = reply.headers["ETag"]
    parts = object_storage.list_multipart_upload_parts(localoci.namespace, bucket, NAME, upload["uploadId"]).data
    assert [(p.part_number, p.etag, p.size) for p in parts] == [(n, etags[n], len(data[n])) for n in (1, 2, 3)]

    committed = call("POST", base)
    assert committed.status == 200, committed.body
    digest = hashlib.md5(b"".join(base64.b64decode(b64md5(data[n])) for n in (1, 2, 3))).digest()
    assert committed.headers["opc-multipart-md5"] == base64.b64encode(digest).decode() + "-3"
    got = object_storage.get_object(localoci.namespace, bucket, NAME)
    assert got.data.content == data[1] + data[2] + data[3]
    assert got.headers["ETag"] == committed.headers["ETag"]
    assert got.headers["Content-Type"] == "application/x-qemu-disk"
    assert got.headers["opc-meta-source"] == "volume-1"
    assert open_uploads(object_storage, localoci, bucket) == []


@pytest.mark.parametrize("access", ["ObjectRead", "AnyObjectRead"])
def test_a_read_only_par_is_refused_every_write_call(object_storage, localoci, bucket, access):
    upload = object_storage.create_multipart_upload(
        localoci.namespace, bucket, models.CreateMultipartUploadDetails(object=NAME)).data
    par = make_par(object_storage, localoci, bucket, access)
    assert create(localoci, par).status == 403
    base = f"{localoci.endpoint}/p/{par.access_uri.split('/')[2]}/n/{localoci.namespace}/b/{bucket}" \
           f"/u/{urllib.request.quote(NAME, safe='')}/id/{upload.upload_id}/"
    before = part_files(localoci)
    assert call("PUT", base + "1", b"data").status == 403
    assert call("POST", base).status == 403
    assert call("DELETE", base).status == 403
    assert part_files(localoci) == before
    assert open_uploads(object_storage, localoci, bucket) == [upload.upload_id]


def test_an_object_par_reaches_the_uploads_of_its_object_only(object_storage, localoci, bucket):
    other = object_storage.create_multipart_upload(
        localoci.namespace, bucket, models.CreateMultipartUploadDetails(object="other")).data
    par = make_par(object_storage, localoci, bucket)
    token = par.access_uri.split("/")[2]
    for name in ("other", urllib.request.quote(NAME, safe="")):  # another object's upload, or its id under ours
        base = f"{localoci.endpoint}/p/{token}/n/{localoci.namespace}/b/{bucket}/u/{name}/id/{other.upload_id}/"
        assert call("PUT", base + "1", b"data").status == 404
        assert call("DELETE", base).status == 404
    assert open_uploads(object_storage, localoci, bucket) == [other.upload_id]


@pytest.mark.parametrize("ending", ["deleted", "expired"])
def test_a_par_that_ended_ends_its_uploads_access(object_storage, localoci, bucket, ending):
    expires = in_minutes(10) if ending == "deleted" else dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)
    par = make_par(object_storage, localoci, bucket, expires=expires)
    upload = create(localoci, par).json()
    base = localoci.endpoint + upload["accessUri"]
    assert call("PUT", base + "1", b"before").status == 200
    if ending == "deleted":
        object_storage.delete_preauthenticated_request(localoci.namespace, bucket, par.id)
    else:
        wait_until_past(expires)
    for method, url, body in (("PUT", base + "2", b"after"), ("POST", base, None), ("DELETE", base, None)):
        assert call(method, url, body).status == 404, method
    assert create(localoci, par).status == 404
    # the upload itself is untouched: its owner lists and aborts it with the signed API
    assert open_uploads(object_storage, localoci, bucket) == [upload["uploadId"]]


def test_abort_leaves_no_upload_and_no_part_files(object_storage, localoci, bucket):
    before = part_files(localoci)
    upload = create(localoci, make_par(object_storage, localoci, bucket)).json()
    base = localoci.endpoint + upload["accessUri"]
    for number in (1, 2):
        assert call("PUT", f"{base}{number}", b"x" * 100).status == 200
    assert len(part_files(localoci) - before) == 2
    assert call("DELETE", base).status == 204
    assert part_files(localoci) == before
    assert open_uploads(object_storage, localoci, bucket) == []
    assert call("PUT", base + "3", b"late").status == 404
    assert call("POST", base).status == 404
    assert part_files(localoci) == before


def test_the_sdk_lists_and_aborts_an_upload_made_through_a_par(object_storage, localoci, bucket):
    before = part_files(localoci)
    upload = create(localoci, make_par(object_storage, localoci, bucket)).json()
    base = localoci.endpoint + upload["accessUri"]
    assert call("PUT", base + "1", b"part one").status == 200
    listed = object_storage.list_multipart_uploads(localoci.namespace, bucket).data
    assert [(u.object, u.upload_id) for u in listed] == [(NAME, upload["uploadId"])]
    object_storage.abort_multipart_upload(localoci.namespace, bucket, NAME, upload["uploadId"])
    assert open_uploads(object_storage, localoci, bucket) == []
    assert part_files(localoci) == before
    assert call("PUT", base + "2", b"late").status == 404


def test_bad_calls_are_400_and_store_nothing(object_storage, localoci, bucket):
    par = make_par(object_storage, localoci, bucket)
    # a create with a body (a whole object sent with opc-multipart) is refused
    refused = call("PUT", par_url(localoci, par), b"whole object", {"opc-multipart": "true"})
    assert refused.status == 400
    assert open_uploads(object_storage, localoci, bucket) == []
    before = part_files(localoci)
    upload = create(localoci, par).json()
    base = localoci.endpoint + upload["accessUri"]
    assert call("PUT", base + "1", b"data", {"Content-MD5": b64md5(b"other")}).status == 400
    assert call("PUT", base + "0", b"data").status == 400
    assert call("PUT", base + "x", b"data").status == 400
    assert call("POST", base).status == 400  # nothing to commit
    assert part_files(localoci) == before
    assert object_storage.list_multipart_upload_parts(localoci.namespace, bucket, NAME, upload["uploadId"]).data == []
