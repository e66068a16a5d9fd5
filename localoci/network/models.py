"""Virtual networking: VCNs, subnets and the VNICs of instances.

Every VNIC's private IP is the loopback address its instance's sshd listens on,
so the address the SDK reports is the address SSH clients connect to.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from ..errors import invalid_parameter
from ..ids import new_ocid, now_iso
from ..resources import lookup

if TYPE_CHECKING:
    from ..app import LocalOCI


class Network:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app
        self.store = app.store
        self.vcns = self.store.collection("vcns")
        self.subnets = self.store.collection("subnets")
        self.vnics = self.store.collection("vnics")
        self.vnic_attachments = self.store.collection("vnic_attachments")

    def create_vcn(self, details: dict[str, Any]) -> dict[str, Any]:
        compartment = self.app.identity.check_compartment(details.get("compartmentId"))
        cidrs = details.get("cidrBlocks") or ([details["cidrBlock"]] if details.get("cidrBlock") else ["10.0.0.0/16"])
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                raise invalid_parameter(f"Invalid CIDR block {cidr!r}.") from None
        vcn = {
            "id": new_ocid("vcn"), "compartmentId": compartment, "displayName": details.get("displayName") or "vcn",
            "cidrBlock": cidrs[0], "cidrBlocks": cidrs, "dnsLabel": details.get("dnsLabel"),
            "lifecycleState": "AVAILABLE", "timeCreated": now_iso(), "freeformTags": details.get("freeformTags") or {},
        }
        with self.store.lock:
            self.vcns[vcn["id"]] = vcn
            self.store.save()
        return vcn

    def create_subnet(self, details: dict[str, Any]) -> dict[str, Any]:
        compartment = self.app.identity.check_compartment(details.get("compartmentId"))
        vcn = lookup(self.vcns, details.get("vcnId") or "", "Vcn")
        ad = details.get("availabilityDomain")
        if ad is not None:
            self.app.identity.check_availability_domain(ad)
        subnet = {
            "id": new_ocid("subnet"), "compartmentId": compartment, "vcnId": vcn["id"],
            "displayName": details.get("displayName") or "subnet", "cidrBlock": details.get("cidrBlock") or vcn["cidrBlock"],
            "availabilityDomain": ad, "prohibitPublicIpOnVnic": bool(details.get("prohibitPublicIpOnVnic", False)),
            "lifecycleState": "AVAILABLE", "timeCreated": now_iso(), "freeformTags": details.get("freeformTags") or {},
            "virtualRouterIp": "127.0.0.1", "virtualRouterMac": "00:00:00:00:00:01",
        }
        with self.store.lock:
            self.subnets[subnet["id"]] = subnet
            self.store.save()
        return subnet

    def subnet(self, subnet_id: str) -> dict[str, Any]:
        return lookup(self.subnets, subnet_id, "Subnet")

    def create_instance_vnic(self, *, instance_id: str, compartment_id: str, availability_domain: str,
                             display_name: str, subnet: dict[str, Any], address: str,
                             assign_public_ip: bool) -> dict[str, Any]:
        """The primary VNIC of a new instance and its attachment (call under the store lock)."""
        if assign_public_ip and subnet["prohibitPublicIpOnVnic"]:
            raise invalid_parameter(f"Subnet {subnet['id']} prohibits public IPs on VNICs.")
        vnic = {
            "id": new_ocid("vnic"), "compartmentId": compartment_id, "availabilityDomain": availability_domain,
            "subnetId": subnet["id"], "displayName": display_name, "isPrimary": True, "privateIp": address,
            "publicIp": address if assign_public_ip else None, "hostnameLabel": None, "macAddress": "02:00:17:00:00:01",
            "lifecycleState": "AVAILABLE", "timeCreated": now_iso(), "freeformTags": {},
        }
        attachment = {
            "id": new_ocid("vnicattachment"), "compartmentId": compartment_id,
            "availabilityDomain": availability_domain, "instanceId": instance_id, "subnetId": subnet["id"],
            "vnicId": vnic["id"], "nicIndex": 0, "displayName": None, "lifecycleState": "ATTACHED", "timeCreated": now_iso(),
        }
        self.vnics[vnic["id"]] = vnic
        self.vnic_attachments[attachment["id"]] = attachment
        return vnic

    def release_instance_vnics(self, instance_id: str) -> None:
        """Detach and delete an instance's VNICs (call under the store lock)."""
        for attachment in self.vnic_attachments.values():
            if attachment["instanceId"] == instance_id and attachment["lifecycleState"] == "ATTACHED":
                attachment["lifecycleState"] = "DETACHED"
                self.vnics[attachment["vnicId"]]["lifecycleState"] = "TERMINATED"
