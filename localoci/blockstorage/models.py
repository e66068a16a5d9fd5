"""Block Storage: volumes backed by sparse files, volume groups, backup policies and their assignments.

Block Storage is regional: every record holds its region (``_region``; none: the home region)
and a call finds only its own region's records, as if the others did not exist (404).
Backups, and the volumes restored from them, are in ``backups.py``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ServiceError, conflict, incorrect_state, invalid_parameter, missing_parameter
from ..ids import new_ocid, now_iso
from ..resources import lookup, public

if TYPE_CHECKING:
    from ..app import LocalOCI

GB = 1024**3
MiB = 1024**2
MIN_SIZE_GB = 50
MAX_SIZE_GB = 32768
DEFAULT_SIZE_GB = 1024
VALID_VPUS = (0, 10, 20, *range(30, 121, 10))
ORACLE_POLICIES = ("gold", "silver", "bronze")
ENDED_STATES = ("TERMINATING", "TERMINATED")
# Volume group sources that make copies of volumes the local OCI does not make (clones, replicas).
COPYING_GROUP_SOURCES = ("volumeGroupId", "volumeGroupReplicaId")
# A boot volume made by a launch from an image starts with this, a MiB of it: not zeros, as a
# platform image's boot volume is not, so a write that leaves some of it behind shows.
IMAGE_CONTENT = b"localoci platform image boot volume\n"
DEFAULT_BOOT_SIZE_GB = 47


# OCI's smallest volume is 50 GB. Tests that move whole volumes (a raw export uploads every byte)
# lower it through the admin API (``POST /_localoci/limits``); nothing else changes it.
LIMITS = {"minVolumeSizeInGBs": MIN_SIZE_GB}


def set_min_size(size_gb: Any) -> dict[str, int]:
    """Make ``size_gb`` (1 to OCI's smallest) the smallest volume size; the limits as they are now."""
    if isinstance(size_gb, bool) or not isinstance(size_gb, int) or not 1 <= size_gb <= MIN_SIZE_GB:
        raise invalid_parameter(f"minVolumeSizeInGBs must be 1 to {MIN_SIZE_GB}, not {size_gb!r}")
    LIMITS["minVolumeSizeInGBs"] = size_gb
    return dict(LIMITS)


def check_size(size_gb: Any) -> int:
    low = LIMITS["minVolumeSizeInGBs"]
    if isinstance(size_gb, bool) or not isinstance(size_gb, int) or not low <= size_gb <= MAX_SIZE_GB:
        raise invalid_parameter(f"sizeInGBs must be a whole number from {low} to {MAX_SIZE_GB}, not {size_gb!r}.")
    return size_gb


def _check_vpus(vpus: Any) -> int:
    if isinstance(vpus, bool) or not isinstance(vpus, int) or vpus not in VALID_VPUS:
        raise invalid_parameter(f"vpusPerGB must be 0, 10, 20 or 30 to 120 in steps of 10, not {vpus!r}.")
    return vpus


class BlockStorage:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app
        self.store = app.store
        self.volumes_dir = app.data_dir / "volumes"
        self.volumes_dir.mkdir(exist_ok=True)
        self.volumes = self.store.collection("volumes")
        self.assignments = self.store.collection("backup_policy_assignments")
        self.groups = self.store.collection("volume_groups")
        self.boot_volumes = self.store.collection("boot_volumes")
        self.policies = {
            f"ocid1.volumebackuppolicy.oc1..{name}": {
                "id": f"ocid1.volumebackuppolicy.oc1..{name}", "displayName": name, "compartmentId": None,
                "schedules": [], "timeCreated": "2019-01-01T00:00:00.000Z", "destinationRegion": None,
            }
            for name in ORACLE_POLICIES
        }

    def region_of(self, record: dict[str, Any]) -> str:
        return record.get("_region") or self.app.home_region

    def find(self, records: dict[str, dict[str, Any]], record_id: str, what: str, region: str | None) -> dict[str, Any]:
        """The record ``record_id`` if it is in ``region`` (None: any region); else 404, as OCI answers."""
        record = lookup(records, record_id, what)
        if region is not None and self.region_of(record) != region:
            lookup({}, record_id, what)
        return record

    def in_region(self, records: Any, region: str) -> list[dict[str, Any]]:
        """The records of ``region`` among ``records``: what a list call in it shows."""
        return [r for r in records if self.region_of(r) == region]

    def volume(self, volume_id: str, region: str | None = None) -> dict[str, Any]:
        return self.find(self.volumes, volume_id, "Volume", region)

    def attachable(self, volume_id: str, region: str | None = None) -> dict[str, Any]:
        """A block volume, or a boot volume (attachable to another instance as a data volume)."""
        if volume_id in self.boot_volumes:
            return self.boot_volume(volume_id, region)
        return self.volume(volume_id, region)

    def backing_file(self, volume: dict[str, Any]) -> Path:
        return self.volumes_dir / volume["_file"]

    def volume_file(self, volume_id: str) -> Path:
        """The file holding a volume's or boot volume's bytes (what an attachment's device is)."""
        return self.backing_file(self.attachable(volume_id))

    def release_host_devices(self, volume_id: str) -> list[str]:
        """Detach the host's loop devices over a volume's file, as its attachment ends or it is
        deleted; return their names. On OCI a loop device an instance made over an attached volume
        lives in that instance and goes with the attachment (and the instance); here instances
        share the host's kernel, and one that a killed command never detached outlived its
        "instance" and kept a deleted volume's space."""
        if volume_id not in self.volumes and volume_id not in self.boot_volumes:
            return []
        return release_loop_devices(self.backing_file(self.attachable(volume_id)))

    def held_image(self, boot_volume_id: str) -> str | None:
        """The image whose disk a boot volume holds; None once it was attached writable to another instance."""
        return self.boot_volume(boot_volume_id).get("_image")

    def attached_writable(self, volume_id: str) -> None:
        """A volume was attached read-write as a data volume: a boot volume written elsewhere no longer holds
        its image (called with the store locked)."""
        if volume_id in self.boot_volumes:
            self.boot_volumes[volume_id]["_image"] = None

    def allocated_bytes(self, volume: dict[str, Any]) -> int:
        try:
            return os.stat(self.backing_file(volume)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def create_volume(self, details: dict[str, Any], fails: bool = False, region: str | None = None) -> dict[str, Any]:
        """A new PROVISIONING volume in ``region``; it becomes AVAILABLE, or FAULTY if it ``fails`` (an injected
        fault). From ``sourceDetails`` of type volumeBackup, it holds the backup's bytes once AVAILABLE; of
        type volume, it is a clone of that volume (localoci/blockstorage/clones.py)."""
        from . import clones  # clones uses this module's sizes

        region = region or self.app.home_region
        if clones.source_type(details) == "volume":
            volume = clones.clone_volume(self.app, details, fails, region)
        elif details.get("sourceDetails"):
            volume = self.app.backups.restore_volume(details, fails, region)
        else:
            volume = self.new_volume(details, region, fails)
            with open(self.backing_file(volume), "wb") as f:
                f.truncate(volume["sizeInGBs"] * GB)
            with self.store.lock:
                self.volumes[volume["id"]] = volume
                self.store.save()
            self.app.scheduler.transition("volume:AVAILABLE", lambda: self.provisioned(volume["id"]))
        policy = details.get("backupPolicyId")
        if policy:
            self.assign_policy({"assetId": volume["id"], "policyId": policy})
        return volume

    def new_volume(self, details: dict[str, Any], region: str, fails: bool = False,
                   size_gb: int | None = None) -> dict[str, Any]:
        """The record of a new PROVISIONING volume as ``details`` ask for it (checked), not yet stored;
        of ``size_gb`` if given (a restore's, checked by it)."""
        compartment = self.app.identity.check_compartment(details.get("compartmentId"))
        ad = self.app.identity.check_availability_domain(details.get("availabilityDomain"), region)
        if size_gb is not None:
            pass
        elif details.get("sizeInGBs") is None and details.get("sizeInMBs") is not None:
            size_mb = details["sizeInMBs"]
            size_gb = check_size(size_mb // 1024 if isinstance(size_mb, int) and size_mb % 1024 == 0 else size_mb)
        else:
            size_gb = check_size(details.get("sizeInGBs", DEFAULT_SIZE_GB))
        vpus = _check_vpus(details.get("vpusPerGB", 10))
        volume_id = new_ocid("volume", region=region)
        return {
            "id": volume_id, "compartmentId": compartment, "availabilityDomain": ad,
            "displayName": details.get("displayName") or volume_id[-12:], "sizeInGBs": size_gb,
            "sizeInMBs": size_gb * 1024, "vpusPerGB": vpus, "isHydrated": True, "isAutoTuneEnabled": False,
            "lifecycleState": "PROVISIONING", "timeCreated": now_iso(), "volumeGroupId": None,
            "freeformTags": details.get("freeformTags") or {}, "definedTags": details.get("definedTags") or {},
            "_file": volume_id.rsplit(".", 1)[-1] + ".img", "_fails": fails, "_region": region,
        }

    def provisioned(self, volume_id: str) -> None:
        self.set_state(self.volumes, volume_id, "PROVISIONING", "FAULTY" if self.volumes[volume_id].get("_fails") else "AVAILABLE")

    def set_state(self, records: dict[str, dict[str, Any]], record_id: str, expected: str, state: str) -> None:
        with self.store.lock:
            record = records[record_id]
            if record["lifecycleState"] == expected:
                record["lifecycleState"] = state
                self.store.save()

    def update_volume(self, volume_id: str, details: dict[str, Any], region: str | None = None) -> dict[str, Any]:
        with self.store.lock:
            volume = self.volume(volume_id, region)
            if volume["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume {volume_id} is {volume['lifecycleState']}, not AVAILABLE.")
            if details.get("sizeInGBs") is not None:
                size = check_size(details["sizeInGBs"])
                if size < volume["sizeInGBs"]:
                    raise invalid_parameter(f"A volume cannot shrink: {size} GB is below its {volume['sizeInGBs']} GB.")
                with open(self.backing_file(volume), "r+b") as f:
                    f.truncate(size * GB)
                volume["sizeInGBs"], volume["sizeInMBs"] = size, size * 1024
            if details.get("vpusPerGB") is not None:
                volume["vpusPerGB"] = _check_vpus(details["vpusPerGB"])
            for key in ("displayName", "freeformTags", "definedTags"):
                if details.get(key) is not None:
                    volume[key] = details[key]
            self.store.save()
            return volume

    def delete_volume(self, volume_id: str, region: str | None = None) -> None:
        with self.store.lock:
            volume = self.volume(volume_id, region)
            if volume["lifecycleState"] in ENDED_STATES:
                raise incorrect_state(f"Volume {volume_id} is already {volume['lifecycleState']}.")
            if self.app.compute.attached(volume_id):
                raise conflict(f"Volume {volume_id} is attached to an instance; detach it first.")
            volume["lifecycleState"] = "TERMINATING"
            # A deleted volume leaves its volume group, which lives on with the others.
            self._leave_group(volume_id)
            for assignment_id in [a["id"] for a in self.assignments.values() if a["assetId"] == volume_id]:
                del self.assignments[assignment_id]
            self.store.save()
        self.app.scheduler.transition("volume:TERMINATED", lambda: self._terminate(volume_id))

    def _leave_group(self, volume_id: str) -> None:
        group_id = self.attachable(volume_id).get("volumeGroupId")
        if group_id:
            group = self.groups[group_id]
            self.set_members(group, [v for v in group["volumeIds"] if v != volume_id])

    def _terminate(self, volume_id: str) -> None:
        with self.store.lock:
            volume = self.volumes[volume_id]
            release_loop_devices(self.backing_file(volume))
            self.backing_file(volume).unlink(missing_ok=True)
            volume["lifecycleState"] = "TERMINATED"
            self.store.save()

    def inventory(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, list[dict[str, Any]]]:
        """The volumes, boot volumes and volume groups ``wanted``, and every backup policy assignment, for the
        admin inventory; volumes with their files and what those take on disk."""
        def entry(volume: dict[str, Any]) -> dict[str, Any]:
            return {**public(volume), "region": self.region_of(volume), "backingFile": str(self.backing_file(volume)),
                    "allocatedBytes": self.allocated_bytes(volume)}

        return {
            "volumes": [entry(v) for v in self.store.values("volumes") if wanted(v)],
            "bootVolumes": [entry(v) for v in self.store.values("boot_volumes") if wanted(v)],
            "volumeGroups": [{**self.render_group(g), "region": self.region_of(g)}
                             for g in self.store.values("volume_groups") if wanted(g)],
            "backupPolicyAssignments": list(self.store.values("backup_policy_assignments")),
        }

    # -- boot volumes ----------------------------------------------------------------

    def boot_volume(self, boot_volume_id: str, region: str | None = None) -> dict[str, Any]:
        return self.find(self.boot_volumes, boot_volume_id, "BootVolume", region)

    def create_boot_volume(self, compartment: str, availability_domain: str, display_name: str, size_gb: Any,
                           image_id: str) -> dict[str, Any]:
        """The boot volume a launch from ``image_id`` makes (called with the store locked)."""
        size_gb = DEFAULT_BOOT_SIZE_GB if size_gb is None else check_size(size_gb)
        boot_volume = self.new_boot_volume(compartment, availability_domain, {"displayName": display_name}, size_gb,
                                           image_id, self.app.home_region)
        boot_volume_id = boot_volume["id"]
        with open(self.backing_file(boot_volume), "wb") as f:
            f.write(IMAGE_CONTENT * (MiB // len(IMAGE_CONTENT)))
            f.truncate(size_gb * GB)
        self.boot_volumes[boot_volume_id] = boot_volume
        self.app.scheduler.transition("bootvolume:AVAILABLE", lambda: self.boot_volume_provisioned(boot_volume_id))
        return boot_volume

    @staticmethod
    def new_boot_volume(compartment: str, ad: str, details: dict[str, Any], size_gb: int, image_id: str | None,
                        region: str, fails: bool = False) -> dict[str, Any]:
        """The record of a new PROVISIONING boot volume holding ``image_id``'s disk, not yet stored."""
        boot_volume_id = new_ocid("bootvolume", region=region)
        return {
            "id": boot_volume_id, "compartmentId": compartment, "availabilityDomain": ad,
            "displayName": details.get("displayName") or boot_volume_id[-12:], "sizeInGBs": size_gb,
            "sizeInMBs": size_gb * 1024, "imageId": image_id, "vpusPerGB": _check_vpus(details.get("vpusPerGB", 10)),
            "isHydrated": True, "lifecycleState": "PROVISIONING", "timeCreated": now_iso(), "volumeGroupId": None,
            "freeformTags": details.get("freeformTags") or {}, "definedTags": details.get("definedTags") or {},
            "_file": "boot-" + boot_volume_id.rsplit(".", 1)[-1] + ".img", "_image": image_id, "_region": region,
            "_fails": fails,
        }

    def boot_volume_provisioned(self, boot_volume_id: str) -> None:
        state = "FAULTY" if self.boot_volumes[boot_volume_id].get("_fails") else "AVAILABLE"
        self.set_state(self.boot_volumes, boot_volume_id, "PROVISIONING", state)

    def update_boot_volume(self, boot_volume_id: str, details: dict[str, Any], region: str | None = None) -> dict[str, Any]:
        with self.store.lock:
            boot_volume = self.boot_volume(boot_volume_id, region)
            if boot_volume["lifecycleState"] in ENDED_STATES:
                raise incorrect_state(f"Boot volume {boot_volume_id} is {boot_volume['lifecycleState']}.")
            if details.get("vpusPerGB") is not None:
                boot_volume["vpusPerGB"] = _check_vpus(details["vpusPerGB"])
            for key in ("displayName", "freeformTags", "definedTags"):
                if details.get(key) is not None:
                    boot_volume[key] = details[key]
            self.store.save()
            return boot_volume

    def delete_boot_volume(self, boot_volume_id: str, region: str | None = None) -> None:
        with self.store.lock:
            boot_volume = self.boot_volume(boot_volume_id, region)
            if boot_volume["lifecycleState"] in ENDED_STATES:
                raise incorrect_state(f"Boot volume {boot_volume_id} is already {boot_volume['lifecycleState']}.")
            if self.app.compute.attached(boot_volume_id):
                raise conflict(f"Boot volume {boot_volume_id} is attached to an instance; detach it first.")
            boot_volume["lifecycleState"] = "TERMINATING"
            self._leave_group(boot_volume_id)
            self.store.save()
        self.app.scheduler.transition("bootvolume:TERMINATED", lambda: self.terminate_boot_volume(boot_volume_id))

    def terminate_with_instance(self, boot_volume_id: str) -> None:
        """The instance a boot volume booted ended without preserving it: an AVAILABLE boot volume ends too
        (called with the store locked)."""
        boot_volume = self.boot_volumes[boot_volume_id]
        if boot_volume["lifecycleState"] == "AVAILABLE":
            boot_volume["lifecycleState"] = "TERMINATING"
            self.app.scheduler.transition("bootvolume:TERMINATED", lambda: self.terminate_boot_volume(boot_volume_id))

    def terminate_boot_volume(self, boot_volume_id: str) -> None:
        with self.store.lock:
            boot_volume = self.boot_volumes[boot_volume_id]
            self.backing_file(boot_volume).unlink(missing_ok=True)
            boot_volume["lifecycleState"] = "TERMINATED"
            self.store.save()

    def resume(self) -> None:
        """Finish transitions that a stopped process left half done (restores whose copy is under way,
        ``_copy``, are the backups' to resume)."""
        for boot_volume in self.store.values("boot_volumes"):
            if boot_volume["lifecycleState"] == "PROVISIONING" and "_copy" not in boot_volume:
                self.boot_volume_provisioned(boot_volume["id"])
            elif boot_volume["lifecycleState"] == "TERMINATING":
                self.terminate_boot_volume(boot_volume["id"])
        for volume in self.store.values("volumes"):
            if volume["lifecycleState"] == "PROVISIONING" and "_copy" not in volume:
                self.provisioned(volume["id"])
            elif volume["lifecycleState"] == "TERMINATING":
                self._terminate(volume["id"])
        for group in self.store.values("volume_groups"):
            if group["lifecycleState"] == "PROVISIONING" and "_copy" not in group:
                self.group_provisioned(group["id"])
            elif group["lifecycleState"] == "TERMINATING":
                self._terminate_group(group["id"])

    # -- volume groups -------------------------------------------------------------

    def volume_group(self, group_id: str, region: str | None = None) -> dict[str, Any]:
        return self.find(self.groups, group_id, "VolumeGroup", region)

    def render_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """A volume group as OCI shows it, its size the sum of its volumes' sizes as they are now."""
        with self.store.lock:
            size_mb = sum(self.attachable(v)["sizeInMBs"] for v in group["volumeIds"])
            return {**public(group), "sizeInMBs": size_mb, "sizeInGBs": size_mb // 1024}

    def _check_members(self, volume_ids: Any, availability_domain: str, group_id: str | None, region: str) -> list[str]:
        """``volume_ids`` if they may make up the group ``group_id`` (None: a new one) in ``availability_domain``."""
        if not isinstance(volume_ids, list) or not volume_ids or not all(isinstance(v, str) for v in volume_ids):
            raise invalid_parameter(f"volumeIds must be a non-empty list of volume OCIDs, not {volume_ids!r}.")
        if len(set(volume_ids)) != len(volume_ids):
            raise invalid_parameter("volumeIds names a volume more than once.")
        for volume_id in volume_ids:
            volume = self.attachable(volume_id, region)
            if volume["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume {volume_id} is {volume['lifecycleState']}, not AVAILABLE.")
            if volume["availabilityDomain"] != availability_domain:
                raise invalid_parameter(f"Volume {volume_id} is in {volume['availabilityDomain']} but the volume group "
                                        f"is in {availability_domain}.")
            if volume.get("volumeGroupId") not in (None, group_id):
                raise conflict(f"Volume {volume_id} is already in volume group {volume['volumeGroupId']}; "
                               "a volume can be in one volume group only.")
        return list(volume_ids)

    def set_members(self, group: dict[str, Any], volume_ids: list[str]) -> None:
        """Make ``volume_ids`` the group's volumes: those left out leave it, the others name it."""
        for volume_id in group["volumeIds"]:
            self.attachable(volume_id)["volumeGroupId"] = None
        for volume_id in volume_ids:
            self.attachable(volume_id)["volumeGroupId"] = group["id"]
        group["volumeIds"] = volume_ids

    @staticmethod
    def _refuse_unsupported_group_fields(details: dict[str, Any]) -> None:
        if details.get("volumeGroupReplicas"):
            raise invalid_parameter("Volume group replicas are not supported by the local OCI.")

    def create_volume_group(self, details: dict[str, Any], region: str | None = None) -> dict[str, Any]:
        """A new PROVISIONING volume group of existing volumes, or of volumes restored from a volume group
        backup; it becomes AVAILABLE."""
        region = region or self.app.home_region
        compartment = self.app.identity.check_compartment(details.get("compartmentId"))
        ad = self.app.identity.check_availability_domain(details.get("availabilityDomain"), region)
        source = details.get("sourceDetails")
        if not source:
            raise missing_parameter("sourceDetails")
        kind = source.get("type") if isinstance(source, dict) else None
        if kind in COPYING_GROUP_SOURCES:
            raise invalid_parameter(f"Creating a volume group from a {kind} source (a copy of volumes) is not supported "
                                    "by the local OCI; use sourceDetails of type volumeIds or volumeGroupBackupId.")
        if kind not in ("volumeIds", "volumeGroupBackupId"):
            raise invalid_parameter(f"sourceDetails.type must be one of volumeIds, volumeGroupBackupId, "
                                    f"{', '.join(COPYING_GROUP_SOURCES)}, not {kind!r}.")
        self._refuse_unsupported_group_fields(details)
        if details.get("backupPolicyId"):
            raise invalid_parameter("Assigning a backup policy to a volume group is not supported by the local OCI; "
                                    "assign it to each volume.")
        if kind == "volumeGroupBackupId":
            return self.render_group(self.app.backups.restore_group(details, compartment, ad, region))
        with self.store.lock:
            volume_ids = self._check_members(source.get("volumeIds"), ad, None, region)
            group = self.new_group(details, compartment, ad, region, {"type": "volumeIds", "volumeIds": list(volume_ids)})
            group_id = group["id"]
            self.set_members(group, volume_ids)
            self.groups[group_id] = group
            self.store.save()
            rendered = self.render_group(group)
        self.app.scheduler.transition("volumegroup:AVAILABLE", lambda: self.group_provisioned(group_id))
        return rendered

    @staticmethod
    def new_group(details: dict[str, Any], compartment: str, ad: str, region: str,
                  source: dict[str, Any]) -> dict[str, Any]:
        """The record of a new PROVISIONING volume group without volumes yet, not yet stored."""
        group_id = new_ocid("volumegroup", region=region)
        return {
            "id": group_id, "compartmentId": compartment, "availabilityDomain": ad,
            "displayName": details.get("displayName") or group_id[-12:], "lifecycleState": "PROVISIONING",
            "timeCreated": now_iso(), "volumeIds": [], "isHydrated": True, "sourceDetails": source,
            "freeformTags": details.get("freeformTags") or {}, "definedTags": details.get("definedTags") or {},
            "_region": region,
        }

    def group_provisioned(self, group_id: str) -> None:
        self.set_state(self.groups, group_id, "PROVISIONING", "AVAILABLE")

    def update_volume_group(self, group_id: str, details: dict[str, Any], region: str | None = None) -> dict[str, Any]:
        """Rename, retag, or give the group a new list of volumes (those left out leave it)."""
        with self.store.lock:
            group = self.volume_group(group_id, region)
            if group["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume group {group_id} is {group['lifecycleState']}, not AVAILABLE.")
            self._refuse_unsupported_group_fields(details)
            if details.get("volumeIds") is not None:
                self.set_members(group, self._check_members(details["volumeIds"], group["availabilityDomain"], group_id,
                                                                self.region_of(group)))
            for key in ("displayName", "freeformTags", "definedTags"):
                if details.get(key) is not None:
                    group[key] = details[key]
            self.store.save()
            return self.render_group(group)

    def delete_volume_group(self, group_id: str, region: str | None = None) -> None:
        """Delete the group, not its volumes: they leave it once it is TERMINATED."""
        with self.store.lock:
            group = self.volume_group(group_id, region)
            if group["lifecycleState"] in ENDED_STATES:
                raise incorrect_state(f"Volume group {group_id} is already {group['lifecycleState']}.")
            group["lifecycleState"] = "TERMINATING"
            self.store.save()
        self.app.scheduler.transition("volumegroup:TERMINATED", lambda: self._terminate_group(group_id))

    def _terminate_group(self, group_id: str) -> None:
        with self.store.lock:
            group = self.groups[group_id]
            self.set_members(group, [])
            group["lifecycleState"] = "TERMINATED"
            self.store.save()

    # -- backup policies ---------------------------------------------------------

    def assign_policy(self, details: dict[str, Any]) -> dict[str, Any]:
        asset_id, policy_id = details.get("assetId"), details.get("policyId")
        if policy_id not in self.policies:
            raise invalid_parameter(f"Unknown backup policy {policy_id!r}.")
        with self.store.lock:
            volume = self.attachable(asset_id or "")
            if volume["lifecycleState"] in ENDED_STATES:
                raise incorrect_state(f"Volume {asset_id} is {volume['lifecycleState']}.")
            if any(a["assetId"] == asset_id for a in self.assignments.values()):
                raise ServiceError(409, "Conflict", f"Volume {asset_id} already has a backup policy assigned.")
            assignment = {"id": new_ocid("volumebackuppolicyassignment"), "assetId": asset_id, "policyId": policy_id, "timeCreated": now_iso()}
            self.assignments[assignment["id"]] = assignment
            self.store.save()
            return assignment

    def unassign_policy(self, assignment_id: str) -> None:
        with self.store.lock:
            lookup(self.assignments, assignment_id, "VolumeBackupPolicyAssignment")
            del self.assignments[assignment_id]
            self.store.save()


def release_loop_devices(path: Path) -> list[str]:
    """Detach every loop device of the host over ``path``; their names. Nothing when there is none
    or ``losetup`` cannot list them (not root, not installed)."""
    try:
        listed = subprocess.run(["losetup", "--list", "--noheadings", "--output", "NAME", "--associated", str(path)],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    names = [line.strip() for line in listed.stdout.splitlines() if line.strip()]
    for name in names:
        subprocess.run(["losetup", "--detach", name], capture_output=True, timeout=30)
    return names
