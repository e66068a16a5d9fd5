"""Object Storage REST API: parse requests, call the model, render OCI-shaped replies; the route
table (``ROUTES``) at the bottom says which call each handler serves."""

from __future__ import annotations

import email.utils
import functools
from typing import TYPE_CHECKING, Any, BinaryIO, Callable
from urllib.parse import quote

from ..errors import invalid_parameter
from ..http import FileBody, Request, Response, Route
from ..ids import parse_iso
from ..resources import public
from .models import parse_range, uploaded_parts

if TYPE_CHECKING:
    from ..app import LocalOCI

PUBLIC_OBJECT_FIELDS = ("name", "size", "etag", "md5", "timeCreated", "timeModified", "storageTier")


def _metadata(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("opc-meta-")}


def _http_date(iso: str) -> str:
    return email.utils.format_datetime(parse_iso(iso), usegmt=True)


def object_headers(obj: dict[str, Any]) -> dict[str, str]:
    headers = {
        "ETag": obj["etag"],
        "Content-Type": obj["contentType"],
        "Last-Modified": _http_date(obj["timeModified"]),
        "Accept-Ranges": "bytes",
        "storage-tier": obj.get("storageTier", "Standard"),
    }
    if obj.get("md5"):
        headers["Content-MD5"] = obj["md5"]
    if obj.get("multipartMd5"):
        headers["opc-multipart-md5"] = obj["multipartMd5"]
    for key, value in obj["metadata"].items():
        headers[key] = value
    return headers


def object_response(app: "LocalOCI", request: Request, obj: dict[str, Any]) -> Response:
    """A GET or HEAD reply for ``obj``, honouring a Range header."""
    headers = object_headers(obj)
    rng = parse_range(request.headers.get("Range"), obj["size"])
    pieces = app.objectstorage.object_pieces(obj)
    account = f"{obj['_bucket']}/{obj['name']}"
    if rng is None:
        return Response(200, FileBody(pieces, 0, obj["size"], account), headers)
    headers["Content-Range"] = f"bytes {rng.start}-{rng.end}/{obj['size']}"
    return Response(206, FileBody(pieces, rng.start, rng.length, account), headers)


def conditional_read(app: "LocalOCI", request: Request, namespace: str, bucket: str, name: str) -> Response:
    """A GET or HEAD of an object that honours If-Match (412) and If-None-Match (304)."""
    obj = app.objectstorage.get_object(namespace, bucket, name, request.headers.get("If-Match"))
    none_match = request.headers.get("If-None-Match")
    if none_match and none_match in ("*", obj["etag"]):
        return Response(304, None, {"ETag": obj["etag"]})
    return object_response(app, request, obj)


def _body_of(app: "LocalOCI", request: Request) -> Callable[[BinaryIO], tuple[int, str]]:
    """What writes an object's (or a part's) bytes: the request's body, received no faster than
    the sending instance's network allows."""
    return functools.partial(request.save_body, throttles=app.write_throttles(request))


def get_namespace(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.namespace)


def get_namespace_metadata(app: "LocalOCI", request: Request) -> Response:
    ns = request.params["namespaceName"]
    app.objectstorage.check_namespace(ns)
    return Response.json({"namespace": ns, "defaultS3CompartmentId": app.tenancy_id,
                          "defaultSwiftCompartmentId": app.tenancy_id})


def create_bucket(app: "LocalOCI", request: Request) -> Response:
    bucket = app.objectstorage.create_bucket(request.params["namespaceName"], request.json())
    return Response.json(public(bucket), headers={"ETag": bucket["etag"],
                                                  "Location": f"/n/{bucket['namespace']}/b/{bucket['name']}"})


def get_bucket(app: "LocalOCI", request: Request) -> Response:
    bucket = app.objectstorage.bucket(request.params["namespaceName"], request.params["bucketName"])
    return Response.json(public(bucket), headers={"ETag": bucket["etag"]})


