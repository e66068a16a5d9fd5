"""Object Storage: buckets, objects, multipart uploads and pre-authenticated requests.

Object bytes live in files under ``<data-dir>/objects/`` named by a random id, never
by the object's name, so no object name can reach the host's filesystem.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import re
import secrets
import uuid
from urllib.parse import quote
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

from ..errors import ServiceError, conflict, invalid_parameter, not_found, precondition_failed
from ..ids import new_ocid, now_iso, parse_iso
from ..resources import public

if TYPE_CHECKING:
    from ..app import LocalOCI

BUCKET_NAME = re.compile(r"^[A-Za-z0-9._-]{1,256}$")
MAX_OBJECT_NAME_BYTES = 1024
PAR_ACCESS_TYPES = {"ObjectRead", "ObjectWrite", "ObjectReadWrite", "AnyObjectRead", "AnyObjectWrite", "AnyObjectReadWrite"}
MAX_PARTS = 10000


def _make_durable(f: BinaryIO) -> None:
    """As Object Storage does, acknowledge a write only once its bytes are on disk.

    It also keeps an upload's writeback from running on into whatever the upload starts."""
    f.flush()
    os.fsync(f.fileno())


def _new_etag() -> str:
    return str(uuid.uuid4())


def _check_object_name(name: str) -> None:
    if not name:
        raise invalid_parameter("The object name must not be empty.")
    if any(c in name for c in "\x00\r\n") or len(name.encode()) > MAX_OBJECT_NAME_BYTES:
        raise invalid_parameter("The object name must be at most 1024 bytes of UTF-8 without NUL, CR or LF.")


def _check_header_safe(what: str, value: Any) -> None:
    """Refuse a value that will be echoed in a response header but cannot be one."""
    if not isinstance(value, str) or any(c in value for c in "\x00\r\n"):
        raise invalid_parameter(f"{what} must be a string without NUL, CR or LF.")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise invalid_parameter(f"{what} must be ISO-8859-1 text, as HTTP headers are.") from None


