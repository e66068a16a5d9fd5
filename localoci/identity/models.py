"""Identity: the availability and fault domains of each local region (see ``localoci/regions.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import invalid_parameter
from ..regions import availability_domain_names

if TYPE_CHECKING:
    from ..app import LocalOCI

AD_COUNT = 3
FAULT_DOMAINS = ("FAULT-DOMAIN-1", "FAULT-DOMAIN-2", "FAULT-DOMAIN-3")


class Identity:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app

    def availability_domains(self, region: str | None = None) -> list[dict[str, Any]]:
        """The availability domains of ``region`` (None: the home region)."""
        region = region or self.app.home_region
        return [
            {"name": name, "id": f"ocid1.availabilitydomain.oc1..{name.split(':')[-1].lower()}",
             "compartmentId": self.app.tenancy_id}
            for name in availability_domain_names(region, self.app.home_region, AD_COUNT)
        ]

    def check_availability_domain(self, name: str | None, region: str | None = None) -> str:
        names = [ad["name"] for ad in self.availability_domains(region)]
        if name not in names:
            raise invalid_parameter(f"Invalid availabilityDomain {name!r}; this region has {names}.")
        return name

    def check_compartment(self, compartment_id: str | None) -> str:
        if not compartment_id or not str(compartment_id).startswith(("ocid1.compartment.", "ocid1.tenancy.")):
            raise invalid_parameter(f"Invalid compartmentId {compartment_id!r}.")
        return compartment_id

    def fault_domains(self, availability_domain: str, region: str | None = None) -> list[dict[str, Any]]:
        self.check_availability_domain(availability_domain, region)
        return [
            {"name": fd, "id": f"ocid1.faultdomain.oc1..{availability_domain.split(':')[-1].lower()}-{fd.lower()}",
             "compartmentId": self.app.tenancy_id, "availabilityDomain": availability_domain}
            for fd in FAULT_DOMAINS
        ]
