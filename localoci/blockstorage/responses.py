"""Block Storage REST API: volumes, volume groups, boot volumes, backups, backup policies.

Each handler parses a call, asks the model (``models.py``, ``backups.py``) and renders the reply;
the route table (``ROUTES``) at the bottom says which call each handler serves. The handlers of
volume and boot volume backups are the same for both kinds, told the kind in the table.
Every call acts in the region of the listener it arrived on (``request.region``)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public
from . import clones
from .backups import BOOT, GROUP, VOLUME, Kind

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"
# List filters: query parameter -> field.
LIST_FILTERS = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                "displayName": "displayName", "lifecycleState": "lifecycleState"}
VOLUME_FILTERS = {**LIST_FILTERS, "volumeGroupId": "volumeGroupId"}
BACKUP_FILTERS = {"displayName": "displayName", "lifecycleState": "lifecycleState"}
VOLUME_BACKUP_FILTERS = {**BACKUP_FILTERS, "volumeId": "volumeId", "sourceVolumeBackupId": "sourceVolumeBackupId"}
BOOT_BACKUP_FILTERS = {**BACKUP_FILTERS, "bootVolumeId": "bootVolumeId",
                       "sourceBootVolumeBackupId": "sourceBootVolumeBackupId"}
GROUP_BACKUP_FILTERS = {**BACKUP_FILTERS, "volumeGroupId": "volumeGroupId"}


# -- volumes -------------------------------------------------------------------------

def create_volume(app: "LocalOCI", request: Request) -> Response:
    volume = app.blockstorage.create_volume(request.json(), fails=request.fail_resource, region=request.region)
    return Response.json(public(volume))


def get_volume(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.blockstorage.volume(request.params["volumeId"], request.region)))


def update_volume(app: "LocalOCI", request: Request) -> Response:
    volume = app.blockstorage.update_volume(request.params["volumeId"], request.json(), request.region)
    return Response.json(public(volume))


def delete_volume(app: "LocalOCI", request: Request) -> Response:
    app.blockstorage.delete_volume(request.params["volumeId"], request.region)
    return Response.empty()


def list_volumes(app: "LocalOCI", request: Request) -> Response:
    bs = app.blockstorage
    volumes = bs.in_region(bs.store.values("volumes"), request.region)
    return paged(request, (v for v in volumes if matches(v, request.query, VOLUME_FILTERS)), public)


# -- volume groups ---------------------------------------------------------------------

def create_volume_group(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.blockstorage.create_volume_group(request.json(), request.region))


def get_volume_group(app: "LocalOCI", request: Request) -> Response:
    bs = app.blockstorage
    return Response.json(bs.render_group(bs.volume_group(request.params["volumeGroupId"], request.region)))


def update_volume_group(app: "LocalOCI", request: Request) -> Response:
    group = app.blockstorage.update_volume_group(request.params["volumeGroupId"], request.json(), request.region)
    return Response.json(group)


def delete_volume_group(app: "LocalOCI", request: Request) -> Response:
    app.blockstorage.delete_volume_group(request.params["volumeGroupId"], request.region)
    return Response.empty()


def list_volume_groups(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    bs = app.blockstorage
    groups = bs.in_region(bs.store.values("volume_groups"), request.region)
    return paged(request, (g for g in groups if matches(g, request.query, LIST_FILTERS)), bs.render_group)


# -- boot volumes ----------------------------------------------------------------------

def get_boot_volume(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.blockstorage.boot_volume(request.params["bootVolumeId"], request.region)))


def list_boot_volumes(app: "LocalOCI", request: Request) -> Response:
    bs = app.blockstorage
    boot_volumes = bs.in_region(bs.store.values("boot_volumes"), request.region)
    return paged(request, (v for v in boot_volumes if matches(v, request.query, VOLUME_FILTERS)), public)


def update_boot_volume(app: "LocalOCI", request: Request) -> Response:
    boot_volume = app.blockstorage.update_boot_volume(request.params["bootVolumeId"], request.json(), request.region)
    return Response.json(public(boot_volume))


def delete_boot_volume(app: "LocalOCI", request: Request) -> Response:
    app.blockstorage.delete_boot_volume(request.params["bootVolumeId"], request.region)
    return Response.empty()


def create_boot_volume(app: "LocalOCI", request: Request) -> Response:
    """CreateBootVolume restores a boot volume backup or clones a boot volume (the sources the local OCI takes)."""
    details = request.json()
    if clones.source_type(details) == "bootVolume":
        boot_volume = clones.clone_boot_volume(app, details, request.fail_resource, request.region)
    else:
        boot_volume = app.backups.restore_boot_volume(details, request.fail_resource, request.region)
    return Response.json(public(boot_volume))


# -- backup policies ---------------------------------------------------------------------

def list_policies(app: "LocalOCI", request: Request) -> Response:
    return paged(request, app.blockstorage.policies.values(), dict)


def get_policy(app: "LocalOCI", request: Request) -> Response:
    return Response.json(lookup(app.blockstorage.policies, request.params["policyId"], "VolumeBackupPolicy"))


def create_assignment(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.blockstorage.assign_policy(request.json()))


def get_assignment(app: "LocalOCI", request: Request) -> Response:
    assignment_id = request.params["policyAssignmentId"]
    return Response.json(lookup(app.blockstorage.assignments, assignment_id, "VolumeBackupPolicyAssignment"))


def get_asset_assignment(app: "LocalOCI", request: Request) -> Response:
    asset_id = require(request, "assetId")
    return paged(request, (a for a in app.blockstorage.assignments.values() if a["assetId"] == asset_id), dict)


def delete_assignment(app: "LocalOCI", request: Request) -> Response:
    app.blockstorage.unassign_policy(request.params["policyAssignmentId"])
    return Response.empty()


# -- backups of one volume (``kind``: a volume's or a boot volume's) and volume group backups ------------

def _backup_id(kind: Kind, request: Request) -> str:
    """The backup a call names: its path parameter is ``volumeBackupId`` or ``bootVolumeBackupId``."""
    return request.params[kind.what[0].lower() + kind.what[1:] + "Id"]


def list_backups(collection: str, filters: dict[str, str], app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    records = app.blockstorage.in_region(app.backups.store.values(collection), request.region)
    return paged(request, (b for b in records if matches(b, request.query, filters)), public)


def create_backup(kind: Kind, app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.backups.create(kind, request.json(), request.fail_resource, request.region)))


def get_backup(kind: Kind, app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.backups.backup(kind, _backup_id(kind, request), request.region)))


def update_backup(kind: Kind, app: "LocalOCI", request: Request) -> Response:
    backup = app.backups.update(kind, _backup_id(kind, request), request.json(), request.region)
    return Response.json(public(backup))


def delete_backup(kind: Kind, app: "LocalOCI", request: Request) -> Response:
    app.backups.delete(kind, _backup_id(kind, request), request.region)
    return Response.empty()


def copy_backup(kind: Kind, app: "LocalOCI", request: Request) -> Response:
    backup = app.backups.copy(kind, _backup_id(kind, request), request.json(), request.fail_resource, request.region)
    return Response.json(public(backup))


def create_group_backup(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.backups.create_group(request.json(), request.fail_resource, request.region)))


def get_group_backup(app: "LocalOCI", request: Request) -> Response:
    return Response.json(public(app.backups.group_backup(request.params["volumeGroupBackupId"], request.region)))


def update_group_backup(app: "LocalOCI", request: Request) -> Response:
    backup = app.backups.update_group(request.params["volumeGroupBackupId"], request.json(), request.region)
    return Response.json(public(backup))


def delete_group_backup(app: "LocalOCI", request: Request) -> Response:
    app.backups.delete_group(request.params["volumeGroupBackupId"], request.region)
    return Response.empty()


def copy_group_backup(app: "LocalOCI", request: Request) -> Response:
    backup = app.backups.copy_group(request.params["volumeGroupBackupId"], request.json(), request.fail_resource,
                                    request.region)
    return Response.json(public(backup))


VOLUME_PATH = BASE + "/volumes/{volumeId}"
GROUP_PATH = BASE + "/volumeGroups/{volumeGroupId}"
BOOT_PATH = BASE + "/bootVolumes/{bootVolumeId}"
ASSIGNMENTS = BASE + "/volumeBackupPolicyAssignments"
VOLUME_BACKUPS = BASE + "/volumeBackups"
BOOT_BACKUPS = BASE + "/bootVolumeBackups"
GROUP_BACKUPS = BASE + "/volumeGroupBackups"
ROUTES = [
    Route("POST", BASE + "/volumes", create_volume, "CreateVolume", retry_token=True),
    Route("GET", BASE + "/volumes", list_volumes, "ListVolumes"),
    Route("GET", VOLUME_PATH, get_volume, "GetVolume"),
    Route("PUT", VOLUME_PATH, update_volume, "UpdateVolume"),
    Route("DELETE", VOLUME_PATH, delete_volume, "DeleteVolume"),
    Route("POST", BASE + "/volumeGroups", create_volume_group, "CreateVolumeGroup", retry_token=True),
    Route("GET", BASE + "/volumeGroups", list_volume_groups, "ListVolumeGroups"),
    Route("GET", GROUP_PATH, get_volume_group, "GetVolumeGroup"),
    Route("PUT", GROUP_PATH, update_volume_group, "UpdateVolumeGroup"),
    Route("DELETE", GROUP_PATH, delete_volume_group, "DeleteVolumeGroup"),
    Route("GET", BASE + "/bootVolumes", list_boot_volumes, "ListBootVolumes"),
    Route("GET", BOOT_PATH, get_boot_volume, "GetBootVolume"),
    Route("PUT", BOOT_PATH, update_boot_volume, "UpdateBootVolume"),
    Route("DELETE", BOOT_PATH, delete_boot_volume, "DeleteBootVolume"),
    Route("GET", BASE + "/volumeBackupPolicies", list_policies, "ListVolumeBackupPolicies"),
    Route("GET", BASE + "/volumeBackupPolicies/{policyId}", get_policy, "GetVolumeBackupPolicy"),
    Route("POST", ASSIGNMENTS, create_assignment, "CreateVolumeBackupPolicyAssignment"),
    Route("GET", ASSIGNMENTS, get_asset_assignment, "GetVolumeBackupPolicyAssetAssignment"),
    Route("GET", ASSIGNMENTS + "/{policyAssignmentId}", get_assignment, "GetVolumeBackupPolicyAssignment"),
    Route("DELETE", ASSIGNMENTS + "/{policyAssignmentId}", delete_assignment, "DeleteVolumeBackupPolicyAssignment"),
    # backups, their copies to other regions, and boot volumes restored from them (volumes and volume
    # groups are restored by their own creates)
    Route("POST", VOLUME_BACKUPS, partial(create_backup, VOLUME), "CreateVolumeBackup", retry_token=True),
    Route("GET", VOLUME_BACKUPS, partial(list_backups, VOLUME.collection, VOLUME_BACKUP_FILTERS), "ListVolumeBackups"),
    Route("GET", VOLUME_BACKUPS + "/{volumeBackupId}", partial(get_backup, VOLUME), "GetVolumeBackup"),
    Route("PUT", VOLUME_BACKUPS + "/{volumeBackupId}", partial(update_backup, VOLUME), "UpdateVolumeBackup"),
    Route("DELETE", VOLUME_BACKUPS + "/{volumeBackupId}", partial(delete_backup, VOLUME), "DeleteVolumeBackup"),
    Route("POST", VOLUME_BACKUPS + "/{volumeBackupId}/actions/copy", partial(copy_backup, VOLUME),
          "CopyVolumeBackup", retry_token=True),
    Route("POST", BOOT_BACKUPS, partial(create_backup, BOOT), "CreateBootVolumeBackup", retry_token=True),
    Route("GET", BOOT_BACKUPS, partial(list_backups, BOOT.collection, BOOT_BACKUP_FILTERS), "ListBootVolumeBackups"),
    Route("GET", BOOT_BACKUPS + "/{bootVolumeBackupId}", partial(get_backup, BOOT), "GetBootVolumeBackup"),
    Route("PUT", BOOT_BACKUPS + "/{bootVolumeBackupId}", partial(update_backup, BOOT), "UpdateBootVolumeBackup"),
    Route("DELETE", BOOT_BACKUPS + "/{bootVolumeBackupId}", partial(delete_backup, BOOT), "DeleteBootVolumeBackup"),
    Route("POST", BOOT_BACKUPS + "/{bootVolumeBackupId}/actions/copy", partial(copy_backup, BOOT),
          "CopyBootVolumeBackup", retry_token=True),
    Route("POST", GROUP_BACKUPS, create_group_backup, "CreateVolumeGroupBackup", retry_token=True),
    Route("GET", GROUP_BACKUPS, partial(list_backups, GROUP, GROUP_BACKUP_FILTERS), "ListVolumeGroupBackups"),
    Route("GET", GROUP_BACKUPS + "/{volumeGroupBackupId}", get_group_backup, "GetVolumeGroupBackup"),
    Route("PUT", GROUP_BACKUPS + "/{volumeGroupBackupId}", update_group_backup, "UpdateVolumeGroupBackup"),
    Route("DELETE", GROUP_BACKUPS + "/{volumeGroupBackupId}", delete_group_backup, "DeleteVolumeGroupBackup"),
    Route("POST", GROUP_BACKUPS + "/{volumeGroupBackupId}/actions/copy", copy_group_backup, "CopyVolumeGroupBackup",
          retry_token=True),
    Route("POST", BASE + "/bootVolumes", create_boot_volume, "CreateBootVolume", retry_token=True),
]
