"""Virtual Network REST API (and the compute API's VNIC attachments)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"


def routes(app: "LocalOCI") -> list[Route]:
    net = app.network

    def create_vcn(request: Request) -> Response:
        return Response.json(net.create_vcn(request.json()))

    def get_vcn(request: Request) -> Response:
        return Response.json(lookup(net.vcns, request.params["vcnId"], "Vcn"))

    def list_vcns(request: Request) -> Response:
        compartment = require(request, "compartmentId")
        return paged(request, (v for v in net.vcns.values() if v["compartmentId"] == compartment), public)

    def create_subnet(request: Request) -> Response:
        return Response.json(net.create_subnet(request.json()))

    def get_subnet(request: Request) -> Response:
        return Response.json(net.subnet(request.params["subnetId"]))

    def list_subnets(request: Request) -> Response:
        require(request, "compartmentId")
        items = (s for s in net.subnets.values() if matches(s, request.query, {"compartmentId": "compartmentId", "vcnId": "vcnId"}))
        return paged(request, items, public)

    def get_vnic(request: Request) -> Response:
        return Response.json(lookup(net.vnics, request.params["vnicId"], "Vnic"))

    def list_vnic_attachments(request: Request) -> Response:
        require(request, "compartmentId")
        fields = {"compartmentId": "compartmentId", "instanceId": "instanceId", "vnicId": "vnicId", "availabilityDomain": "availabilityDomain"}
        return paged(request, (a for a in net.vnic_attachments.values() if matches(a, request.query, fields)), public)

    def get_vnic_attachment(request: Request) -> Response:
        return Response.json(lookup(net.vnic_attachments, request.params["vnicAttachmentId"], "VnicAttachment"))

    return [
        Route("POST", BASE + "/vcns", create_vcn, "CreateVcn", retry_token=True),
        Route("GET", BASE + "/vcns", list_vcns, "ListVcns"),
        Route("GET", BASE + "/vcns/{vcnId}", get_vcn, "GetVcn"),
        Route("POST", BASE + "/subnets", create_subnet, "CreateSubnet", retry_token=True),
        Route("GET", BASE + "/subnets", list_subnets, "ListSubnets"),
        Route("GET", BASE + "/subnets/{subnetId}", get_subnet, "GetSubnet"),
        Route("GET", BASE + "/vnics/{vnicId}", get_vnic, "GetVnic"),
        Route("GET", BASE + "/vnicAttachments", list_vnic_attachments, "ListVnicAttachments"),
        Route("GET", BASE + "/vnicAttachments/{vnicAttachmentId}", get_vnic_attachment, "GetVnicAttachment"),
    ]
