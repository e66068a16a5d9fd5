"""Delta uploads: only the blocks of a disk that changed since its last import, as a qcow2 overlay.

Each sync-mode import stores the block manifest of what its volume then holds
(:mod:`diskimport.agent.manifest`) as the object ``.oci-import/manifests/<import id>`` in the
image's bucket, and tags the volume with that manifest's SHA-256 (``import-manifest``). The
client (``oci-disk-delta push``, :mod:`.client`) reads the manifest of the object's current
version, hashes the local disk, and uploads the blocks that differ as a qcow2 whose backing
file is named ``oci-import:<import id>`` (:mod:`.qcow2`), with its own manifest of the whole new
disk beside it (``.oci-import/uploads/<source id>/<sha256>.manifest``, named in the upload's metadata
``opc-meta-delta-manifest``). The importer accepts that backing name and no other
(:func:`base_import`), applies the overlay onto the volume of exactly that import, and checks the
result against the client's manifest (:mod:`diskimport.delta.apply`).

Objects under ``.oci-import/`` carry no image suffix: the upload trigger ignores them.
"""

from __future__ import annotations

import re

BACKING_PREFIX = "oci-import:"
MANIFESTS = ".oci-import/manifests/"
UPLOADS = ".oci-import/uploads/"
METADATA_MANIFEST = "delta-manifest"  # opc-meta-delta-manifest: the SHA-256 of the client's manifest
_IMPORT_ID = re.compile(r"[0-9a-f]{32}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def backing_name(import_id: str) -> str:
    return BACKING_PREFIX + import_id


def base_import(backing: str | None) -> str | None:
    """The import id a delta's backing file name refers to; None when it names anything else."""
    if backing is None or not backing.startswith(BACKING_PREFIX):
        return None
    ref = backing[len(BACKING_PREFIX):]
    return ref if _IMPORT_ID.fullmatch(ref) else None


def manifest_object(import_id: str) -> str:
    if not _IMPORT_ID.fullmatch(import_id):
        raise ValueError(f"not an import id: {import_id!r}")
    return MANIFESTS + import_id


def uploads_of(source_id: str) -> str:
    """Where the client's manifests of an object's new versions go (``contract.source_id``: the object)."""
    if not _IMPORT_ID.fullmatch(source_id):
        raise ValueError(f"not a source id: {source_id!r}")
    return f"{UPLOADS}{source_id}/"


def upload_object(source_id: str, sha256: str) -> str:
    """Where a client's manifest of a new version is uploaded; ValueError for anything but a SHA-256."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a SHA-256: {sha256!r}")
    return f"{uploads_of(source_id)}{sha256}.manifest"