def _check_metadata(metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise invalid_parameter("metadata must be an object of strings.")
    for key, value in metadata.items():
        if not key.lower().startswith("opc-meta-"):
            raise invalid_parameter(f"The metadata key {key!r} must start with 'opc-meta-'.")
        _check_header_safe(f"The metadata key {key!r}", key)
        _check_header_safe(f"The value of metadata key {key!r}", value)
    return metadata


@dataclass
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Parse one ``bytes=`` range against an object of ``size`` bytes (RFC 9110)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        raise ServiceError(416, "InvalidRange", f"The range {header!r} is not a single byte range.")
    first, last = m.group(1), m.group(2)
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise ServiceError(416, "InvalidRange", f"The range {header!r} is not satisfiable.")
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or (last and int(last) < start):
        raise ServiceError(416, "InvalidRange", f"The range {header!r} is not satisfiable for {size} bytes.")
    return ByteRange(start, end)


class ObjectStorage:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app
        self.store = app.store
        self.objects_dir = app.data_dir / "objects"
        self.objects_dir.mkdir(exist_ok=True)
        self.buckets = self.store.collection("buckets")
        self.objects = self.store.collection("objects")
        self.uploads = self.store.collection("multipart_uploads")
        self.pars = self.store.collection("pars")

    # -- namespace and buckets -------------------------------------------------

    def check_namespace(self, namespace: str) -> None:
        if namespace != self.app.namespace:
            raise not_found(f"Namespace {namespace}")

    def bucket(self, namespace: str, name: str) -> dict[str, Any]:
        self.check_namespace(namespace)
        bucket = self.buckets.get(f"{namespace}/{name}")
        if bucket is None:
            raise ServiceError(404, "BucketNotFound", f"Either the bucket named '{name}' does not exist in the namespace '{namespace}' or you are not authorized to access it")
        return bucket

    def create_bucket(self, namespace: str, details: dict[str, Any]) -> dict[str, Any]:
        self.check_namespace(namespace)
        name = details.get("name") or ""
        compartment = details.get("compartmentId")
        if not BUCKET_NAME.match(name):
            raise invalid_parameter(f"Invalid bucket name {name!r}: use letters, digits, '.', '-' and '_'.")
        if not compartment:
            raise invalid_parameter("compartmentId is required.")
        with self.store.lock:
            if f"{namespace}/{name}" in self.buckets:
                raise ServiceError(409, "BucketAlreadyExists", f"Either the bucket '{name}' in namespace '{namespace}' already exists or you are not authorized to create it")
            bucket = {
                "namespace": namespace,
                "name": name,
                "compartmentId": compartment,
                "id": new_ocid("bucket"),
                "createdBy": "ocid1.user.oc1..localoci",
                "timeCreated": now_iso(),
                "etag": _new_etag(),
                "publicAccessType": details.get("publicAccessType", "NoPublicAccess"),
                "storageTier": details.get("storageTier", "Standard"),
                "objectEventsEnabled": bool(details.get("objectEventsEnabled", False)),
                "versioning": "Disabled",
                "metadata": details.get("metadata") or {},
                "freeformTags": details.get("freeformTags") or {},
                "definedTags": details.get("definedTags") or {},
            }
            self.buckets[f"{namespace}/{name}"] = bucket
            self.store.save()
        return bucket

    def update_bucket(self, namespace: str, name: str, details: dict[str, Any]) -> dict[str, Any]:
        with self.store.lock:
            bucket = self.bucket(namespace, name)
            for key in ("objectEventsEnabled", "publicAccessType", "metadata", "freeformTags", "definedTags"):
                if key in details and details[key] is not None:
                    bucket[key] = details[key]
            bucket["etag"] = _new_etag()
            self.store.save()
        return bucket

    def delete_bucket(self, namespace: str, name: str) -> None:
        with self.store.lock:
            self.bucket(namespace, name)
            if any(o["_bucket"] == f"{namespace}/{name}" for o in self.objects.values()):
                raise ServiceError(409, "BucketNotEmpty", f"Bucket named '{name}' is not empty. Delete all objects first.")
            del self.buckets[f"{namespace}/{name}"]
            self.store.save()

    def list_buckets(self, namespace: str, compartment_id: str) -> list[dict[str, Any]]:
        self.check_namespace(namespace)
        return sorted(
            (b for b in self.buckets.values() if b["compartmentId"] == compartment_id),
            key=lambda b: b["name"],
        )

    # -- objects ---------------------------------------------------------------

    def _key(self, namespace: str, bucket: str, name: str) -> str:
        return f"{namespace}/{bucket}/{name}"

    def get_object(self, namespace: str, bucket: str, name: str, if_match: str | None = None) -> dict[str, Any]:
        self.bucket(namespace, bucket)
        obj = self.objects.get(self._key(namespace, bucket, name))
        if obj is None:
            raise ServiceError(404, "ObjectNotFound", f"The object '{name}' was not found in the bucket '{bucket}'")
        if if_match and if_match != "*" and if_match != obj["etag"]:
            raise precondition_failed(f"The If-Match header {if_match!r} does not match the object's ETag.")
        return obj

    def object_pieces(self, obj: dict[str, Any]) -> list[tuple[str, int]]:
        """The files holding the object's bytes, in order, with their sizes: one, or a multipart
        upload's parts (a commit joins them by reference, as Object Storage copies no bytes)."""
        stored = obj["_file"]
        if isinstance(stored, str):
            return [(str(self.objects_dir / stored), obj["size"])]
        return [(str(self.objects_dir / file_id), size) for file_id, size in stored]

    def _unlink(self, stored: str | list[list[Any]]) -> None:
        for file_id in ([stored] if isinstance(stored, str) else [f for f, _ in stored]):
            (self.objects_dir / file_id).unlink(missing_ok=True)

    def put_object(
        self,
        namespace: str,
        bucket_name: str,
        name: str,
        write_body: Callable[[BinaryIO], tuple[int, str]],
        content_type: str | None = None,
        content_md5: str | None = None,
        metadata: dict[str, str] | None = None,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> dict[str, Any]:
        """Store an object whose bytes ``write_body`` writes; returns the object record."""
        _check_object_name(name)
        self.bucket(namespace, bucket_name)
        self._check_conditions(namespace, bucket_name, name, if_match, if_none_match)
        file_id, size, md5 = self._store_body(write_body, content_md5)
        return self._commit_object(namespace, bucket_name, name, file_id, size, md5, None, content_type, metadata, if_match, if_none_match)

    def _store_body(self, write_body: Callable[[BinaryIO], tuple[int, str]],
                    content_md5: str | None) -> tuple[str, int, str]:
        """Write a request body into a new file, durably; ``(file id, size, base64 MD5)``.

        The file is gone again if the body breaks off or does not match its Content-MD5."""
        file_id = uuid.uuid4().hex
        path = self.objects_dir / file_id
        try:
            with open(path, "wb") as f:
                size, md5 = write_body(f)
                _make_durable(f)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if content_md5 and content_md5 != md5:
            path.unlink(missing_ok=True)
            raise invalid_parameter(f"The Content-MD5 you specified ({content_md5}) did not match what was "
                                    f"received ({md5}).")
        return file_id, size, md5

    def _check_conditions(self, namespace: str, bucket: str, name: str, if_match: str | None, if_none_match: str | None) -> None:
        existing = self.objects.get(self._key(namespace, bucket, name))
        if if_none_match == "*" and existing is not None:
            raise ServiceError(409, "IfNoneMatchFailed", f"The object '{name}' already exists.")
        if if_match and (existing is None or (if_match != "*" and if_match != existing["etag"])):
            raise ServiceError(412, "IfMatchFailed", f"The If-Match header {if_match!r} does not match the object '{name}'.")

    def _commit_object(
        self,
        namespace: str,
        bucket_name: str,
        name: str,
        file_id: str | list[list[Any]],
        size: int,
        md5: str | None,
        multipart_md5: str | None,
        content_type: str | None,
        metadata: dict[str, str] | None,
        if_match: str | None,
        if_none_match: str | None,
    ) -> dict[str, Any]:
        with self.store.lock:
            try:
                self._check_conditions(namespace, bucket_name, name, if_match, if_none_match)
            except ServiceError:
                if isinstance(file_id, str):  # a multipart upload's parts stay its own
                    self._unlink(file_id)
                raise
            bucket = self.bucket(namespace, bucket_name)
            key = self._key(namespace, bucket_name, name)
            previous = self.objects.get(key)
            now = now_iso()
            obj = {
                "name": name,
                "size": size,
                "etag": _new_etag(),
                "md5": md5,
                "multipartMd5": multipart_md5,
                "timeCreated": now,
                "timeModified": now,
                "contentType": content_type or "application/octet-stream",
                "metadata": {k.lower(): v for k, v in (metadata or {}).items()},
                "storageTier": "Standard",
                "_bucket": f"{namespace}/{bucket_name}",
                "_file": file_id,
            }
            self.objects[key] = obj
            self.store.save()
            if previous is not None:
                self._unlink(previous["_file"])
            self._object_event("updateobject" if previous else "createobject", bucket, obj)
        return obj

    def delete_object(self, namespace: str, bucket_name: str, name: str, if_match: str | None = None) -> None:
        with self.store.lock:
            obj = self.get_object(namespace, bucket_name, name, if_match)
            del self.objects[self._key(namespace, bucket_name, name)]
            self.store.save()
            self._unlink(obj["_file"])
            self._object_event("deleteobject", self.bucket(namespace, bucket_name), obj)

    def _object_event(self, action: str, bucket: dict[str, Any], obj: dict[str, Any]) -> None:
        """Publish the event of an object create, update or delete, if its bucket emits them (under the store lock)."""
        if not bucket.get("objectEventsEnabled"):
            return
        self.app.events.publish("ObjectStorage", f"com.oraclecloud.objectstorage.{action}", {
            "compartmentId": bucket["compartmentId"],
            "compartmentName": "local",
            "resourceName": obj["name"],
            "resourceId": f"/n/{bucket['namespace']}/b/{bucket['name']}/o/{obj['name']}",
            "availabilityDomain": "AD1",
            "additionalDetails": {
                "bucketName": bucket["name"],
                "versionId": None,
                "archivalState": "Available",
                "namespace": bucket["namespace"],
                "bucketId": bucket["id"],
                "eTag": obj["etag"],
            },
        })

    def list_objects(
        self,
        namespace: str,
        bucket_name: str,
        prefix: str = "",
        start: str | None = None,
        end: str | None = None,
        limit: int = 1000,
        delimiter: str | None = None,
    ) -> tuple[list[dict[str, Any]], list[str], str | None]:
        """Objects and common prefixes in name order, with the name to start the next page at."""
        self.bucket(namespace, bucket_name)
        bucket_key = f"{namespace}/{bucket_name}"
        names = sorted(o["name"] for o in self.objects.values() if o["_bucket"] == bucket_key and o["name"].startswith(prefix))
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        for name in names:
            if start is not None and name < start:
                continue
            if end is not None and name >= end:
                break
            if delimiter:
                rest = name[len(prefix):]
                if delimiter in rest:
                    common = prefix + rest.split(delimiter, 1)[0] + delimiter
                    if common not in prefixes:
                        prefixes.append(common)
                    continue
            if len(objects) == limit:
                return objects, prefixes, name
            objects.append(self.objects[self._key(namespace, bucket_name, name)])
        return objects, prefixes, None

    # -- multipart uploads -----------------------------------------------------

    def create_multipart_upload(self, namespace: str, bucket_name: str, details: dict[str, Any]) -> dict[str, Any]:
        self.bucket(namespace, bucket_name)
        name = details.get("object") or ""
        _check_object_name(name)
        metadata = _check_metadata(details.get("metadata") or {})
        if details.get("contentType") is not None:
            _check_header_safe("contentType", details["contentType"])
        upload = {
            "namespace": namespace,
            "bucket": bucket_name,
            "object": name,
            "uploadId": str(uuid.uuid4()),
            "timeCreated": now_iso(),
            "storageTier": "Standard",
            "_contentType": details.get("contentType"),
            "_metadata": metadata,
            "_parts": {},
        }
        with self.store.lock:
            self.uploads[upload["uploadId"]] = upload
            self.store.save()
        return upload

    def upload(self, namespace: str, bucket_name: str, name: str, upload_id: str) -> dict[str, Any]:
        self.bucket(namespace, bucket_name)
        upload = self.uploads.get(upload_id)
        if upload is None or (upload["namespace"], upload["bucket"], upload["object"]) != (namespace, bucket_name, name):
            raise ServiceError(404, "NoSuchUpload", f"The upload {upload_id!r} does not exist for object '{name}'.")
        return upload

    def upload_part(
        self,
        namespace: str,
        bucket_name: str,
        name: str,
        upload_id: str,
        part_num: int,
        write_body: Callable[[BinaryIO], tuple[int, str]],
        content_md5: str | None = None,
    ) -> dict[str, Any]:
        self.upload(namespace, bucket_name, name, upload_id)
        if not 1 <= part_num <= MAX_PARTS:
            raise invalid_parameter(f"uploadPartNum must be between 1 and {MAX_PARTS}.")
        file_id, size, md5 = self._store_body(write_body, content_md5)
        part = {"partNumber": part_num, "etag": _new_etag(), "md5": md5, "size": size, "_file": file_id}
        with self.store.lock:
            try:
                upload = self.upload(namespace, bucket_name, name, upload_id)
            except ServiceError:  # committed or aborted while the body arrived: keep no orphan part file
                (self.objects_dir / file_id).unlink(missing_ok=True)
                raise
            old = upload["_parts"].get(str(part_num))
            upload["_parts"][str(part_num)] = part
            self.store.save()
        if old:
            (self.objects_dir / old["_file"]).unlink(missing_ok=True)
        return part

    def commit_multipart_upload(
        self, namespace: str, bucket_name: str, name: str, upload_id: str, details: dict[str, Any],
        if_match: str | None = None, if_none_match: str | None = None,
    ) -> dict[str, Any]:
        upload = self.upload(namespace, bucket_name, name, upload_id)
        self._check_conditions(namespace, bucket_name, name, if_match, if_none_match)
        wanted = sorted(details.get("partsToCommit") or [], key=lambda p: int(p["partNum"]))
        if not wanted:
            raise invalid_parameter("partsToCommit must name at least one part.")
        parts = []
        for item in wanted:
            part = upload["_parts"].get(str(int(item["partNum"])))
            if part is None or part["etag"] != item.get("etag"):
                raise invalid_parameter(f"Part {item['partNum']} with ETag {item.get('etag')!r} was not uploaded.")
            parts.append(part)
        return self._assemble(upload, parts, if_match, if_none_match)

    def commit_uploaded_parts(self, namespace: str, bucket_name: str, name: str, upload_id: str) -> dict[str, Any]:
        """Commit every part uploaded so far, in part-number order (a commit through a PAR names no parts)."""
        upload = self.upload(namespace, bucket_name, name, upload_id)
        parts = uploaded_parts(upload)
        if not parts:
            raise invalid_parameter("The multipart upload has no parts to commit.")
        return self._assemble(upload, parts, None, None)

    def _assemble(self, upload: dict[str, Any], parts: list[dict[str, Any]], if_match: str | None,
                  if_none_match: str | None) -> dict[str, Any]:
        """Join ``parts`` (in order) into the upload's object and end the upload."""
        namespace, bucket_name, name = upload["namespace"], upload["bucket"], upload["object"]
        digest = hashlib.md5()
        for part in parts:
            digest.update(base64.b64decode(part["md5"]))
        multipart_md5 = f"{base64.b64encode(digest.digest()).decode()}-{len(parts)}"
        # The parts (each stored durably when it arrived) become the object's files, unjoined.
        segments = [[part["_file"], part["size"]] for part in parts]
        obj = self._commit_object(
            namespace, bucket_name, name, segments, sum(part["size"] for part in parts), None, multipart_md5,
            upload["_contentType"], upload["_metadata"], if_match, if_none_match,
        )
        with self.store.lock:
            committed = {part["_file"] for part in parts}
            upload["_parts"] = {n: p for n, p in upload["_parts"].items() if p["_file"] not in committed}
        self._discard_upload(upload["uploadId"])
        return obj

    def abort_multipart_upload(self, namespace: str, bucket_name: str, name: str, upload_id: str) -> None:
        self.upload(namespace, bucket_name, name, upload_id)
        self._discard_upload(upload_id)

    def _discard_upload(self, upload_id: str) -> None:
        with self.store.lock:
            upload = self.uploads.pop(upload_id, None)
            self.store.save()
        for part in (upload or {}).get("_parts", {}).values():
            (self.objects_dir / part["_file"]).unlink(missing_ok=True)

    def list_multipart_uploads(self, namespace: str, bucket_name: str) -> list[dict[str, Any]]:
        self.bucket(namespace, bucket_name)
        return [u for u in self.uploads.values() if (u["namespace"], u["bucket"]) == (namespace, bucket_name)]

    # -- pre-authenticated requests ----------------------------------------------

    def create_par(self, namespace: str, bucket_name: str, details: dict[str, Any]) -> dict[str, Any]:
        self.bucket(namespace, bucket_name)
        access = details.get("accessType")
        if access not in PAR_ACCESS_TYPES:
            raise invalid_parameter(f"accessType must be one of {sorted(PAR_ACCESS_TYPES)}, not {access!r}.")
        object_name = details.get("objectName")
        if access.startswith("Object"):
            if not object_name:
                raise invalid_parameter(f"objectName is required for accessType {access}.")
            _check_object_name(object_name)
        try:
            expires = parse_iso(str(details["timeExpires"]))
        except (KeyError, ValueError):
            raise invalid_parameter("timeExpires must be an RFC 3339 time.") from None
        if expires <= dt.datetime.now(dt.timezone.utc):
            raise invalid_parameter("timeExpires must be in the future.")
        token = secrets.token_urlsafe(48)
        access_uri = f"/p/{token}/n/{namespace}/b/{bucket_name}/o/"
        if access.startswith("Object"):
            access_uri += quote(object_name, safe="")
        par = {
            "id": secrets.token_urlsafe(24),
            "name": details.get("name") or "",
            "accessUri": access_uri,
            "objectName": object_name,
            "accessType": access,
            "bucketListingAction": details.get("bucketListingAction") or "Deny",
            "timeCreated": now_iso(),
            "timeExpires": expires.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "_namespace": namespace,
            "_bucket": bucket_name,
            "_token": token,
        }
        with self.store.lock:
            self.pars[par["id"]] = par
            self.store.save()
        return par

    def get_par(self, namespace: str, bucket_name: str, par_id: str) -> dict[str, Any]:
        self.bucket(namespace, bucket_name)
        par = self.pars.get(par_id)
        if par is None or (par["_namespace"], par["_bucket"]) != (namespace, bucket_name):
            raise not_found(f"Pre-authenticated request {par_id}")
        return par

    def delete_par(self, namespace: str, bucket_name: str, par_id: str) -> None:
        with self.store.lock:
            self.get_par(namespace, bucket_name, par_id)
            del self.pars[par_id]
            self.store.save()

    def list_pars(self, namespace: str, bucket_name: str) -> list[dict[str, Any]]:
        self.bucket(namespace, bucket_name)
        return [p for p in self.pars.values() if (p["_namespace"], p["_bucket"]) == (namespace, bucket_name)]

    def authorize_par(self, token: str, namespace: str, bucket_name: str, object_name: str, write: bool) -> dict[str, Any]:
        """The PAR behind ``token`` if it grants this access now; otherwise a 404 like OCI's."""
        for par in self.pars.values():
            if secrets.compare_digest(par["_token"], token):
                break
        else:
            raise not_found("Pre-authenticated request")
        if (par["_namespace"], par["_bucket"]) != (namespace, bucket_name):
            raise not_found("Pre-authenticated request")
        if parse_iso(par["timeExpires"]) <= dt.datetime.now(dt.timezone.utc):
            raise not_found("Pre-authenticated request (expired)")
        access = par["accessType"]
        if access.startswith("Object") and par["objectName"] != object_name:
            raise not_found("Pre-authenticated request")
        allowed = "ReadWrite" in access or (access.endswith("Write") if write else access.endswith("Read"))
        if not allowed:
            raise ServiceError(403, "NotAllowed", f"The pre-authenticated request does not allow {'writes' if write else 'reads'}.")
        return par

    def inventory(self) -> dict[str, list[dict[str, Any]]]:
        """Every PAR (without its secret access URI) and multipart upload, for the admin inventory."""
        return {
            "pars": [{**{k: v for k, v in public(p).items() if k != "accessUri"}, "namespace": p["_namespace"],
                      "bucketName": p["_bucket"]} for p in self.store.values("pars")],
            "multipartUploads": [public(u) for u in self.store.values("multipart_uploads")],
        }


def uploaded_parts(upload: dict[str, Any]) -> list[dict[str, Any]]:
    """A multipart upload's parts so far, in part-number order."""
    return sorted(upload["_parts"].values(), key=lambda part: part["partNumber"])