def update_bucket(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    bucket = app.objectstorage.update_bucket(p["namespaceName"], p["bucketName"], request.json())
    return Response.json(public(bucket), headers={"ETag": bucket["etag"]})


def delete_bucket(app: "LocalOCI", request: Request) -> Response:
    app.objectstorage.delete_bucket(request.params["namespaceName"], request.params["bucketName"])
    return Response.empty()


def list_buckets(app: "LocalOCI", request: Request) -> Response:
    compartment = request.query.get("compartmentId")
    if not compartment:
        raise invalid_parameter("compartmentId is required.")
    buckets = app.objectstorage.list_buckets(request.params["namespaceName"], compartment)
    summary = ("namespace", "name", "compartmentId", "createdBy", "timeCreated", "etag", "freeformTags", "definedTags")
    return Response.json([{k: b.get(k) for k in summary} for b in buckets])


def put_object(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    obj = app.objectstorage.put_object(
        p["namespaceName"], p["bucketName"], p["objectName"], _body_of(app, request),
        content_type=request.headers.get("Content-Type"),
        content_md5=request.headers.get("Content-MD5"),
        metadata=_metadata(request),
        if_match=request.headers.get("If-Match"),
        if_none_match=request.headers.get("If-None-Match"),
    )
    headers = {"ETag": obj["etag"], "opc-content-md5": obj["md5"], "Last-Modified": _http_date(obj["timeModified"])}
    return Response(200, b"", headers)


def get_object(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    return conditional_read(app, request, p["namespaceName"], p["bucketName"], p["objectName"])


def delete_object(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    app.objectstorage.delete_object(p["namespaceName"], p["bucketName"], p["objectName"], request.headers.get("If-Match"))
    return Response.empty()


def list_objects(app: "LocalOCI", request: Request) -> Response:
    p, q = request.params, request.query
    try:
        limit = max(1, min(1000, int(q.get("limit", 1000))))
    except ValueError:
        raise invalid_parameter("limit must be a whole number.") from None
    objects, prefixes, next_start = app.objectstorage.list_objects(
        p["namespaceName"], p["bucketName"], q.get("prefix", ""), q.get("start"), q.get("end"), limit, q.get("delimiter")
    )
    fields = {"name"} | {f.strip() for f in q.get("fields", "").split(",") if f.strip()}
    body: dict[str, Any] = {
        "objects": [{k: o.get(k) for k in PUBLIC_OBJECT_FIELDS if k in fields} for o in objects],
        "prefixes": prefixes,
    }
    if next_start is not None:
        body["nextStartWith"] = next_start
    return Response.json(body)


# -- multipart uploads ------------------------------------------------------------------

def create_multipart_upload(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    upload = app.objectstorage.create_multipart_upload(p["namespaceName"], p["bucketName"], request.json())
    location = f"/n/{upload['namespace']}/b/{upload['bucket']}/u/{quote(upload['object'], safe='')}"
    return Response.json(public(upload), headers={"Location": location})


def _upload_id(request: Request) -> str:
    upload_id = request.query.get("uploadId")
    if not upload_id:
        raise invalid_parameter("uploadId is required.")
    return upload_id


def _store_part(app: "LocalOCI", request: Request, upload_id: str, part_number: str) -> Response:
    """UploadPart, signed or through a PAR: the part's bytes are the request's body."""
    p = request.params
    try:
        part_num = int(part_number)
    except ValueError:
        raise invalid_parameter("uploadPartNum must be a whole number.") from None
    part = app.objectstorage.upload_part(
        p["namespaceName"], p["bucketName"], p["objectName"], upload_id, part_num,
        _body_of(app, request), request.headers.get("Content-MD5"),
    )
    return Response(200, b"", {"ETag": part["etag"], "opc-content-md5": part["md5"]})


def _committed(obj: dict[str, Any]) -> Response:
    return Response(200, b"", {"ETag": obj["etag"], "opc-multipart-md5": obj["multipartMd5"],
                               "Last-Modified": _http_date(obj["timeModified"])})


def upload_part(app: "LocalOCI", request: Request) -> Response:
    return _store_part(app, request, _upload_id(request), request.query.get("uploadPartNum", ""))


def commit_multipart_upload(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    obj = app.objectstorage.commit_multipart_upload(
        p["namespaceName"], p["bucketName"], p["objectName"], _upload_id(request), request.json(),
        if_match=request.headers.get("If-Match"), if_none_match=request.headers.get("If-None-Match"),
    )
    return _committed(obj)


def abort_multipart_upload(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    app.objectstorage.abort_multipart_upload(p["namespaceName"], p["bucketName"], p["objectName"], _upload_id(request))
    return Response.empty()


def list_multipart_upload_parts(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    upload = app.objectstorage.upload(p["namespaceName"], p["bucketName"], p["objectName"], _upload_id(request))
    return Response.json([public(part) for part in uploaded_parts(upload)])


def list_multipart_uploads(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    uploads = app.objectstorage.list_multipart_uploads(p["namespaceName"], p["bucketName"])
    return Response.json([public(u) for u in uploads])


# -- pre-authenticated requests ------------------------------------------------------------

def create_par(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    par = app.objectstorage.create_par(p["namespaceName"], p["bucketName"], request.json())
    return Response.json(public(par))


def _par_summary(par: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in public(par).items() if k != "accessUri"}


def get_par(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    return Response.json(_par_summary(app.objectstorage.get_par(p["namespaceName"], p["bucketName"], p["parId"])))


def delete_par(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    app.objectstorage.delete_par(p["namespaceName"], p["bucketName"], p["parId"])
    return Response.empty()


def list_pars(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    return Response.json([_par_summary(par) for par in app.objectstorage.list_pars(p["namespaceName"], p["bucketName"])])


def par_read(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    app.objectstorage.authorize_par(p["token"], p["namespaceName"], p["bucketName"], p["objectName"], write=False)
    # The importer sends If-Match with every ranged read, so a replaced object is never mixed in.
    return conditional_read(app, request, p["namespaceName"], p["bucketName"], p["objectName"])


def par_write(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    app.objectstorage.authorize_par(p["token"], p["namespaceName"], p["bucketName"], p["objectName"], write=True)
    if (request.headers.get("opc-multipart") or "").strip().lower() == "true":
        return _par_create_multipart_upload(app, request)
    obj = app.objectstorage.put_object(
        p["namespaceName"], p["bucketName"], p["objectName"], _body_of(app, request),
        content_type=request.headers.get("Content-Type"),
        content_md5=request.headers.get("Content-MD5"),
        metadata=_metadata(request),
    )
    return Response(200, b"", {"ETag": obj["etag"], "opc-content-md5": obj["md5"]})


# Multipart uploads through a PAR that allows writes ("Using multipart uploads with
# pre-authenticated requests"): a PUT of the PAR's object URL with ``opc-multipart: true``
# creates the upload and answers with its ``accessUri``; under it, PUT <accessUri><N> uploads
# part N, POST <accessUri> commits every uploaded part in part-number order, DELETE aborts.
# Every call is authorized by the PAR itself (expiry, access type, object, bucket): deleting
# the PAR ends access to its uploads. They are ordinary multipart uploads otherwise.

def _par_create_multipart_upload(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    if not request.consumed:
        raise invalid_parameter("A PUT with opc-multipart: true creates a multipart upload; it takes no body.")
    upload = app.objectstorage.create_multipart_upload(p["namespaceName"], p["bucketName"], {
        "object": p["objectName"], "metadata": _metadata(request), "contentType": request.headers.get("Content-Type"),
    })
    access_uri = (f"/p/{quote(p['token'], safe='')}/n/{upload['namespace']}/b/{upload['bucket']}"
                  f"/u/{quote(upload['object'], safe='')}/id/{upload['uploadId']}/")
    return Response.json({**public(upload), "accessUri": access_uri})


def _par_upload(app: "LocalOCI", request: Request) -> str:
    """The upload a PAR upload call addresses, once the PAR allows writing its object; its id."""
    p = request.params
    app.objectstorage.authorize_par(p["token"], p["namespaceName"], p["bucketName"], p["objectName"], write=True)
    return app.objectstorage.upload(p["namespaceName"], p["bucketName"], p["objectName"], p["uploadId"])["uploadId"]


def par_upload_part(app: "LocalOCI", request: Request) -> Response:
    return _store_part(app, request, _par_upload(app, request), request.params["uploadPartNum"])


def par_commit_multipart_upload(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    upload_id = _par_upload(app, request)
    return _committed(app.objectstorage.commit_uploaded_parts(p["namespaceName"], p["bucketName"], p["objectName"],
                                                              upload_id))


def par_abort_multipart_upload(app: "LocalOCI", request: Request) -> Response:
    p = request.params
    upload_id = _par_upload(app, request)
    app.objectstorage.abort_multipart_upload(p["namespaceName"], p["bucketName"], p["objectName"], upload_id)
    return Response.empty()


NS = "/n/{namespaceName}"
B = NS + "/b/{bucketName}"
OBJECT = B + "/o/{objectName+}"
UPLOAD = B + "/u/{objectName+}"
PAR_OBJECT = "/p/{token}/n/{namespaceName}/b/{bucketName}/o/{objectName+}"
PAR_UPLOAD = "/p/{token}/n/{namespaceName}/b/{bucketName}/u/{objectName+}/id/{uploadId}"
ROUTES = [
    Route("GET", "/n", get_namespace, "GetNamespace"),
    Route("GET", NS, get_namespace_metadata, "GetNamespaceMetadata"),
    Route("POST", NS + "/b", create_bucket, "CreateBucket"),
    Route("GET", NS + "/b", list_buckets, "ListBuckets"),
    Route("GET", B, get_bucket, "GetBucket"),
    Route("HEAD", B, get_bucket, "HeadBucket"),
    Route("POST", B, update_bucket, "UpdateBucket"),
    Route("DELETE", B, delete_bucket, "DeleteBucket"),
    Route("GET", B + "/o", list_objects, "ListObjects"),
    Route("PUT", OBJECT, put_object, "PutObject"),
    Route("GET", OBJECT, get_object, "GetObject"),
    Route("HEAD", OBJECT, get_object, "HeadObject"),
    Route("DELETE", OBJECT, delete_object, "DeleteObject"),
    Route("POST", B + "/u", create_multipart_upload, "CreateMultipartUpload"),
    Route("GET", B + "/u", list_multipart_uploads, "ListMultipartUploads"),
    Route("PUT", UPLOAD, upload_part, "UploadPart"),
    Route("POST", UPLOAD, commit_multipart_upload, "CommitMultipartUpload"),
    Route("DELETE", UPLOAD, abort_multipart_upload, "AbortMultipartUpload"),
    Route("GET", UPLOAD, list_multipart_upload_parts, "ListMultipartUploadParts"),
    Route("POST", B + "/p", create_par, "CreatePreauthenticatedRequest"),
    Route("GET", B + "/p", list_pars, "ListPreauthenticatedRequests"),
    Route("GET", B + "/p/{parId}", get_par, "GetPreauthenticatedRequest"),
    Route("DELETE", B + "/p/{parId}", delete_par, "DeletePreauthenticatedRequest"),
    Route("GET", PAR_OBJECT, par_read, "ParGetObject", authenticated=False),
    Route("HEAD", PAR_OBJECT, par_read, "ParHeadObject", authenticated=False),
    # also creates a multipart upload (opc-multipart: true)
    Route("PUT", PAR_OBJECT, par_write, "ParPutObject", authenticated=False),
    Route("PUT", PAR_UPLOAD + "/{uploadPartNum}", par_upload_part, "ParUploadPart", authenticated=False),
    Route("POST", PAR_UPLOAD, par_commit_multipart_upload, "ParCommitMultipartUpload", authenticated=False),
    Route("DELETE", PAR_UPLOAD, par_abort_multipart_upload, "ParAbortMultipartUpload", authenticated=False),
]
