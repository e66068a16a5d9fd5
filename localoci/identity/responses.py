"""Identity REST API: the handlers, and the route table (``ROUTES``) that says which call each serves."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import Request, Response, Route
from ..paging import paged, require

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"


def list_availability_domains(app: "LocalOCI", request: Request) -> Response:
    app.identity.check_compartment(require(request, "compartmentId"))
    return Response.json(app.identity.availability_domains(request.region))


def list_fault_domains(app: "LocalOCI", request: Request) -> Response:
    app.identity.check_compartment(require(request, "compartmentId"))
    return paged(request, app.identity.fault_domains(require(request, "availabilityDomain"), request.region), dict)


ROUTES = [
    Route("GET", BASE + "/availabilityDomains", list_availability_domains, "ListAvailabilityDomains"),
    Route("GET", BASE + "/faultDomains", list_fault_domains, "ListFaultDomains"),
]
