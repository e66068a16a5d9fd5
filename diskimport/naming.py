"""Identity of an import: the id derived from the object version, and the tags every
resource it creates carries so that a sweeper can find what a dead run left."""

from __future__ import annotations

import hashlib
import re

MANAGED_BY = "oci-disk-import"
TAG_MANAGED_BY = "managed-by"
TAG_IMPORT_ID = "import-id"
TAG_OBJECT = "import-object"
TAG_ETAG = "import-etag"
TAG_FLOW_RUN = "import-flow-run"
TAG_STATE = "import-state"
STATE_WRITING = "writing"
STATE_IMPORTED = "imported"
STATE_FAILED = "failed"


def import_id(namespace: str, bucket: str, object_name: str, etag: str) -> str:
    """A stable id of one object version: the same upload always maps to the same import."""
    key = f"{namespace}/{bucket}/{object_name}@{etag}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def import_tags(import_key: str, object_name: str, etag: str, flow_run_id: str, extra: dict[str, str]) -> dict[str, str]:
    tags = dict(extra)
    tags.update({
        TAG_MANAGED_BY: MANAGED_BY,
        TAG_IMPORT_ID: import_key,
        TAG_OBJECT: object_name[-255:],
        TAG_ETAG: etag[:255],
        TAG_FLOW_RUN: flow_run_id,
    })
    return tags


def volume_display_name(template: str, object_name: str, etag: str) -> str:
    base = object_name.rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    try:
        name = template.format(stem=stem, object=object_name, etag=etag)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"volume name template {template!r} is invalid: {exc}") from None
    name = re.sub(r"[\x00-\x1f]", "", name).strip()[:255]
    return name or "imported-disk"
