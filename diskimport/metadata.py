"""The uploaded object's version, and the import options its ``opc-meta-*`` metadata carries
(validated by the same rules the upload trigger applies: :mod:`diskimport.contract`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from diskimport.contract import ImportOptions, InvalidRequest, merge, parse_options

__all__ = ["ImportOptions", "InvalidRequest", "ObjectVersion", "merge", "object_version", "parse_options"]


@dataclass(frozen=True)
class ObjectVersion:
    namespace: str
    bucket: str
    name: str
    etag: str
    size: int
    md5: str | None
    metadata: dict[str, str]


def object_version(namespace: str, bucket: str, name: str, headers: Mapping[str, str]) -> ObjectVersion:
    meta = {k.lower()[len("opc-meta-"):]: v for k, v in headers.items() if k.lower().startswith("opc-meta-")}
    return ObjectVersion(
        namespace=namespace, bucket=bucket, name=name, etag=headers["etag"],
        size=int(headers["content-length"]), md5=headers.get("content-md5") or headers.get("opc-multipart-md5"),
        metadata=meta,
    )
