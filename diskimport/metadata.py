"""The uploaded object's version and the import options its ``opc-meta-*`` metadata carries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from .inspection import FORMAT_NAMES

VPU_LEVELS = (0, 10, 20, *range(30, 121, 10))
OPTION_KEYS = ("ad_number", "display_name", "backup_policy", "vpus", "format")


class InvalidRequest(ValueError):
    """A parameter or metadata value is unusable; the message names it."""


@dataclass(frozen=True)
class ObjectVersion:
    namespace: str
    bucket: str
    name: str
    etag: str
    size: int
    md5: str | None
    metadata: dict[str, str]


@dataclass(frozen=True)
class ImportOptions:
    ad_number: int | None = None
    display_name: str | None = None
    backup_policy: str | None = None
    vpus: int | None = None
    format: str | None = None


def object_version(namespace: str, bucket: str, name: str, headers: Mapping[str, str]) -> ObjectVersion:
    meta = {k.lower()[len("opc-meta-"):]: v for k, v in headers.items() if k.lower().startswith("opc-meta-")}
    return ObjectVersion(
        namespace=namespace, bucket=bucket, name=name, etag=headers["etag"],
        size=int(headers["content-length"]), md5=headers.get("content-md5") or headers.get("opc-multipart-md5"),
        metadata=meta,
    )


def parse_options(values: Mapping[str, Any], ad_count: int | None = None) -> ImportOptions:
    """Validate import options given as flow parameters or as object metadata."""
    ad_number = values.get("ad_number")
    if ad_number not in (None, ""):
        if isinstance(ad_number, bool) or not re.fullmatch(r"\s*\d+\s*", str(ad_number)):
            raise InvalidRequest(f"ad_number must be a whole number, not {ad_number!r}")
        ad_number = int(ad_number)
        if ad_number < 1 or (ad_count is not None and ad_number > ad_count):
            limit = f"1 to {ad_count}" if ad_count else "at least 1"
            raise InvalidRequest(f"ad_number must be {limit}, not {ad_number}")
    else:
        ad_number = None
    vpus = values.get("vpus")
    if vpus not in (None, ""):
        if isinstance(vpus, bool) or not re.fullmatch(r"\s*\d+\s*", str(vpus)) or int(vpus) not in VPU_LEVELS:
            raise InvalidRequest(f"vpus must be 0, 10, 20 or 30 to 120 in steps of 10, not {vpus!r}")
        vpus = int(vpus)
    else:
        vpus = None
    display_name = values.get("display_name") or None
    if display_name is not None:
        display_name = str(display_name)
        if len(display_name) > 255 or re.search(r"[\x00-\x1f]", display_name):
            raise InvalidRequest("display_name must be at most 255 printable characters")
    backup_policy = values.get("backup_policy") or None
    if backup_policy is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", str(backup_policy)):
        raise InvalidRequest(f"backup_policy must be a policy name or OCID, not {backup_policy!r}")
    fmt = values.get("format") or None
    if fmt is not None and str(fmt).lower() not in FORMAT_NAMES:
        raise InvalidRequest(f"format must be one of {', '.join(sorted(FORMAT_NAMES))}, not {fmt!r}")
    return ImportOptions(ad_number, display_name, backup_policy, vpus, fmt)


def merge(parameters: ImportOptions, metadata: ImportOptions) -> ImportOptions:
    """Flow parameters win over object metadata."""
    return ImportOptions(*(p if p is not None else m for p, m in zip(
        (parameters.ad_number, parameters.display_name, parameters.backup_policy, parameters.vpus, parameters.format),
        (metadata.ad_number, metadata.display_name, metadata.backup_policy, metadata.vpus, metadata.format))))
