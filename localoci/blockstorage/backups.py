"""Block Storage backups: volume, boot volume and volume group backups, their copies to other
regions, and the volumes, boot volumes and volume groups restored from them.

A backup holds a copy of its volume's backing file (``<data-dir>/backups/<id>.img``), copied
sparse (``SEEK_DATA``/``SEEK_HOLE``, then ``copy_file_range``, which reflinks where the file
system can): a 64 GiB volume with 1 MiB written costs about 1 MiB. The copy runs off the request
thread while the backup is CREATING; the backup becomes AVAILABLE once the copy is done and its
transition's delay (``volumebackup:AVAILABLE``...) has passed, or FAULTY if the copy failed or a
``failResource`` fault struck the call. The backup's point in time is when its copy reads the
volume, right after the call (a write to the volume meanwhile may or may not be in it; in OCI the
call itself is the point in time).

A copy to another region (``CopyVolumeBackup``...) copies the file too; the new backup lives in
the destination region only and names its source (``sourceVolumeBackupId``...). A restore
(``CreateVolume`` from a ``volumeBackup``, ``CreateBootVolume`` from a ``bootVolumeBackup``,
``CreateVolumeGroup`` from a ``volumeGroupBackupId``) copies a backup's file into the new
volume's, which is PROVISIONING until that copy is done. Deleting a backup removes its file.

A record whose copy is under way keeps it in ``_copy`` (the files, the transition) until it is
done; a restarted process makes such copies again from the start, or fails the record FAULTY if
a source is gone (a volume backup's volume is read as it is then).

Not supported: incremental backups that share data (an INCREMENTAL backup is a full copy that
says INCREMENTAL), expiration and retention, KMS keys (``kmsKeyId`` is kept, never used),
cross-compartment moves, scheduled backups made by a policy, and volume group backups of
groups holding boot volumes.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import conflict, incorrect_state, invalid_parameter, missing_parameter
from ..ids import new_ocid, now_iso
from ..resources import public
from .models import GB, MiB, check_size

if TYPE_CHECKING:
    from ..app import LocalOCI

log = logging.getLogger("localoci.blockstorage")

BACKUP_TYPES = ("FULL", "INCREMENTAL")
DELETABLE = ("AVAILABLE", "FAULTY")
ENDED = ("TERMINATING", "TERMINATED")


@dataclass(frozen=True)
class Kind:
    """A kind of backup of one volume: where its records live and what its fields are called."""

    collection: str
    ocid: str
    what: str
    transition: str  # the kind of its lifecycle transitions: volumebackup:AVAILABLE...
    volume_field: str
    source_field: str
    volumes: str  # the collection of the volumes it backs up


VOLUME = Kind("volume_backups", "volumebackup", "VolumeBackup", "volumebackup", "volumeId",
              "sourceVolumeBackupId", "volumes")
BOOT = Kind("boot_volume_backups", "bootvolumebackup", "BootVolumeBackup", "bootvolumebackup", "bootVolumeId",
            "sourceBootVolumeBackupId", "boot_volumes")
GROUP = "volume_group_backups"


def sparse_copy(source: str, target: str, size: int) -> None:
    """Copy ``source`` into a new ``target`` of ``size`` bytes, its holes left holes."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        end = os.fstat(src.fileno()).st_size
        dst.truncate(max(size, end))
        offset = 0
        while offset < end:
            try:
                data = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole up to the end
                    break
                raise
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            _copy_range(src.fileno(), dst.fileno(), data, hole - data)
            offset = hole
        dst.truncate(size)
        os.fsync(dst.fileno())


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    while length:
        try:
            n = os.copy_file_range(src, dst, min(length, 1 << 30), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = os.pwrite(dst, os.pread(src, min(length, 8 * MiB), offset), offset)
        if n <= 0:
            raise OSError(errno.EIO, "source file shorter than expected")
        offset += n
        length -= n


def restored_size(details: dict[str, Any], backup_gb: int) -> int:
    """The size a restore asks for: the backup's unless told, and never below it."""
    size = details.get("sizeInGBs")
    if size is None:
        return backup_gb
    if size != backup_gb:
        check_size(size)
    if size < backup_gb:
        raise invalid_parameter(f"sizeInGBs {size} is below the {backup_gb} GB of the backup restored.")
    return size


class Backups:
    def __init__(self, app: "LocalOCI") -> None:
        self.app = app
        self.store = app.store
        self.bs = app.blockstorage
        self.backups_dir = app.data_dir / "backups"
        self.backups_dir.mkdir(exist_ok=True)
        for collection in (VOLUME.collection, BOOT.collection, GROUP):
            self.store.collection(collection)

    def records(self, collection: str) -> dict[str, dict[str, Any]]:
        return self.store.collection(collection)

    def backing_file(self, backup: dict[str, Any]) -> Path:
        return self.backups_dir / backup["_file"]

    def backup(self, kind: Kind, backup_id: str, region: str | None = None) -> dict[str, Any]:
        return self.bs.find(self.records(kind.collection), backup_id, kind.what, region)

    def group_backup(self, backup_id: str, region: str | None = None) -> dict[str, Any]:
        return self.bs.find(self.records(GROUP), backup_id, "VolumeGroupBackup", region)

    # -- backups of one volume ---------------------------------------------------------

    def create(self, kind: Kind, details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
        """CreateVolumeBackup, CreateBootVolumeBackup: a CREATING backup of an AVAILABLE volume."""
        volume_id = details.get(kind.volume_field)
        if not volume_id:
            raise missing_parameter(kind.volume_field)
        backup_type = _backup_type(details)
        with self.store.lock:
            volume = self.bs.find(self.records(kind.volumes), volume_id, kind.what[:-len("Backup")], region)
            backup = self._new_backup(kind, volume, details, backup_type, region, fails)
            self._copy_into(backup, [(self.bs.backing_file(volume), backup)], f"{kind.transition}:AVAILABLE")
            self.records(kind.collection)[backup["id"]] = backup
            self.store.save()
        self._start_copy(kind.collection, backup["id"])
        return backup

    def _new_backup(self, kind: Kind, volume: dict[str, Any], details: dict[str, Any], backup_type: str,
                    region: str, fails: bool, group_backup_id: str | None = None) -> dict[str, Any]:
        if volume["lifecycleState"] != "AVAILABLE":
            raise incorrect_state(f"{kind.what[:-len('Backup')]} {volume['id']} is {volume['lifecycleState']}, "
                                  "not AVAILABLE: it cannot be backed up.")
        backup_id = new_ocid(kind.ocid, region=region)
        backup = {
            "id": backup_id, "compartmentId": volume["compartmentId"],
            "displayName": details.get("displayName") or f"{volume['displayName']} backup",
            kind.volume_field: volume["id"], "sizeInGBs": volume["sizeInGBs"], "uniqueSizeInGBs": 0,
            "type": backup_type, "sourceType": "MANUAL", "timeCreated": now_iso(), "timeRequestReceived": now_iso(),
            "expirationTime": None, "freeformTags": details.get("freeformTags") or {},
            "definedTags": details.get("definedTags") or {}, "systemTags": {}, "lifecycleState": "CREATING",
            kind.source_field: None, "kmsKeyId": details.get("kmsKeyId"), "volumeGroupBackupId": group_backup_id,
            "_file": backup_id.rsplit(".", 1)[-1] + ".img", "_region": region, "_fails": fails,
        }
        if kind is VOLUME:
            backup.update({"sizeInMBs": volume["sizeInMBs"], "uniqueSizeInMbs": 0})
        else:
            backup.update({"imageId": volume.get("imageId"), "_image": volume.get("_image")})
        return backup

    def copy(self, kind: Kind, backup_id: str, details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
        """CopyVolumeBackup, CopyBootVolumeBackup: a CREATING copy of an AVAILABLE backup in another region."""
        destination = self._destination(details, region)
        with self.store.lock:
            source = self.backup(kind, backup_id, region)
            backup = self._copy_of(kind, source, details, destination, fails)
            self._copy_into(backup, [(self.backing_file(source), backup)], f"{kind.transition}copy:AVAILABLE")
            self.records(kind.collection)[backup["id"]] = backup
            self.store.save()
        self._start_copy(kind.collection, backup["id"])
        return backup

    def _destination(self, details: dict[str, Any], region: str) -> str:
        destination = details.get("destinationRegion")
        if not destination:
            raise missing_parameter("destinationRegion")
        if destination not in self.app.regions:
            raise invalid_parameter(f"Invalid destinationRegion {destination!r}; the regions are "
                                    f"{', '.join(self.app.regions)}.")
        if destination == region:
            raise invalid_parameter(f"The destinationRegion {destination} is the backup's own region; "
                                    "a backup is copied to another region.")
        return destination

    def _copy_of(self, kind: Kind, source: dict[str, Any], details: dict[str, Any], destination: str, fails: bool,
                 group_backup_id: str | None = None) -> dict[str, Any]:
        if source["lifecycleState"] != "AVAILABLE":
            raise incorrect_state(f"{kind.what} {source['id']} is {source['lifecycleState']}, not AVAILABLE: "
                                  "it cannot be copied.")
        backup_id = new_ocid(kind.ocid, region=destination)
        return {
            **source, "id": backup_id, "displayName": details.get("displayName") or source["displayName"],
            "lifecycleState": "CREATING", "timeCreated": now_iso(), "timeRequestReceived": now_iso(),
            kind.source_field: source["id"], "kmsKeyId": details.get("kmsKeyId"), "uniqueSizeInGBs": 0,
            "volumeGroupBackupId": group_backup_id, "systemTags": {},
            "_file": backup_id.rsplit(".", 1)[-1] + ".img", "_region": destination, "_fails": fails,
        }

    def update(self, kind: Kind, backup_id: str, details: dict[str, Any], region: str) -> dict[str, Any]:
        """UpdateVolumeBackup, UpdateBootVolumeBackup: a new name or tags."""
        with self.store.lock:
            backup = self.backup(kind, backup_id, region)
            _refuse_ended(kind.what, backup)
            _retag(backup, details)
            self.store.save()
            return backup

    def delete(self, kind: Kind, backup_id: str, region: str) -> None:
        """DeleteVolumeBackup, DeleteBootVolumeBackup: TERMINATING, then TERMINATED with its file gone."""
        with self.store.lock:
            backup = self.backup(kind, backup_id, region)
            _refuse_undeletable(kind.what, backup)
            if backup.get("volumeGroupBackupId"):
                raise conflict(f"{kind.what} {backup_id} is part of volume group backup "
                               f"{backup['volumeGroupBackupId']}; delete that instead.")
            backup["lifecycleState"] = "TERMINATING"
            self.store.save()
        self.app.scheduler.transition(f"{kind.transition}:TERMINATED",
                                      lambda: self._terminate(kind.collection, [backup_id]))

    def _terminate(self, collection: str, backup_ids: list[str]) -> None:
        with self.store.lock:
            for backup_id in backup_ids:
                backup = self.records(collection)[backup_id]
                self.backing_file(backup).unlink(missing_ok=True)
                backup["lifecycleState"] = "TERMINATED"
            self.store.save()

    # -- volume group backups ------------------------------------------------------------

    def create_group(self, details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
        """CreateVolumeGroupBackup: one volume backup of each of the group's volumes, under one CREATING record."""
        group_id = details.get("volumeGroupId")
        if not group_id:
            raise missing_parameter("volumeGroupId")
        backup_type = _backup_type(details)
        with self.store.lock:
            group = self.bs.volume_group(group_id, region)
            if group["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume group {group_id} is {group['lifecycleState']}, not AVAILABLE.")
            if any(v in self.bs.boot_volumes for v in group["volumeIds"]):
                raise invalid_parameter("Backing up a volume group that holds a boot volume is not supported by "
                                        "the local OCI.")
            compartment = self.app.identity.check_compartment(details.get("compartmentId") or group["compartmentId"])
            group_backup = self._new_group_backup(details, compartment, region, fails)
            group_backup["volumeGroupId"] = group_id
            members = [self._new_backup(VOLUME, self.bs.volumes[v], {"displayName": f"{group_backup['displayName']} "
                                        f"{self.bs.volumes[v]['displayName']}"}, backup_type, region, fails,
                                        group_backup["id"]) for v in group["volumeIds"]]
            files = [(self.bs.backing_file(self.bs.volumes[m["volumeId"]]), m) for m in members]
            return self._store_group_backup(group_backup, members, files, "volumegroupbackup:AVAILABLE")

    def _new_group_backup(self, details: dict[str, Any], compartment: str, region: str, fails: bool) -> dict[str, Any]:
        backup_id = new_ocid("volumegroupbackup", region=region)
        return {
            "id": backup_id, "compartmentId": compartment,
            "displayName": details.get("displayName") or f"volume group backup {backup_id[-8:]}",
            "volumeGroupId": None, "volumeBackupIds": [], "type": _backup_type(details), "sourceType": "MANUAL",
            "sizeInMBs": 0, "sizeInGBs": 0, "uniqueSizeInMbs": 0, "uniqueSizeInGbs": 0, "timeCreated": now_iso(),
            "timeRequestReceived": now_iso(), "expirationTime": None, "lifecycleState": "CREATING",
            "sourceVolumeGroupBackupId": None, "freeformTags": details.get("freeformTags") or {},
            "definedTags": details.get("definedTags") or {}, "_region": region, "_fails": fails,
        }

    def _store_group_backup(self, group_backup: dict[str, Any], members: list[dict[str, Any]],
                            files: list[tuple[Path, dict[str, Any]]], transition: str) -> dict[str, Any]:
        """Store a new group backup and its members (called with the store locked); start their copies."""
        group_backup["volumeBackupIds"] = [m["id"] for m in members]
        group_backup["sizeInGBs"] = sum(m["sizeInGBs"] for m in members)
        group_backup["sizeInMBs"] = group_backup["sizeInGBs"] * 1024
        self._copy_into(group_backup, files, transition)
        for member in members:
            self.records(VOLUME.collection)[member["id"]] = member
        self.records(GROUP)[group_backup["id"]] = group_backup
        self.store.save()
        self._start_copy(GROUP, group_backup["id"])
        return group_backup

    def copy_group(self, backup_id: str, details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
        """CopyVolumeGroupBackup: a CREATING copy, member backups and all, in another region."""
        destination = self._destination(details, region)
        with self.store.lock:
            source = self.group_backup(backup_id, region)
            if source["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume group backup {backup_id} is {source['lifecycleState']}, not AVAILABLE: "
                                      "it cannot be copied.")
            group_backup = self._new_group_backup(
                {**source, "displayName": details.get("displayName") or source["displayName"]},
                source["compartmentId"], destination, fails)
            group_backup.update({"volumeGroupId": source["volumeGroupId"], "sourceVolumeGroupBackupId": source["id"],
                                 "type": source["type"], "sourceType": source["sourceType"]})
            sources = [self.records(VOLUME.collection)[m] for m in source["volumeBackupIds"]]
            members = [self._copy_of(VOLUME, m, {"kmsKeyId": details.get("kmsKeyId")}, destination, fails,
                                     group_backup["id"]) for m in sources]
            files = [(self.backing_file(s), m) for s, m in zip(sources, members)]
            return self._store_group_backup(group_backup, members, files, "volumegroupbackupcopy:AVAILABLE")

    def update_group(self, backup_id: str, details: dict[str, Any], region: str) -> dict[str, Any]:
        with self.store.lock:
            group_backup = self.group_backup(backup_id, region)
            _refuse_ended("Volume group backup", group_backup)
            _retag(group_backup, details)
            self.store.save()
            return group_backup

    def delete_group(self, backup_id: str, region: str) -> None:
        """DeleteVolumeGroupBackup: the group backup and its member backups, their files with them."""
        with self.store.lock:
            group_backup = self.group_backup(backup_id, region)
            _refuse_undeletable("Volume group backup", group_backup)
            group_backup["lifecycleState"] = "TERMINATING"
            for member_id in group_backup["volumeBackupIds"]:
                self.records(VOLUME.collection)[member_id]["lifecycleState"] = "TERMINATING"
            self.store.save()
        self.app.scheduler.transition("volumegroupbackup:TERMINATED", lambda: self._terminate_group(backup_id))

    def _terminate_group(self, backup_id: str) -> None:
        with self.store.lock:
            group_backup = self.records(GROUP)[backup_id]
            self._terminate(VOLUME.collection, group_backup["volumeBackupIds"])
            group_backup["lifecycleState"] = "TERMINATED"
            self.store.save()

    # -- restores ----------------------------------------------------------------------

    def _restorable(self, kind: Kind, source: Any, wanted: str, region: str) -> dict[str, Any]:
        kind_name = source.get("type") if isinstance(source, dict) else None
        if kind_name != wanted:
            raise invalid_parameter(f"sourceDetails.type {kind_name!r} is not supported by the local OCI; "
                                    f"it restores from a {wanted} only.")
        if not source.get("id"):
            raise missing_parameter("sourceDetails.id")
        backup = self.backup(kind, source["id"], region)
        if backup["lifecycleState"] != "AVAILABLE":
            raise incorrect_state(f"{kind.what} {backup['id']} is {backup['lifecycleState']}, not AVAILABLE.")
        return backup

    def restore_volume(self, details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
        """CreateVolume from a volumeBackup: a PROVISIONING volume that gets the backup's bytes."""
        with self.store.lock:
            backup = self._restorable(VOLUME, details.get("sourceDetails"), "volumeBackup", region)
            volume = self.bs.new_volume(details, region, fails, restored_size(details, backup["sizeInGBs"]))
            volume["sourceDetails"] = {"type": "volumeBackup", "id": backup["id"]}
            self._copy_into(volume, [(self.backing_file(backup), volume)], "volume:AVAILABLE")
            self.bs.volumes[volume["id"]] = volume
            self.store.save()
        self._start_copy("volumes", volume["id"])
        return volume

    def restore_boot_volume(self, details: dict[str, Any], fails: bool, region: str) -> dict[str, Any]:
        """CreateBootVolume from a bootVolumeBackup: a PROVISIONING boot volume that gets the backup's bytes,
        attachable and launchable as any other once AVAILABLE."""
        compartment = self.app.identity.check_compartment(details.get("compartmentId"))
        ad = self.app.identity.check_availability_domain(details.get("availabilityDomain"), region)
        if details.get("sourceDetails") is None:
            raise missing_parameter("sourceDetails")
        with self.store.lock:
            backup = self._restorable(BOOT, details.get("sourceDetails"), "bootVolumeBackup", region)
            size_gb = restored_size(details, backup["sizeInGBs"])
            boot_volume = self.bs.new_boot_volume(compartment, ad, details, size_gb, backup.get("imageId"), region, fails)
            boot_volume.update({"_image": backup.get("_image"),
                                "sourceDetails": {"type": "bootVolumeBackup", "id": backup["id"]}})
            self._copy_into(boot_volume, [(self.backing_file(backup), boot_volume)], "bootvolume:AVAILABLE")
            self.bs.boot_volumes[boot_volume["id"]] = boot_volume
            self.store.save()
        self._start_copy("boot_volumes", boot_volume["id"])
        return boot_volume

    def restore_group(self, details: dict[str, Any], compartment: str, ad: str, region: str) -> dict[str, Any]:
        """CreateVolumeGroup from a volumeGroupBackupId: one restored volume for each member backup."""
        source = details["sourceDetails"]
        backup_id = source.get("volumeGroupBackupId")
        if not backup_id:
            raise missing_parameter("sourceDetails.volumeGroupBackupId")
        with self.store.lock:
            group_backup = self.group_backup(backup_id, region)
            if group_backup["lifecycleState"] != "AVAILABLE":
                raise incorrect_state(f"Volume group backup {backup_id} is {group_backup['lifecycleState']}, "
                                      "not AVAILABLE.")
            group = self.bs.new_group(details, compartment, ad, region,
                                      {"type": "volumeGroupBackupId", "volumeGroupBackupId": backup_id})
            files = []
            for member_id in group_backup["volumeBackupIds"]:
                backup = self.records(VOLUME.collection)[member_id]
                volume = self.bs.new_volume({"compartmentId": compartment, "availabilityDomain": ad,
                                             "displayName": backup["displayName"]}, region, size_gb=backup["sizeInGBs"])
                volume["sourceDetails"] = {"type": "volumeBackup", "id": member_id}
                self.bs.volumes[volume["id"]] = volume
                files.append((self.backing_file(backup), volume))
            self.bs.set_members(group, [volume["id"] for _, volume in files])
            self._copy_into(group, files, "volumegroup:AVAILABLE")
            self.bs.groups[group["id"]] = group
            self.store.save()
        self._start_copy("volume_groups", group["id"])
        return group

    # -- copying files off the request thread ----------------------------------------

    def _copy_into(self, owner: dict[str, Any], files: list[tuple[Path, dict[str, Any]]], transition: str) -> None:
        """Note on ``owner`` the copies it waits for: each source file into a record's (a backup's or a volume's)."""
        owner["_copy"] = {"transition": transition, "files": [
            [str(source), str(self._file_of(record)), record["sizeInGBs"] * GB] for source, record in files]}

    def _file_of(self, record: dict[str, Any]) -> Path:
        return self.backing_file(record) if record["id"].split(".")[1].endswith("backup") else self.bs.backing_file(record)

    def _start_copy(self, collection: str, record_id: str) -> None:
        """Copy the files ``_copy`` names on a thread of their own; finish the record once they are copied and
        its transition's delay has passed."""
        with self.store.lock:
            copy = dict(self.records(collection)[record_id]["_copy"])

        def run() -> None:
            started, ok = time.monotonic(), True
            try:
                for source, target, size in copy["files"]:
                    sparse_copy(source, target, size)
            except OSError:
                log.exception("copying into %s %s failed", collection, record_id)
                ok = False
            left = self.app.scheduler.delay_for(copy["transition"]) - (time.monotonic() - started)
            self.app.scheduler.call_later(max(0.0, left), lambda: self._copied(collection, record_id, ok))

        threading.Thread(target=run, name=f"localoci-copy-{record_id[-8:]}", daemon=True).start()

    def _copied(self, collection: str, record_id: str, ok: bool) -> None:
        """The copies of a record are done: it (and the records it waited for) become AVAILABLE, or FAULTY."""
        with self.store.lock:
            owner = self.records(collection)[record_id]
            files = [Path(target) for _, target, _ in owner.pop("_copy")["files"]]
            waiting = "CREATING" if collection in (VOLUME.collection, BOOT.collection, GROUP) else "PROVISIONING"
            state = "AVAILABLE" if ok and not owner.get("_fails") else "FAULTY"
            if collection == GROUP:
                members = [self.records(VOLUME.collection)[m] for m in owner["volumeBackupIds"]]
            elif collection == "volume_groups":
                members = [self.bs.volumes[v] for v in owner["volumeIds"]]
            else:
                members = [owner]
            unique = 0
            for member, path in zip(members, files):
                used = _allocated(path)
                unique += used
                if "uniqueSizeInGBs" in member:
                    member["uniqueSizeInGBs"] = math.ceil(used / GB)
                if "uniqueSizeInMbs" in member:
                    member["uniqueSizeInMbs"] = math.ceil(used / MiB)
                if member is not owner and member["lifecycleState"] == waiting:
                    member["lifecycleState"] = state
            if collection == GROUP:
                owner["uniqueSizeInMbs"], owner["uniqueSizeInGbs"] = math.ceil(unique / MiB), math.ceil(unique / GB)
            if owner["lifecycleState"] == waiting:
                owner["lifecycleState"] = state
            elif owner["lifecycleState"] == "TERMINATED":  # deleted while copying: its files went before the copy ended
                for path in files:
                    path.unlink(missing_ok=True)
            self.store.save()

    def resume(self) -> None:
        """Copy again what a stopped process left half copied; finish backups it left TERMINATING."""
        for collection in (VOLUME.collection, BOOT.collection, GROUP, "volumes", "boot_volumes", "volume_groups"):
            for record in self.store.values(collection):
                if "_copy" in record:
                    self._start_copy(collection, record["id"])
        for collection in (VOLUME.collection, BOOT.collection):
            terminating = [b["id"] for b in self.store.values(collection) if b["lifecycleState"] == "TERMINATING"]
            self._terminate(collection, terminating)
        for group_backup in self.store.values(GROUP):
            if group_backup["lifecycleState"] == "TERMINATING":
                self._terminate_group(group_backup["id"])

    def inventory(self, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, list[dict[str, Any]]]:
        """The backups for the admin inventory, with their files and what those take on disk."""
        def entry(backup: dict[str, Any]) -> dict[str, Any]:
            path = self.backing_file(backup)
            return {**public(backup), "region": self.bs.region_of(backup), "backingFile": str(path),
                    "allocatedBytes": _allocated(path)}

        return {
            "volumeBackups": [entry(b) for b in self.store.values(VOLUME.collection) if wanted(b)],
            "bootVolumeBackups": [entry(b) for b in self.store.values(BOOT.collection) if wanted(b)],
            "volumeGroupBackups": [{**public(b), "region": self.bs.region_of(b)}
                                   for b in self.store.values(GROUP) if wanted(b)],
        }


def _allocated(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _backup_type(details: dict[str, Any]) -> str:
    backup_type = details.get("type") or "INCREMENTAL"
    if backup_type not in BACKUP_TYPES:
        raise invalid_parameter(f"type must be FULL or INCREMENTAL, not {backup_type!r}.")
    return backup_type


def _retag(record: dict[str, Any], details: dict[str, Any]) -> None:
    for key in ("displayName", "freeformTags", "definedTags"):
        if details.get(key) is not None:
            record[key] = details[key]


def _refuse_ended(what: str, backup: dict[str, Any]) -> None:
    if backup["lifecycleState"] in ENDED:
        raise incorrect_state(f"{what} {backup['id']} is {backup['lifecycleState']}.")


def _refuse_undeletable(what: str, backup: dict[str, Any]) -> None:
    if backup["lifecycleState"] not in DELETABLE:
        raise incorrect_state(f"{what} {backup['id']} is {backup['lifecycleState']}; only an AVAILABLE or FAULTY "
                              "backup can be deleted.")
