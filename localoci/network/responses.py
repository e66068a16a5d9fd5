"""Virtual Network REST API (and the compute API's VNIC attachments): the handlers, and the route
table (``ROUTES``) that says which call each serves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import Request, Response, Route
from ..paging import paged, require
from ..resources import lookup, matches, public

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"


def create_vcn(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.network.create_vcn(request.json()))


def get_vcn(app: "LocalOCI", request: Request) -> Response:
    return Response.json(lookup(app.network.vcns, request.params["vcnId"], "Vcn"))


def list_vcns(app: "LocalOCI", request: Request) -> Response:
    compartment = require(request, "compartmentId")
    return paged(request, (v for v in app.network.vcns.values() if v["compartmentId"] == compartment), public)


def create_subnet(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.network.create_subnet(request.json()))


def get_subnet(app: "LocalOCI", request: Request) -> Response:
    return Response.json(app.network.subnet(request.params["subnetId"]))


def list_subnets(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    fields = {"compartmentId": "compartmentId", "vcnId": "vcnId"}
    return paged(request, (s for s in app.network.subnets.values() if matches(s, request.query, fields)), public)


def get_vnic(app: "LocalOCI", request: Request) -> Response:
    return Response.json(lookup(app.network.vnics, request.params["vnicId"], "Vnic"))


def list_vnic_attachments(app: "LocalOCI", request: Request) -> Response:
    require(request, "compartmentId")
    fields = {"compartmentId": "compartmentId", "instanceId": "instanceId", "vnicId": "vnicId",
              "availabilityDomain": "availabilityDomain"}
    attachments = app.network.vnic_attachments.values()
    return paged(request, (a for a in attachments if matches(a, request.query, fields)), public)


def get_vnic_attachment(app: "LocalOCI", request: Request) -> Response:
    return Response.json(lookup(app.network.vnic_attachments, request.params["vnicAttachmentId"], "VnicAttachment"))


ROUTES = [
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
