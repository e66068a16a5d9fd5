"""Identity REST API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..http import Request, Response, Route
from ..paging import paged, require

if TYPE_CHECKING:
    from ..app import LocalOCI

BASE = "/20160918"


def routes(app: "LocalOCI") -> list[Route]:
    identity = app.identity

    def list_availability_domains(request: Request) -> Response:
        identity.check_compartment(require(request, "compartmentId"))
        return Response.json(identity.availability_domains(request.region))

    def list_fault_domains(request: Request) -> Response:
        identity.check_compartment(require(request, "compartmentId"))
        return paged(request, identity.fault_domains(require(request, "availabilityDomain"), request.region), dict)

    return [
        Route("GET", BASE + "/availabilityDomains", list_availability_domains, "ListAvailabilityDomains"),
        Route("GET", BASE + "/faultDomains", list_fault_domains, "ListFaultDomains"),
    ]
