"""Identity of an import: the id derived from the object version, and the tags every
resource it creates carries so that a sweeper can find what a dead run left."""

from __future__ import annotations

import re

# The tag names and the import id are part of the contract shared with the upload function.
from diskimport.contract import (MANAGED_BY, STATE_FAILED, STATE_IMPORTED, STATE_WRITING, TAG_ETAG, TAG_FLOW_RUN,
                                 TAG_IMPORT_ID, TAG_MANAGED_BY, TAG_OBJECT, TAG_STATE, import_id)
from diskimport.records import Subject

__all__ = ["MANAGED_BY", "STATE_FAILED", "STATE_IMPORTED", "STATE_WRITING", "TAG_ETAG", "TAG_FLOW_RUN",
           "TAG_IMPORT_ID", "TAG_MANAGED_BY", "TAG_OBJECT", "TAG_STATE", "PAR_PREFIX", "import_id", "par_prefix", "run_tags",
           "volume_display_name"]


# Every PAR a run creates is named ``oci-disk-<kind>-<subject id>-<run id>-<token>``.
PAR_PREFIX = "oci-disk-"


def run_tags(subject: Subject, flow_run_id: str, extra: dict[str, str]) -> dict[str, str]:
    """The tags of what a run creates for ``subject``: the sweeper finds a dead run's by them."""
    tags = dict(extra)
    tags.update({
        TAG_MANAGED_BY: MANAGED_BY,
        TAG_IMPORT_ID: subject.id,
        TAG_OBJECT: subject.name[-255:],
        TAG_ETAG: subject.version[:255],
        TAG_FLOW_RUN: flow_run_id,
    })
    return tags


def par_prefix(subject: Subject) -> str:
    """What the names of every run's PARs for ``subject`` start with."""
    return f"{PAR_PREFIX}{subject.kind}-{subject.id[:24]}-"


def volume_display_name(template: str, object_name: str, etag: str) -> str:
    base = object_name.rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base else base
    try:
        name = template.format(stem=stem, object=object_name, etag=etag)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"volume name template {template!r} is invalid: {exc}") from None
    name = re.sub(r"[\x00-\x1f]", "", name).strip()[:255]
    return name or "imported-disk"
