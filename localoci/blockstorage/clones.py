"""Clones: CreateVolume from another volume, CreateBootVolume from another boot volume.

As in OCI, a clone is a point-in-time copy of its source, made in the source's region and
availability domain, of the source's size or larger; the source may be attached and in use
(a clone of an attached volume holds what the volume held when the clone was asked for).
The clone can be attached at once: it is PROVISIONING until its transition
(``volume:AVAILABLE`` or ``bootvolume:AVAILABLE``) has passed, then AVAILABLE with
``sourceDetails`` naming its source. The local OCI copies the source's data extents (its
holes stay holes) before it answers the request, so the point in time is the request's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import incorrect_state, invalid_parameter, missing_parameter
from .backups import sparse_copy
from .models import GB, check_size

if TYPE_CHECKING:
    from ..app import LocalOCI

log = logging.getLogger("localoci.blockstorage")

# The states of a source that can be cloned: OCI clones an AVAILABLE volume, attached or not.
CLONABLE = ("AVAILABLE",)


def source_type(details: dict[str, Any]) -> str | None:
    """The ``sourceDetails.type`` of a create request, if it has one."""
    source = details.get("sourceDetails")
    return source.get("type") if isinstance(source, dict) else None


def _source_id(details: dict[str, Any]) -> str:
    source_id = details["sourceDetails"].get("id")
    if not source_id:
        raise missing_parameter("sourceDetails.id")
    return source_id


def _check_source(what: str, source: dict[str, Any], details: dict[str, Any]) -> int:
    """The clone's size in GB, once ``source`` may be cloned as ``details`` ask."""
    if source["lifecycleState"] not in CLONABLE:
        raise incorrect_state(f"{what} {source['id']} is {source['lifecycleState']}, not AVAILABLE: "
                              "only an AVAILABLE one can be cloned.")
    if details.get("availabilityDomain") != source["availabilityDomain"]:
        raise invalid_parameter(f"A clone is made in its source's availability domain: {what} {source['id']} is in "
                                f"{source['availabilityDomain']}, not {details.get('availabilityDomain')!r}.")
    size = details.get("sizeInGBs")
    if size is None:
        return source["sizeInGBs"]
    size = check_size(size)
    if size < source["sizeInGBs"]:
        raise invalid_parameter(f"sizeInGBs {size} is below the {source['sizeInGBs']} GB of {what.lower()} "
                                f"{source['id']}, the clone's source.")
    return size


def clone_volume(app: "LocalOCI", details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
    """CreateVolume with ``sourceDetails`` of type volume."""
    bs = app.blockstorage
    source_id = _source_id(details)
    with app.store.lock:
        source = bs.volume(source_id, region)
        volume = bs.new_volume(details, region, fails, _check_source("Volume", source, details))
        volume["sourceDetails"] = {"type": "volume", "id": source_id}
        _store(app, bs.volumes, volume, fails)
    _copy(app, bs.volumes, volume, bs.backing_file(source))
    app.scheduler.transition("volume:AVAILABLE", lambda: bs.provisioned(volume["id"]))
    return volume


def clone_boot_volume(app: "LocalOCI", details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
    """CreateBootVolume with ``sourceDetails`` of type bootVolume: a boot volume that launches as its source does."""
    bs = app.blockstorage
    source_id = _source_id(details)
    compartment = app.identity.check_compartment(details.get("compartmentId"))
    with app.store.lock:
        source = bs.boot_volume(source_id, region)
        boot_volume = bs.new_boot_volume(compartment, source["availabilityDomain"], details,
                                         _check_source("Boot volume", source, details), source.get("imageId"),
                                         region, fails)
        boot_volume.update({"_image": source.get("_image"), "sourceDetails": {"type": "bootVolume", "id": source_id}})
        _store(app, bs.boot_volumes, boot_volume, fails)
    _copy(app, bs.boot_volumes, boot_volume, bs.backing_file(source))
    app.scheduler.transition("bootvolume:AVAILABLE", lambda: bs.boot_volume_provisioned(boot_volume["id"]))
    return boot_volume


def _store(app: "LocalOCI", records: Any, record: dict[str, Any], fails: bool) -> None:
    """Store the clone's record (with the store locked), failing until its copy is done: ``_fails`` now,
    the injected fault's ``_fault`` once copied."""
    record.update({"_fails": True, "_fault": fails})
    records[record["id"]] = record
    app.store.save()


def _copy(app: "LocalOCI", records: Any, record: dict[str, Any], source: Path) -> None:
    """The source's bytes into the clone's file now. Until its copy is done the clone is stored as failing:
    a copy that fails, or that a stopped process left half done, leaves it FAULTY, never AVAILABLE with
    part of its source. A clone deleted while it was copied leaves no file."""
    target = app.blockstorage.backing_file(record)
    try:
        sparse_copy(str(source), str(target), record["sizeInGBs"] * GB)
        copied = True
    except OSError:
        log.exception("cloning %s into %s failed", source, record["id"])
        copied = False
    with app.store.lock:
        stored = records[record["id"]]
        if copied:
            stored["_fails"] = stored.pop("_fault")
        if stored["lifecycleState"] in ("TERMINATING", "TERMINATED"):
            target.unlink(missing_ok=True)
        app.store.save()
