"""Block Storage REST API: volumes, volume groups, boot volumes, backups, backup policies.

Every call acts in the region of the listener it arrived on (``request.region``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public
from .backups import BOOT, GROUP, VOLUME, Kind

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"
# List filters of volumes and volume groups: query parameter -> field.
LIST_FILTERS = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                "displayName": "displayName", "lifecycleState": "lifecycleState"}


def routes(app: "LocalOCI") -> list[Route]:
    bs = app.blockstorage

    def create_volume(request: Request) -> Response:
        return Response.json(public(bs.create_volume(request.json(), fails=request.fail_resource, region=request.region)))

    def get_volume(request: Request) -> Response:
        return Response.json(public(bs.volume(request.params["volumeId"], request.region)))

    def update_volume(request: Request) -> Response:
        return Response.json(public(bs.update_volume(request.params["volumeId"], request.json(), request.region)))

    def delete_volume(request: Request) -> Response:
        bs.delete_volume(request.params["volumeId"], request.region)
        return Response.empty()

    def list_volumes(request: Request) -> Response:
        fields = {**LIST_FILTERS, "volumeGroupId": "volumeGroupId"}
        return paged(request, (v for v in bs.in_region(bs.store.values("volumes"), request.region) if matches(v, request.query, fields)), public)

    def create_volume_group(request: Request) -> Response:
        return Response.json(bs.create_volume_group(request.json(), request.region))

    def get_volume_group(request: Request) -> Response:
        return Response.json(bs.render_group(bs.volume_group(request.params["volumeGroupId"], request.region)))

    def update_volume_group(request: Request) -> Response:
        return Response.json(bs.update_volume_group(request.params["volumeGroupId"], request.json(), request.region))

    def delete_volume_group(request: Request) -> Response:
        bs.delete_volume_group(request.params["volumeGroupId"], request.region)
        return Response.empty()

    def list_volume_groups(request: Request) -> Response:
        require(request, "compartmentId")
        groups = bs.in_region(bs.store.values("volume_groups"), request.region)
        return paged(request, (g for g in groups if matches(g, request.query, LIST_FILTERS)), bs.render_group)

    def get_boot_volume(request: Request) -> Response:
        return Response.json(public(bs.boot_volume(request.params["bootVolumeId"], request.region)))

    def list_boot_volumes(request: Request) -> Response:
        fields = {**LIST_FILTERS, "volumeGroupId": "volumeGroupId"}
        return paged(request, (v for v in bs.in_region(bs.store.values("boot_volumes"), request.region)
                                if matches(v, request.query, fields)), public)

    def update_boot_volume(request: Request) -> Response:
        return Response.json(public(bs.update_boot_volume(request.params["bootVolumeId"], request.json(), request.region)))

    def delete_boot_volume(request: Request) -> Response:
        bs.delete_boot_volume(request.params["bootVolumeId"], request.region)
        return Response.empty()

    def list_policies(request: Request) -> Response:
        return paged(request, bs.policies.values(), dict)

    def get_policy(request: Request) -> Response:
        return Response.json(lookup(bs.policies, request.params["policyId"], "VolumeBackupPolicy"))

    def create_assignment(request: Request) -> Response:
        return Response.json(bs.assign_policy(request.json()))

    def get_assignment(request: Request) -> Response:
        return Response.json(lookup(bs.assignments, request.params["policyAssignmentId"], "VolumeBackupPolicyAssignment"))

    def get_asset_assignment(request: Request) -> Response:
        asset_id = require(request, "assetId")
        return paged(request, (a for a in bs.assignments.values() if a["assetId"] == asset_id), dict)

    def delete_assignment(request: Request) -> Response:
        bs.unassign_policy(request.params["policyAssignmentId"])
        return Response.empty()

    return [
        Route("POST", BASE + "/volumes", create_volume, "CreateVolume", retry_token=True),
        Route("GET", BASE + "/volumes", list_volumes, "ListVolumes"),
        Route("GET", BASE + "/volumes/{volumeId}", get_volume, "GetVolume"),
        Route("PUT", BASE + "/volumes/{volumeId}", update_volume, "UpdateVolume"),
        Route("DELETE", BASE + "/volumes/{volumeId}", delete_volume, "DeleteVolume"),
        Route("POST", BASE + "/volumeGroups", create_volume_group, "CreateVolumeGroup", retry_token=True),
        Route("GET", BASE + "/volumeGroups", list_volume_groups, "ListVolumeGroups"),
        Route("GET", BASE + "/volumeGroups/{volumeGroupId}", get_volume_group, "GetVolumeGroup"),
        Route("PUT", BASE + "/volumeGroups/{volumeGroupId}", update_volume_group, "UpdateVolumeGroup"),
        Route("DELETE", BASE + "/volumeGroups/{volumeGroupId}", delete_volume_group, "DeleteVolumeGroup"),
        Route("GET", BASE + "/bootVolumes", list_boot_volumes, "ListBootVolumes"),
        Route("GET", BASE + "/bootVolumes/{bootVolumeId}", get_boot_volume, "GetBootVolume"),
        Route("PUT", BASE + "/bootVolumes/{bootVolumeId}", update_boot_volume, "UpdateBootVolume"),
        Route("DELETE", BASE + "/bootVolumes/{bootVolumeId}", delete_boot_volume, "DeleteBootVolume"),
        Route("GET", BASE + "/volumeBackupPolicies", list_policies, "ListVolumeBackupPolicies"),
        Route("GET", BASE + "/volumeBackupPolicies/{policyId}", get_policy, "GetVolumeBackupPolicy"),
        Route("POST", BASE + "/volumeBackupPolicyAssignments", create_assignment, "CreateVolumeBackupPolicyAssignment"),
        Route("GET", BASE + "/volumeBackupPolicyAssignments", get_asset_assignment, "GetVolumeBackupPolicyAssetAssignment"),
        Route("GET", BASE + "/volumeBackupPolicyAssignments/{policyAssignmentId}", get_assignment, "GetVolumeBackupPolicyAssignment"),
        Route("DELETE", BASE + "/volumeBackupPolicyAssignments/{policyAssignmentId}", delete_assignment, "DeleteVolumeBackupPolicyAssignment"),
    ]


def backup_routes(app: "LocalOCI") -> list[Route]:
    """Volume, boot volume and volume group backups, their copies to other regions, and boot volumes restored
    from backups (volumes and volume groups are restored by their own creates)."""
    bs, backups = app.blockstorage, app.backups

    def listed(collection: str, filters: dict[str, str]) -> Callable[[Request], Response]:
        def list_backups(request: Request) -> Response:
            require(request, "compartmentId")
            records = bs.in_region(backups.store.values(collection), request.region)
            return paged(request, (b for b in records if matches(b, request.query, filters)), public)
        return list_backups

    def kind_routes(kind: Kind, path: str, name: str, filters: dict[str, str]) -> list[Route]:
        key = kind.what[0].lower() + kind.what[1:] + "Id"

        def create(request: Request) -> Response:
            return Response.json(public(backups.create(kind, request.json(), request.fail_resource, request.region)))

        def get(request: Request) -> Response:
            return Response.json(public(backups.backup(kind, request.params[key], request.region)))

        def update(request: Request) -> Response:
            return Response.json(public(backups.update(kind, request.params[key], request.json(), request.region)))

        def delete(request: Request) -> Response:
            backups.delete(kind, request.params[key], request.region)
            return Response.empty()

        def copy(request: Request) -> Response:
            return Response.json(public(backups.copy(kind, request.params[key], request.json(), request.fail_resource,
                                                     request.region)))

        return [
            Route("POST", f"{BASE}/{path}", create, f"Create{name}", retry_token=True),
            Route("GET", f"{BASE}/{path}", listed(kind.collection, filters), f"List{name}s"),
            Route("GET", f"{BASE}/{path}/{{{key}}}", get, f"Get{name}"),
            Route("PUT", f"{BASE}/{path}/{{{key}}}", update, f"Update{name}"),
            Route("DELETE", f"{BASE}/{path}/{{{key}}}", delete, f"Delete{name}"),
            Route("POST", f"{BASE}/{path}/{{{key}}}/actions/copy", copy, f"Copy{name}", retry_token=True),
        ]

    def create_group_backup(request: Request) -> Response:
        return Response.json(public(backups.create_group(request.json(), request.fail_resource, request.region)))

    def get_group_backup(request: Request) -> Response:
        return Response.json(public(backups.group_backup(request.params["volumeGroupBackupId"], request.region)))

    def update_group_backup(request: Request) -> Response:
        return Response.json(public(backups.update_group(request.params["volumeGroupBackupId"], request.json(),
                                                         request.region)))

    def delete_group_backup(request: Request) -> Response:
        backups.delete_group(request.params["volumeGroupBackupId"], request.region)
        return Response.empty()

    def copy_group_backup(request: Request) -> Response:
        return Response.json(public(backups.copy_group(request.params["volumeGroupBackupId"], request.json(),
                                                       request.fail_resource, request.region)))

    def create_boot_volume(request: Request) -> Response:
        return Response.json(public(backups.restore_boot_volume(request.json(), request.fail_resource, request.region)))

    common = {"displayName": "displayName", "lifecycleState": "lifecycleState"}
    group_path = BASE + "/volumeGroupBackups"
    return [
        *kind_routes(VOLUME, "volumeBackups", "VolumeBackup",
                     {**common, "volumeId": "volumeId", "sourceVolumeBackupId": "sourceVolumeBackupId"}),
        *kind_routes(BOOT, "bootVolumeBackups", "BootVolumeBackup",
                     {**common, "bootVolumeId": "bootVolumeId", "sourceBootVolumeBackupId": "sourceBootVolumeBackupId"}),
        Route("POST", group_path, create_group_backup, "CreateVolumeGroupBackup", retry_token=True),
        Route("GET", group_path, listed(GROUP, {**common, "volumeGroupId": "volumeGroupId"}), "ListVolumeGroupBackups"),
        Route("GET", group_path + "/{volumeGroupBackupId}", get_group_backup, "GetVolumeGroupBackup"),
        Route("PUT", group_path + "/{volumeGroupBackupId}", update_group_backup, "UpdateVolumeGroupBackup"),
        Route("DELETE", group_path + "/{volumeGroupBackupId}", delete_group_backup, "DeleteVolumeGroupBackup"),
        Route("POST", group_path + "/{volumeGroupBackupId}/actions/copy", copy_group_backup, "CopyVolumeGroupBackup",
              retry_token=True),
        Route("POST", BASE + "/bootVolumes", create_boot_volume, "CreateBootVolume", retry_token=True),
    ]
