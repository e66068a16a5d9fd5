"""Compute: instances (real sshd workers, or their own disk under qemu), images, shapes, devices,
volume and boot volume attachments, and console histories."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ServiceError, conflict, incorrect_state, invalid_parameter, precondition_failed
from ..ids import new_ocid, now_iso
from ..resources import lookup, public
from .machine import BOOT_VOLUME_TYPES, FIRMWARES, NETWORK_TYPES, MachineHost
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
# What a launch from a platform image gets; a launch from a boot volume may say otherwise.
IMAGE_LAUNCH_OPTIONS = {"firmware": "UEFI_64", "bootVolumeType": "PARAVIRTUALIZED", "networkType": "PARAVIRTUALIZED",
                        "remoteDataVolumeType": "PARAVIRTUALIZED", "isPvEncryptionInTransitEnabled": False,
                        "isConsistentVolumeNamingEnabled": True}
CONSOLE_HISTORY_BYTES = 1024 * 1024  # what one capture keeps, as OCI's


class Compute:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app
        self.store = app.store
        self.instances = self.store.collection("instances")
        self.attachments = self.store.collection("volume_attachments")
        self.boot_attachments = self.store.collection("boot_volume_attachments")
        self.console_histories = self.store.collection("console_histories")
        self.images = {
            WORKER_IMAGE_ID: {
                "id": WORKER_IMAGE_ID, "displayName": "localoci-worker", "compartmentId": None,
                "operatingSystem": "Debian", "operatingSystemVersion": "12", "lifecycleState": "AVAILABLE",
                "sizeInMBs": 47694, "timeCreated": "2026-01-01T00:00:00.000Z", "launchMode": "PARAVIRTUALIZED",
                "freeformTags": {}, "definedTags": {},
            }
        }
        self.hosts: dict[str, SshdHost | MachineHost] = {}
        self._hosts_lock = threading.Lock()

    # -- instances -------------------------------------------------------------

    def instance(self, instance_id: str) -> dict[str, Any]:
        return lookup(self.instances, instance_id, "Instance")

    def _host(self, instance: dict[str, Any]) -> SshdHost | MachineHost:
        with self._hosts_lock:
            host = self.hosts.get(instance["id"])
            if host is None:
                directory = self.app.data_dir / "instances" / instance["id"].rsplit(".", 1)[-1]
                if instance.get("_body") == "machine":
                    host = MachineHost(directory, lambda: self._boot_file(instance["id"]), instance["launchOptions"],
                                       lambda: self._data_files(instance["id"]), instance["_address"],
                                       self.app.meta["ssh_port"], lambda: self.metadata_document(instance["id"]))
                else:
                    host = SshdHost(directory, instance["_address"], self.app.meta["ssh_port"],
                                    memory_gb=instance.get("shapeConfig", {}).get("memoryInGBs"))
                self.hosts[instance["id"]] = host
            return host

    def metadata_document(self, instance_id: str) -> dict[str, Any]:
        """What the instance metadata service answers the instance (OCI's ``/opc/v2/instance/``)."""
        instance = self.instances[instance_id]
        return {
            "id": instance["id"], "displayName": instance["displayName"], "compartmentId": instance["compartmentId"],
            "availabilityDomain": instance["availabilityDomain"], "faultDomain": instance["faultDomain"],
            "region": instance["region"], "canonicalRegionName": instance["region"], "shape": instance["shape"],
            "shapeConfig": instance["shapeConfig"], "image": instance.get("imageId"), "state": "Running",
            "timeCreated": instance["timeCreated"], "metadata": dict(instance.get("metadata") or {}),
            "extendedMetadata": dict(instance.get("extendedMetadata") or {}),
            "freeformTags": dict(instance.get("freeformTags") or {}),
        }

    def _boot_attachment(self, instance_id: str) -> dict[str, Any] | None:
        return next((a for a in self.boot_attachments.values()
                     if a["instanceId"] == instance_id and a["lifecycleState"] in LIVE_ATTACHMENT_STATES), None)

    def _boot_file(self, instance_id: str) -> Any:
        attachment = self._boot_attachment(instance_id)
        if attachment is None:
            raise incorrect_state(f"Instance {instance_id} has no boot volume attached.")
        return self.app.blockstorage.volume_file(attachment["bootVolumeId"])

    def _data_files(self, instance_id: str) -> list[tuple[Any, bool]]:
        return [(self.app.blockstorage.volume_file(a["volumeId"]), a["isReadOnly"]) for a in self.attachments.values()
                if a["instanceId"] == instance_id and a["lifecycleState"] == "ATTACHED"]

    def ocpus_at(self, address: str) -> float | None:
        """The OCPUs of the live instance at ``address``, if there is one."""
        return next((i["shapeConfig"]["ocpus"] for i in self.store.values("instances")
                     if i["_address"] == address and i["lifecycleState"] != "TERMINATED"), None)

    def attached(self, volume_id: str) -> bool:
        """Whether a volume or boot volume is attached (as a data or a boot volume) anywhere."""
        return any(a.get("volumeId", a.get("bootVolumeId")) == volume_id and a["lifecycleState"] in LIVE_ATTACHMENT_STATES
                   for a in [*self.attachments.values(), *self.boot_attachments.values()])

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
        kind = source.get("sourceType", "image")
        image_id = source.get("imageId") or details.get("imageId")
        boot_volume = None
        if kind == "image":
            lookup(self.images, image_id or "", "Image")
            options = dict(IMAGE_LAUNCH_OPTIONS)
        elif kind == "bootVolume":
            boot_volume = self._launchable_boot_volume(source.get("bootVolumeId") or "", ad)
            image_id = boot_volume.get("imageId")
            options = {**IMAGE_LAUNCH_OPTIONS, **_launch_options(details.get("launchOptions") or {})}
        else:
            raise invalid_parameter(f"sourceDetails.sourceType must be 'image' or 'bootVolume', not {kind!r}.")
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
                "imageId": image_id, "lifecycleState": "PROVISIONING", "timeCreated": now_iso(), "metadata": metadata,
                "extendedMetadata": details.get("extendedMetadata") or {},
                "freeformTags": details.get("freeformTags") or {}, "definedTags": details.get("definedTags") or {},
                "launchMode": "PARAVIRTUALIZED" if options["bootVolumeType"] == "PARAVIRTUALIZED" else "CUSTOM",
                "launchOptions": options, "_address": address, "_crashed": False, "_fails": fails,
            }
            if boot_volume is None:
                boot_volume = self.app.blockstorage.create_boot_volume(
                    compartment, ad, f"{instance['displayName']} (Boot Volume)", source.get("bootVolumeSizeInGBs"),
                    image_id)
                instance["sourceDetails"] = {"sourceType": "image", "imageId": image_id,
                                             "bootVolumeSizeInGBs": source.get("bootVolumeSizeInGBs")}
            else:
                instance["sourceDetails"] = {"sourceType": "bootVolume", "bootVolumeId": boot_volume["id"]}
            instance["_body"] = self._body(boot_volume["id"])
            self._new_boot_attachment(instance, boot_volume["id"], "ATTACHED")
            self.app.network.create_instance_vnic(
                instance_id=instance_id, compartment_id=compartment, availability_domain=ad,
                display_name=instance["displayName"], subnet=subnet, address=address,
                assign_public_ip=bool(vnic_details.get("assignPublicIp", False)))
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
        booting = self.app.scheduler.latency.get("instance:BOOTED", 0.0)
        if booting and isinstance(host, SshdHost):
            # A real instance is RUNNING a while before its operating system answers SSH.
            with self.store.lock:
                if instance["lifecycleState"] != expected:
                    return
                instance["lifecycleState"] = "RUNNING"
                instance["_crashed"] = False
                self.store.save()
            self.app.scheduler.call_later(booting, lambda: self._start_os(instance_id, host))
            return
        try:
            host.start()
        except Exception:
            # A boot that fails leaves the instance STOPPED, unless it was terminated or stopped
            # meanwhile (the termination runs on a thread of its own, and stopping the host is
            # what made this start fail): then its state stands.
            log.exception("instance %s failed to boot", instance_id)
            with self.store.lock:
                if instance["lifecycleState"] == expected:
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

    def _start_os(self, instance_id: str, host: SshdHost | MachineHost) -> None:
        """The worker's sshd starts once its boot time (``instance:BOOTED``) has passed, unless
        the instance stopped or ended meanwhile."""
        if self.instances[instance_id]["lifecycleState"] != "RUNNING":
            return
        try:
            host.start()
        except Exception:  # like an OS that never came up: RUNNING, and SSH never answers
            log.exception("instance %s failed to boot", instance_id)
            return
        if self.instances[instance_id]["lifecycleState"] != "RUNNING":
            host.stop()

    def _body(self, boot_volume_id: str) -> str:
        """What an instance booting this boot volume runs: the worker image boots the worker (an sshd);
        any other disk boots itself under qemu."""
        return "sshd" if self.app.blockstorage.held_image(boot_volume_id) == WORKER_IMAGE_ID else "machine"

    def _launchable_boot_volume(self, boot_volume_id: str, availability_domain: str) -> dict[str, Any]:
        boot_volume = self.app.blockstorage.boot_volume(boot_volume_id)
        if boot_volume["lifecycleState"] != "AVAILABLE":
            raise incorrect_state(f"Boot volume {boot_volume_id} is {boot_volume['lifecycleState']}, not AVAILABLE.")
        if boot_volume["availabilityDomain"] != availability_domain:
            raise invalid_parameter(f"Boot volume {boot_volume_id} is in {boot_volume['availabilityDomain']}, "
                                    f"not {availability_domain}.")
        if self.attached(boot_volume_id):
            raise conflict(f"Boot volume {boot_volume_id} is attached to an instance.")
        return boot_volume

    def _new_boot_attachment(self, instance: dict[str, Any], boot_volume_id: str, state: str) -> dict[str, Any]:
        attachment_id = new_ocid("instance")  # OCI's boot volume attachments carry instance-kind OCIDs
        attachment = {
            "id": attachment_id, "availabilityDomain": instance["availabilityDomain"],
            "compartmentId": instance["compartmentId"], "instanceId": instance["id"], "bootVolumeId": boot_volume_id,
            "displayName": f"Remote boot attachment for instance {instance['id'][-8:]}", "lifecycleState": state,
            "timeCreated": now_iso(), "isPvEncryptionInTransitEnabled": False, "encryptionInTransitType": "NONE",
        }
        self.boot_attachments[attachment_id] = attachment
        return attachment

    def boot_attachment(self, attachment_id: str) -> dict[str, Any]:
        return lookup(self.boot_attachments, attachment_id, "BootVolumeAttachment")

    def attach_boot_volume(self, details: dict[str, Any]) -> dict[str, Any]:
        """AttachBootVolume: a STOPPED instance without a boot volume gets one."""
        with self.store.lock:
            instance = self.instance(details.get("instanceId") or "")
            if instance["lifecycleState"] != "STOPPED":
                raise incorrect_state(f"Instance {instance['id']} is {instance['lifecycleState']}; a boot volume "
                                      "attaches to a STOPPED instance only.")
            if self._boot_attachment(instance["id"]) is not None:
                raise conflict(f"Instance {instance['id']} already has a boot volume attached.")
            boot_volume = self._launchable_boot_volume(details.get("bootVolumeId") or "", instance["availabilityDomain"])
            attachment = self._new_boot_attachment(instance, boot_volume["id"], "ATTACHING")
            instance["_body"] = self._body(boot_volume["id"])
            self.store.save()
        with self._hosts_lock:
            self.hosts.pop(instance["id"], None)  # the next start boots what is attached now
        self.app.scheduler.transition("bootvolumeattachment:ATTACHED", lambda: self._set_state(
            self.boot_attachments, attachment["id"], "ATTACHING", "ATTACHED"))
        return attachment

    def detach_boot_volume(self, attachment_id: str) -> None:
        """DetachBootVolume: only from a STOPPED instance."""
        with self.store.lock:
            attachment = self.boot_attachment(attachment_id)
            if attachment["lifecycleState"] != "ATTACHED":
                raise incorrect_state(f"Boot volume attachment {attachment_id} is {attachment['lifecycleState']}, not ATTACHED.")
            state = self.instances[attachment["instanceId"]]["lifecycleState"]
            if state != "STOPPED":
                raise incorrect_state(f"Instance {attachment['instanceId']} is {state}; stop it before detaching its boot volume.")
            attachment["lifecycleState"] = "DETACHING"
            self.store.save()
        self.app.scheduler.transition("bootvolumeattachment:DETACHED", lambda: self._set_state(
            self.boot_attachments, attachment_id, "DETACHING", "DETACHED"))

    def _set_state(self, records: dict[str, dict[str, Any]], record_id: str, expected: str, state: str) -> None:
        with self.store.lock:
            if records[record_id]["lifecycleState"] == expected:
                records[record_id]["lifecycleState"] = state
                self.store.save()

    def update(self, instance_id: str, details: dict[str, Any], if_match: str | None,
               etag: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
        """UpdateInstance: a new display name or tags (the fields the local OCI keeps), checked
        against ``if_match`` and changed under one lock, so of two updates made from one read only
        the first succeeds."""
        unsupported = sorted(k for k, v in details.items() if v is not None and k not in UPDATABLE)
        if unsupported:
            raise invalid_parameter(f"UpdateInstance here changes only {', '.join(UPDATABLE)}, not "
                                    f"{', '.join(unsupported)}.")
        with self.store.lock:
            instance = self.instance(instance_id)
            if instance["lifecycleState"] in ("TERMINATING", "TERMINATED"):
                raise incorrect_state(f"Instance {instance_id} is {instance['lifecycleState']}.")
            if if_match and if_match != "*" and if_match != etag(public(instance)):
                raise precondition_failed(f"The If-Match header {if_match!r} does not match the instance's ETag.")
            for key in UPDATABLE:
                if details.get(key) is not None:
                    instance[key] = details[key]
            self.store.save()
            return instance

    def terminate(self, instance_id: str, preserve_boot_volume: bool = False) -> None:
        with self.store.lock:
            instance = self.instance(instance_id)
            if instance["lifecycleState"] in ENDED_INSTANCE_STATES:
                return
            instance["lifecycleState"] = "TERMINATING"
            instance["_preserveBootVolume"] = bool(preserve_boot_volume)
            for attachment in [*self.attachments.values(), *self.boot_attachments.values()]:
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
                    self._released(attachment)
            for attachment in self.boot_attachments.values():
                if attachment["instanceId"] == instance_id and attachment["lifecycleState"] in LIVE_ATTACHMENT_STATES:
                    attachment["lifecycleState"] = "DETACHED"
                    self._released(attachment)
                    if not instance.get("_preserveBootVolume"):
                        self.app.blockstorage.terminate_with_instance(attachment["bootVolumeId"])
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
                if self._boot_attachment(instance_id) is None:
                    raise incorrect_state(f"Instance {instance_id} has no boot volume attached; attach one to start it.")
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
        for attachment in [*self.store.values("volume_attachments"), *self.store.values("boot_volume_attachments")]:
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

    def inventory(self, wanted: Callable[[dict[str, Any]], bool],
                  shown: Callable[[dict[str, Any]], bool]) -> dict[str, list[dict[str, Any]]]:
        """The instances ``wanted``, with where their SSH answers and whether they crashed, and the volume and
        boot volume attachments ``shown``, for the admin inventory."""
        return {
            "instances": [{**public(i), "sshAddress": i["_address"], "sshPort": self.app.meta["ssh_port"],
                           "crashed": i["_crashed"]} for i in self.store.values("instances") if wanted(i)],
            "attachments": [public(a) for a in self.store.values("volume_attachments") if shown(a)],
            "bootVolumeAttachments": [public(a) for a in self.store.values("boot_volume_attachments") if shown(a)],
        }

    # -- console histories ---------------------------------------------------------

    def capture_console_history(self, details: dict[str, Any]) -> dict[str, Any]:
        """CaptureConsoleHistory: a snapshot of the last MiB the instance wrote to its serial console."""
        with self.store.lock:
            instance = self.instance(details.get("instanceId") or "")
            if instance["lifecycleState"] != "RUNNING":
                raise incorrect_state(f"Instance {instance['id']} is {instance['lifecycleState']}, not RUNNING.")
            history_id = new_ocid("consolehistory")
            history = {
                "id": history_id, "availabilityDomain": instance["availabilityDomain"],
                "compartmentId": instance["compartmentId"], "instanceId": instance["id"],
                "displayName": details.get("displayName") or f"console-history-{history_id[-8:]}",
                "lifecycleState": "REQUESTED", "timeCreated": now_iso(),
                "freeformTags": details.get("freeformTags") or {}, "definedTags": details.get("definedTags") or {},
            }
            self.console_histories[history_id] = history
            self.store.save()
        self.app.scheduler.transition("consolehistory:SUCCEEDED", lambda: self._capture(history_id))
        return history

    def _console_file(self, history_id: str) -> Any:
        return self.app.data_dir / "console-histories" / (history_id.rsplit(".", 1)[-1] + ".log")

    def _capture(self, history_id: str) -> None:
        with self.store.lock:
            history = self.console_histories.get(history_id)
            if history is None or history["lifecycleState"] != "REQUESTED":
                return
            instance = self.instances[history["instanceId"]]
        host = self._host(instance) if instance["lifecycleState"] not in ENDED_INSTANCE_STATES else None
        content = host.console(CONSOLE_HISTORY_BYTES) if isinstance(host, MachineHost) else b""
        path = self._console_file(history_id)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        self._set_state(self.console_histories, history_id, "REQUESTED", "SUCCEEDED")

    def console_history(self, history_id: str) -> dict[str, Any]:
        return lookup(self.console_histories, history_id, "ConsoleHistory")

    def console_history_content(self, history_id: str, offset: int, length: int) -> bytes:
        history = self.console_history(history_id)
        if history["lifecycleState"] != "SUCCEEDED":
            raise incorrect_state(f"Console history {history_id} is {history['lifecycleState']}, not SUCCEEDED.")
        if offset < 0 or not 0 < length <= CONSOLE_HISTORY_BYTES:
            raise invalid_parameter(f"offset must be 0 or more and length from 1 to {CONSOLE_HISTORY_BYTES}.")
        with open(self._console_file(history_id), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def delete_console_history(self, history_id: str) -> None:
        with self.store.lock:
            self.console_history(history_id)
            del self.console_histories[history_id]
            self.store.save()
        self._console_file(history_id).unlink(missing_ok=True)

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
            volume = self.app.blockstorage.attachable(details.get("volumeId") or "")
            if instance["lifecycleState"] != "RUNNING":
                raise incorrect_state(f"Instance {instance['id']} is {instance['lifecycleState']}, not RUNNING.")
            if volume["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume {volume['id']} is {volume['lifecycleState']}, not AVAILABLE.")
            if volume["availabilityDomain"] != instance["availabilityDomain"]:
                raise invalid_parameter(f"Volume {volume['id']} is in {volume['availabilityDomain']} but the instance is in {instance['availabilityDomain']}.")
            if any(a["bootVolumeId"] == volume["id"] and a["lifecycleState"] in LIVE_ATTACHMENT_STATES
                   for a in self.boot_attachments.values()):
                raise conflict(f"Boot volume {volume['id']} is attached to an instance as its boot volume; detach it first.")
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
                "device": str(self.app.blockstorage.volume_file(volume["id"])),
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
            if not attachment["isReadOnly"]:
                self.app.blockstorage.attached_writable(volume["id"])
            self.store.save()
        self.app.scheduler.transition("attachment:ATTACHED", lambda: self._set_attachment_state(attachment_id, "ATTACHING", "ATTACHED"))
        return attachment

    def _set_attachment_state(self, attachment_id: str, expected: str, state: str) -> None:
        records = self.boot_attachments if attachment_id in self.boot_attachments else self.attachments
        if state == "DETACHED" and records[attachment_id]["lifecycleState"] == expected:
            self._released(records[attachment_id])  # before anyone can see it DETACHED
        self._set_state(records, attachment_id, expected, state)

    def _released(self, attachment: dict[str, Any]) -> None:
        """The attachment has ended: what the instance built on its device goes with it."""
        self.app.blockstorage.release_host_devices(attachment.get("volumeId") or attachment["bootVolumeId"])

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


UPDATABLE = ("displayName", "freeformTags", "definedTags")


def instance_etag(instance: dict[str, Any]) -> str:
    """The ETag of an instance as the API shows it: it changes whenever anything shown changes."""
    return hashlib.sha256(json.dumps(instance, sort_keys=True).encode()).hexdigest()[:32]


def _port_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _launch_options(given: dict[str, Any]) -> dict[str, Any]:
    """The launch options a launch from a boot volume asks for, checked."""
    allowed = {"firmware": FIRMWARES, "bootVolumeType": BOOT_VOLUME_TYPES, "networkType": NETWORK_TYPES,
               "remoteDataVolumeType": BOOT_VOLUME_TYPES}
    options = {}
    for key, value in given.items():
        if value is None:
            continue
        if key in allowed and value not in allowed[key]:
            raise invalid_parameter(f"launchOptions.{key} must be one of {', '.join(allowed[key])}, not {value!r}.")
        if key not in allowed and key not in IMAGE_LAUNCH_OPTIONS:
            raise invalid_parameter(f"Unknown launch option {key!r}.")
        options[key] = value
    return options
