"""Compute: instances (real sshd workers), images, shapes, devices and volume attachments."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from ..errors import ServiceError, conflict, incorrect_state, invalid_parameter
from ..ids import new_ocid, now_iso
from ..resources import lookup
from .sshd import SshdHost, host_keys_from_cloud_config, parse_user_data

if TYPE_CHECKING:
    from ..app import LocalOCI

log = logging.getLogger("localoci.compute")

WORKER_IMAGE_ID = "ocid1.image.oc1..localoci-worker"
SHAPES = {
    "VM.Standard.E4.Flex": {"ocpus": 1, "memoryInGBs": 16, "flexible": True},
    "VM.Standard.E5.Flex": {"ocpus": 1, "memoryInGBs": 12, "flexible": True},
    "VM.Standard3.Flex": {"ocpus": 1, "memoryInGBs": 16, "flexible": True},
    "VM.Standard2.1": {"ocpus": 1, "memoryInGBs": 15, "flexible": False},
}
DEVICE_NAMES = [f"/dev/oracleoci/oraclevd{c}" for c in "bcdefghijklmnopqrstuvwxyz"]
ATTACHMENT_TYPES = ("paravirtualized", "iscsi", "emulated")
LIVE_ATTACHMENT_STATES = ("ATTACHING", "ATTACHED", "DETACHING")
ENDED_INSTANCE_STATES = ("TERMINATING", "TERMINATED")


class Compute:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app
        self.store = app.store
        self.instances = self.store.collection("instances")
        self.attachments = self.store.collection("volume_attachments")
        self.images = {
            WORKER_IMAGE_ID: {
                "id": WORKER_IMAGE_ID, "displayName": "localoci-worker", "compartmentId": None,
                "operatingSystem": "Debian", "operatingSystemVersion": "12", "lifecycleState": "AVAILABLE",
                "sizeInMBs": 47694, "timeCreated": "2026-01-01T00:00:00.000Z", "launchMode": "PARAVIRTUALIZED",
                "freeformTags": {}, "definedTags": {},
            }
        }
        self.hosts: dict[str, SshdHost] = {}
        self._hosts_lock = threading.Lock()

    # -- instances -------------------------------------------------------------

    def instance(self, instance_id: str) -> dict[str, Any]:
        return lookup(self.instances, instance_id, "Instance")

    def _host(self, instance: dict[str, Any]) -> SshdHost:
        with self._hosts_lock:
            host = self.hosts.get(instance["id"])
            if host is None:
                host = SshdHost(self.app.data_dir / "instances" / instance["id"].rsplit(".", 1)[-1],
                                instance["_address"], self.app.meta["ssh_port"],
                                memory_gb=instance.get("shapeConfig", {}).get("memoryInGBs"))
                self.hosts[instance["id"]] = host
            return host

    def _allocate_address(self) -> str:
        """A loopback address no live instance uses and whose ssh port is free."""
        used = {i["_address"] for i in self.instances.values() if i["lifecycleState"] != "TERMINATED"}
        start = self.app.meta.get("next_host", 2)
        port = self.app.meta["ssh_port"]
        for offset in range(2**24 - 3):
            n = 2 + (start - 2 + offset) % (2**24 - 3)
            address = str(ipaddress.IPv4Address("127.0.0.0") + n)
            if address in used or not _port_free(address, port):
                continue
            self.app.meta["next_host"] = n + 1
            return address
        raise ServiceError(500, "InternalError", "Out of host capacity.")

    def launch(self, details: dict[str, Any], fails: bool = False) -> dict[str, Any]:
        """A new PROVISIONING instance; it boots RUNNING, or ends TERMINATED if it ``fails`` (an injected fault)."""
        identity = self.app.identity
        compartment = identity.check_compartment(details.get("compartmentId"))
        ad = identity.check_availability_domain(details.get("availabilityDomain"))
        shape = details.get("shape")
        if shape not in SHAPES:
            raise invalid_parameter(f"Unknown shape {shape!r}; the local OCI offers {sorted(SHAPES)}.")
        shape_config = details.get("shapeConfig") or {}
        if shape_config and not SHAPES[shape]["flexible"]:
            raise invalid_parameter(f"Shape {shape} is not flexible; shapeConfig is not allowed.")
        ocpus = shape_config.get("ocpus", SHAPES[shape]["ocpus"])
        memory = shape_config.get("memoryInGBs", SHAPES[shape]["memoryInGBs"])
        if not isinstance(ocpus, (int, float)) or not 1 <= ocpus <= 64:
            raise invalid_parameter(f"shapeConfig.ocpus must be from 1 to 64, not {ocpus!r}.")
        source = details.get("sourceDetails") or {}
        image_id = source.get("imageId") or details.get("imageId")
        if source and source.get("sourceType") != "image":
            raise invalid_parameter("sourceDetails.sourceType must be 'image'.")
        lookup(self.images, image_id or "", "Image")
        vnic_details = details.get("createVnicDetails") or {}
        subnet = self.app.network.subnet(vnic_details.get("subnetId") or details.get("subnetId") or "")
        fault_domain = details.get("faultDomain") or "FAULT-DOMAIN-1"
        if fault_domain not in {fd["name"] for fd in identity.fault_domains(ad)}:
            raise invalid_parameter(f"Invalid faultDomain {fault_domain!r}.")
        metadata = dict(details.get("metadata") or {})
        host_keys = host_keys_from_cloud_config(parse_user_data(metadata.get("user_data")))
        instance_id = new_ocid("instance")
        with self.store.lock:
            address = self._allocate_address()
            instance = {
                "id": instance_id, "compartmentId": compartment, "availabilityDomain": ad, "faultDomain": fault_domain,
                "displayName": details.get("displayName") or f"instance-{instance_id[-8:]}", "shape": shape,
                "shapeConfig": {"ocpus": float(ocpus), "memoryInGBs": float(memory)}, "region": "local-1",
                "imageId": image_id, "sourceDetails": {"sourceType": "image", "imageId": image_id,
                                                       "bootVolumeSizeInGBs": source.get("bootVolumeSizeInGBs")},
                "lifecycleState": "PROVISIONING", "timeCreated": now_iso(), "metadata": metadata,
                "extendedMetadata": details.get("extendedMetadata") or {},
                "freeformTags": details.get("freeformTags") or {}, "definedTags": details.get("definedTags") or {},
                "launchMode": "PARAVIRTUALIZED", "_address": address, "_crashed": False, "_fails": fails,
            }
            self.app.network.create_instance_vnic(instance, subnet, address, bool(vnic_details.get("assignPublicIp", False)))
            self.instances[instance_id] = instance
            self.store.save()
        self._host(instance).prepare(metadata.get("ssh_authorized_keys", ""), host_keys, instance_id)
        self.app.scheduler.transition("instance:RUNNING", lambda: self._provision(instance_id))
        return instance

    def _provision(self, instance_id: str) -> None:
        with self.store.lock:
            instance = self.instances[instance_id]
            fails = instance.get("_fails") and instance["lifecycleState"] == "PROVISIONING"
        if fails:
            self._finish_termination(instance_id)
        else:
            self._boot(instance_id, "PROVISIONING")

    def _boot(self, instance_id: str, expected: str) -> None:
        with self.store.lock:
            instance = self.instances[instance_id]
            if instance["lifecycleState"] != expected:
                return
        host = self._host(instance)
        try:
            host.start()
        except Exception:
            log.exception("instance %s failed to boot", instance_id)
            with self.store.lock:
                instance["lifecycleState"] = "STOPPED"
                self.store.save()
            return
        with self.store.lock:
            if instance["lifecycleState"] == expected:
                instance["lifecycleState"] = "RUNNING"
                instance["_crashed"] = False
                self.store.save()
                return
        host.stop()

    def terminate(self, instance_id: str) -> None:
        with self.store.lock:
            instance = self.instance(instance_id)
            if instance["lifecycleState"] in ENDED_INSTANCE_STATES:
                return
            instance["lifecycleState"] = "TERMINATING"
            for attachment in self.attachments.values():
                if attachment["instanceId"] == instance_id and attachment["lifecycleState"] in LIVE_ATTACHMENT_STATES:
                    attachment["lifecycleState"] = "DETACHING"
            self.store.save()
        self.app.scheduler.transition("instance:TERMINATED", lambda: self._finish_termination(instance_id))

    def _finish_termination(self, instance_id: str) -> None:
        self._host(self.instances[instance_id]).stop()
        with self.store.lock:
            instance = self.instances[instance_id]
            for attachment in self.attachments.values():
                if attachment["instanceId"] == instance_id and attachment["lifecycleState"] in LIVE_ATTACHMENT_STATES:
                    attachment["lifecycleState"] = "DETACHED"
            self.app.network.release_instance_vnics(instance_id)
            instance["lifecycleState"] = "TERMINATED"
            instance["timeTerminated"] = now_iso()
            self.store.save()
        with self._hosts_lock:
            self.hosts.pop(instance_id, None)

    def action(self, instance_id: str, action: str) -> dict[str, Any]:
        with self.store.lock:
            instance = self.instance(instance_id)
            state = instance["lifecycleState"]
            if action in ("STOP", "SOFTSTOP"):
                if state != "RUNNING":
                    raise incorrect_state(f"Instance {instance_id} is {state}; only a RUNNING instance can stop.")
                instance["lifecycleState"] = "STOPPING"
                self.app.scheduler.transition("instance:STOPPED", lambda: self._stop(instance_id))
            elif action == "START":
                if state != "STOPPED":
                    raise incorrect_state(f"Instance {instance_id} is {state}; only a STOPPED instance can start.")
                instance["lifecycleState"] = "STARTING"
                self.app.scheduler.transition("instance:RUNNING", lambda: self._boot(instance_id, "STARTING"))
            elif action in ("RESET", "SOFTRESET", "REBOOTMIGRATE"):
                if state != "RUNNING":
                    raise incorrect_state(f"Instance {instance_id} is {state}; only a RUNNING instance can reset.")
                instance["lifecycleState"] = "STARTING"
                self._host(instance).stop()
                self.app.scheduler.transition("instance:RUNNING", lambda: self._boot(instance_id, "STARTING"))
            else:
                raise invalid_parameter(f"Unknown instance action {action!r}.")
            self.store.save()
            return instance

    def _stop(self, instance_id: str) -> None:
        self._host(self.instances[instance_id]).stop()
        with self.store.lock:
            if self.instances[instance_id]["lifecycleState"] == "STOPPING":
                self.instances[instance_id]["lifecycleState"] = "STOPPED"
                self.store.save()

    def crash(self, instance_id: str) -> dict[str, Any]:
        """Kill the instance's sshd and sessions; the instance stays RUNNING but unreachable."""
        with self.store.lock:
            instance = self.instance(instance_id)
            if instance["lifecycleState"] != "RUNNING":
                raise incorrect_state(f"Instance {instance_id} is {instance['lifecycleState']}; only a RUNNING instance can crash.")
            instance["_crashed"] = True
            self.store.save()
        self._host(instance).crash()
        return instance

    def resume(self) -> None:
        """Restart the sshd of every instance that was running when the last process stopped."""
        for instance in self.store.values("instances"):
            state = instance["lifecycleState"]
            if state == "RUNNING" and not instance["_crashed"]:
                instance["lifecycleState"] = "STARTING"
                self._boot(instance["id"], "STARTING")
            elif state == "PROVISIONING":
                self._provision(instance["id"])
            elif state == "STARTING":
                self._boot(instance["id"], state)
            elif state == "TERMINATING":
                self._finish_termination(instance["id"])
            elif state == "STOPPING":
                self._stop(instance["id"])
        for attachment in self.store.values("volume_attachments"):
            if attachment["lifecycleState"] == "ATTACHING":
                self._set_attachment_state(attachment["id"], "ATTACHING", "ATTACHED")
            elif attachment["lifecycleState"] == "DETACHING":
                self._set_attachment_state(attachment["id"], "DETACHING", "DETACHED")

    def shutdown(self) -> None:
        """Stop every sshd of this process; the instances' states stay as they are."""
        with self._hosts_lock:
            hosts = list(self.hosts.values())
        for host in hosts:
            host.stop()

    # -- devices and volume attachments ------------------------------------------

    def devices(self, instance_id: str) -> list[dict[str, Any]]:
        self.instance(instance_id)
        used = {a.get("_consistentDevice") for a in self.attachments.values()
                if a["instanceId"] == instance_id and a["lifecycleState"] in LIVE_ATTACHMENT_STATES}
        return [{"name": name, "isAvailable": name not in used} for name in DEVICE_NAMES]

    def attach(self, details: dict[str, Any]) -> dict[str, Any]:
        kind = details.get("type")
        if kind not in ATTACHMENT_TYPES:
            raise invalid_parameter(f"type must be one of {ATTACHMENT_TYPES}, not {kind!r}.")
        with self.store.lock:
            instance = self.instance(details.get("instanceId") or "")
            volume = self.app.blockstorage.volume(details.get("volumeId") or "")
            if instance["lifecycleState"] != "RUNNING":
                raise incorrect_state(f"Instance {instance['id']} is {instance['lifecycleState']}, not RUNNING.")
            if volume["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume {volume['id']} is {volume['lifecycleState']}, not AVAILABLE.")
            if volume["availabilityDomain"] != instance["availabilityDomain"]:
                raise invalid_parameter(f"Volume {volume['id']} is in {volume['availabilityDomain']} but the instance is in {instance['availabilityDomain']}.")
            live = [a for a in self.attachments.values() if a["volumeId"] == volume["id"] and a["lifecycleState"] in LIVE_ATTACHMENT_STATES]
            if any(a["instanceId"] == instance["id"] for a in live):
                raise conflict(f"Volume {volume['id']} is already attached to instance {instance['id']}.")
            if live and not (details.get("isShareable") and all(a["isShareable"] for a in live)):
                raise conflict(f"Volume {volume['id']} is already attached to another instance.")
            device = details.get("device")
            if device is not None:
                free = {d["name"] for d in self.devices(instance["id"]) if d["isAvailable"]}
                if device not in free:
                    raise invalid_parameter(f"Device {device!r} is not an available device of instance {instance['id']}.")
            attachment_id = new_ocid("volumeattachment")
            attachment = {
                "id": attachment_id, "attachmentType": kind, "availabilityDomain": instance["availabilityDomain"],
                "compartmentId": instance["compartmentId"], "instanceId": instance["id"], "volumeId": volume["id"],
                # Locally the "device" is the volume's backing file, which commands on the worker open directly.
                "device": str(self.app.blockstorage.backing_file(volume)),
                "displayName": details.get("displayName") or f"attachment-{attachment_id[-8:]}",
                "isReadOnly": bool(details.get("isReadOnly", False)), "isShareable": bool(details.get("isShareable", False)),
                "isPvEncryptionInTransitEnabled": False, "isMultipath": False, "isVolumeCreatedDuringLaunch": False,
                "lifecycleState": "ATTACHING", "timeCreated": now_iso(), "_consistentDevice": device,
            }
            if kind == "iscsi":
                attachment.update({
                    "ipv4": "127.0.0.1", "port": 3260, "iqn": f"iqn.2015-12.com.oracleiaas:{volume['id'][-24:]}",
                    "chapUsername": None, "chapSecret": None, "encryptionInTransitType": "NONE",
                })
                if details.get("useChap"):
                    attachment["chapUsername"] = attachment_id
                    attachment["chapSecret"] = new_ocid("chap")[-24:]
            self.attachments[attachment_id] = attachment
            self.store.save()
        self.app.scheduler.transition("attachment:ATTACHED", lambda: self._set_attachment_state(attachment_id, "ATTACHING", "ATTACHED"))
        return attachment

    def _set_attachment_state(self, attachment_id: str, expected: str, state: str) -> None:
        with self.store.lock:
            attachment = self.attachments[attachment_id]
            if attachment["lifecycleState"] == expected:
                attachment["lifecycleState"] = state
                self.store.save()

    def attachment(self, attachment_id: str) -> dict[str, Any]:
        return lookup(self.attachments, attachment_id, "VolumeAttachment")

    def detach(self, attachment_id: str) -> None:
        with self.store.lock:
            attachment = self.attachment(attachment_id)
            if attachment["lifecycleState"] != "ATTACHED":
                raise incorrect_state(f"Volume attachment {attachment_id} is {attachment['lifecycleState']}, not ATTACHED.")
            attachment["lifecycleState"] = "DETACHING"
            self.store.save()
        self.app.scheduler.transition("attachment:DETACHED", lambda: self._set_attachment_state(attachment_id, "DETACHING", "DETACHED"))


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True
