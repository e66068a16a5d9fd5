"""Block Storage REST API: volumes, volume groups, backup policies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"
# List filters of volumes and volume groups: query parameter -> field.
LIST_FILTERS = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                "displayName": "displayName", "lifecycleState": "lifecycleState"}


def routes(app: "LocalOCI") -> list[Route]:
    bs = app.blockstorage

    def create_volume(request: Request) -> Response:
        return Response.json(public(bs.create_volume(request.json(), fails=request.fail_resource)))

    def get_volume(request: Request) -> Response:
        return Response.json(public(bs.volume(request.params["volumeId"])))

    def update_volume(request: Request) -> Response:
        return Response.json(public(bs.update_volume(request.params["volumeId"], request.json())))

    def delete_volume(request: Request) -> Response:
        bs.delete_volume(request.params["volumeId"])
        return Response.empty()

    def list_volumes(request: Request) -> Response:
        fields = {**LIST_FILTERS, "volumeGroupId": "volumeGroupId"}
        return paged(request, (v for v in bs.volumes.values() if matches(v, request.query, fields)), public)

    def create_volume_group(request: Request) -> Response:
        return Response.json(bs.create_volume_group(request.json()))

    def get_volume_group(request: Request) -> Response:
        return Response.json(bs.render_group(bs.volume_group(request.params["volumeGroupId"])))

    def update_volume_group(request: Request) -> Response:
        return Response.json(bs.update_volume_group(request.params["volumeGroupId"], request.json()))

    def delete_volume_group(request: Request) -> Response:
        bs.delete_volume_group(request.params["volumeGroupId"])
        return Response.empty()

    def list_volume_groups(request: Request) -> Response:
        require(request, "compartmentId")
        groups = bs.store.values("volume_groups")
        return paged(request, (g for g in groups if matches(g, request.query, LIST_FILTERS)), bs.render_group)

    def get_boot_volume(request: Request) -> Response:
        return Response.json(public(bs.boot_volume(request.params["bootVolumeId"])))

    def list_boot_volumes(request: Request) -> Response:
        fields = {**LIST_FILTERS, "volumeGroupId": "volumeGroupId"}
        return paged(request, (v for v in bs.store.values("boot_volumes") if matches(v, request.query, fields)), public)

    def update_boot_volume(request: Request) -> Response:
        return Response.json(public(bs.update_boot_volume(request.params["bootVolumeId"], request.json())))

    def delete_boot_volume(request: Request) -> Response:
        bs.delete_boot_volume(request.params["bootVolumeId"])
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
