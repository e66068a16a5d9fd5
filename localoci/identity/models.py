"""Identity: the availability and fault domains of the local region."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import invalid_parameter

if TYPE_CHECKING:
    from ..app import LocalOCI

AD_COUNT = 3
FAULT_DOMAINS = ("FAULT-DOMAIN-1", "FAULT-DOMAIN-2", "FAULT-DOMAIN-3")


class Identity:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app

    def availability_domains(self) -> list[dict[str, Any]]:
        return [
            {"name": f"local:LOCAL-AD-{n}", "id": f"ocid1.availabilitydomain.oc1..local-ad-{n}", "compartmentId": self.app.tenancy_id}
            for n in range(1, AD_COUNT + 1)
        ]

    def check_availability_domain(self, name: str | None) -> str:
        names = [ad["name"] for ad in self.availability_domains()]
        if name not in names:
            raise invalid_parameter(f"Invalid availabilityDomain {name!r}; this region has {names}.")
        return name

    def check_compartment(self, compartment_id: str | None) -> str:
        if not compartment_id or not str(compartment_id).startswith(("ocid1.compartment.", "ocid1.tenancy.")):
            raise invalid_parameter(f"Invalid compartmentId {compartment_id!r}.")
        return compartment_id

    def fault_domains(self, availability_domain: str) -> list[dict[str, Any]]:
        self.check_availability_domain(availability_domain)
        return [
            {"name": fd, "id": f"ocid1.faultdomain.oc1..{availability_domain.split(':')[-1].lower()}-{fd.lower()}",
             "compartmentId": self.app.tenancy_id, "availabilityDomain": availability_domain}
            for fd in FAULT_DOMAINS
        ]
