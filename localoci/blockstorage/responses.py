"""Block Storage REST API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"


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
        fields = {"compartmentId": "compartmentId", "availabilityDomain": "availabilityDomain",
                  "displayName": "displayName", "lifecycleState": "lifecycleState"}
        return paged(request, (v for v in bs.volumes.values() if matches(v, request.query, fields)), public)

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
        Route("GET", BASE + "/volumeBackupPolicies", list_policies, "ListVolumeBackupPolicies"),
        Route("GET", BASE + "/volumeBackupPolicies/{policyId}", get_policy, "GetVolumeBackupPolicy"),
        Route("POST", BASE + "/volumeBackupPolicyAssignments", create_assignment, "CreateVolumeBackupPolicyAssignment"),
        Route("GET", BASE + "/volumeBackupPolicyAssignments", get_asset_assignment, "GetVolumeBackupPolicyAssetAssignment"),
        Route("GET", BASE + "/volumeBackupPolicyAssignments/{policyAssignmentId}", get_assignment, "GetVolumeBackupPolicyAssignment"),
        Route("DELETE", BASE + "/volumeBackupPolicyAssignments/{policyAssignmentId}", delete_assignment, "DeleteVolumeBackupPolicyAssignment"),
    ]
