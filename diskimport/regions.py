"""Copies to another region: a volume, or a machine's volume group, restored in a distant region.

Volumes travel between regions only as backups. For each disk, all disks at once:

1. a full backup of the volume (a boot volume: a boot volume backup) in the source region;
2. ``CopyVolumeBackup`` (``CopyBootVolumeBackup``) to the destination region;
3. a volume (a boot volume) restored from the copy in the destination region;

then the restored volumes are put in one volume group named after the machine (a group's
copy), and both intermediate backups are deleted. At most ``max_parallel_copies`` copies run
at once (OCI allows 10 concurrent copies per source region).

Every resource is tagged with the copy's id, the disk's position and the run, created with
an ``opc-retry-token``, and has its undo registered the moment it exists (in the ledger of
the copy's :class:`~diskimport.run.Run`): a failed copy leaves no backup in either region
and no half-restored volume. A retried run resumes: a
backup, a copy or a restored volume an earlier attempt made is found by its tags (the copy
by its ``sourceVolumeBackupId``) and used instead of made again.

What cannot be copied is refused by name before anything is created: the destination region
(another one, that answers), the compartment and the sources' OCIDs by their kind, the
destination's availability domain, then the volumes or the group.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import oci
import requests
from oci.core import models

from . import cloud, contract
from .errors import InvalidRequest
from .export import SourceVolume, check_sources, resolve_sources
from .ledger import Undo
from .ocids import COMPARTMENT_KINDS, check_ocid
from .run import Run, step
from .summaries import CopiedDisk, CopySummary

MAX_PARALLEL_COPIES = 10
BACKUP_TIMEOUT = 24 * 3600.0
# A region identifier: lower-case words and a number, joined by hyphens (us-ashburn-1).
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)+")
REGION_PROBE_ATTEMPTS = 3  # a destination region that cannot be reached this often is refused


@dataclass(frozen=True)
class CopyJob:
    copy_id: str
    source_region: str
    destination_region: str
    compartment_id: str             # where the restored volumes go
    availability_domain: str        # of the destination region
    machine: str | None
    sources: tuple[SourceVolume, ...]



class VolumeKind:
    """The calls for one kind of volume: block volumes, or boot volumes (their own backups)."""

    def __init__(self, boot: bool) -> None:
        self.boot = boot
        prefix = "boot_volume" if boot else "volume"
        self.create_backup = f"create_{prefix}_backup"
        self.get_backup = f"get_{prefix}_backup"
        self.delete_backup = f"delete_{prefix}_backup"
        self.copy_backup = f"copy_{prefix}_backup"
        self.list_backups = f"list_{prefix}_backups"
        self.update_backup = f"update_{prefix}_backup"
        self.source_filter = f"source_{prefix}_backup_id"
        self.volume_filter = f"{prefix}_id"

    def backup_details(self, volume_id: str, name: str, tags: dict[str, str]) -> Any:
        if self.boot:
            return models.CreateBootVolumeBackupDetails(boot_volume_id=volume_id, display_name=name, type="FULL",
                                                        freeform_tags=tags)
        return models.CreateVolumeBackupDetails(volume_id=volume_id, display_name=name, type="FULL",
                                                freeform_tags=tags)

    def copy_details(self, region: str, name: str) -> Any:
        cls = models.CopyBootVolumeBackupDetails if self.boot else models.CopyVolumeBackupDetails
        return cls(destination_region=region, display_name=name)

    def update_details(self, tags: dict[str, str]) -> Any:
        cls = models.UpdateBootVolumeBackupDetails if self.boot else models.UpdateVolumeBackupDetails
        return cls(freeform_tags=tags)


class RegionCopy:
    """One copy run's steps. ``run`` is the :class:`~diskimport.run.Run` in the source region
    (its clients, ledger, retry tokens and settings); ``destination`` the SDK clients of the
    destination region; ``poll_seconds`` the longest wait between two looks at a backup, a copy
    or a restored volume on its way to AVAILABLE."""

    def __init__(self, run: Run, destination: cloud.Clients, poll_seconds: float = 2.0,
                 max_parallel_copies: int = MAX_PARALLEL_COPIES) -> None:
        self.run = run
        self.source = run.clients
        self.destination = destination
        self.log = run.log
        self.poll_seconds = poll_seconds
        self._copies = threading.Semaphore(max_parallel_copies)

    # -- what to copy --------------------------------------------------------------------------

    @step("plan-copy")
    def plan(self, source_region: str, destination_region: str, volume_id: str | None = None,
             volume_group_id: str | None = None, compartment_id: str | None = None,
             availability_domain: str | None = None) -> CopyJob:
        """Resolve the volumes and the destination; refuse what cannot be copied, before anything exists."""
        if not destination_region or destination_region == source_region:
            raise InvalidRequest("invalid-destination-region", f"the destination region must differ from the "
                                 f"source region {source_region!r}, not {destination_region!r}")
        if not _REGION.fullmatch(destination_region):
            raise InvalidRequest("invalid-destination-region", f"destination_region {destination_region!r} is not "
                                 "a region identifier such as eu-frankfurt-1")
        check_sources(volume_id, volume_group_id)
        if compartment_id:
            check_ocid("compartment_id", compartment_id, COMPARTMENT_KINDS, code="invalid-compartment")
        ads = self._destination_ads(destination_region)
        if availability_domain and availability_domain not in ads:
            raise InvalidRequest("invalid-availability-domain", f"{availability_domain!r} is not an availability "
                                 f"domain of {destination_region} ({', '.join(ads)})")
        machine, sources = resolve_sources(self.source, volume_id, volume_group_id, refuse_attached=False)
        ad = availability_domain or ads[0]
        compartment = compartment_id or self.run.settings.compartment_id
        key = "|".join([source_region, destination_region, compartment, ad, *(s.id for s in sources)])
        copy_id = hashlib.sha256(key.encode()).hexdigest()[:32]
        self.log.info("copy %s: %s from %s to %s, restored in %s of %s", copy_id,
                      ", ".join(f"{s.id} ({s.size_bytes // 1024 ** 3} GB{', boot' if s.boot else ''})"
                                for s in sources), source_region, destination_region, ad, compartment)
        return CopyJob(copy_id, source_region, destination_region, compartment, ad, machine, tuple(sources))

    def _destination_ads(self, region: str) -> list[str]:
        """The destination region's availability domains. A region that cannot be reached (no such
        region: its endpoint has no address) or that refuses the request is refused; one that
        answers 429 or 5xx is busy, which a retry of the step may get past."""
        try:
            answer = cloud.with_backoff(self.destination.identity.list_availability_domains,
                                        self.run.settings.compartment_id, attempts=REGION_PROBE_ATTEMPTS,
                                        retry_strategy=oci.retry.NoneRetryStrategy())
        except oci.exceptions.ServiceError as exc:
            if exc.status == 429 or exc.status >= 500:
                raise
            raise InvalidRequest("invalid-destination-region", f"region {region!r} did not list its availability "
                                 f"domains: {exc.status} {exc.code}: {exc.message}") from None
        except (requests.exceptions.RequestException, oci.exceptions.RequestException) as exc:
            raise InvalidRequest("invalid-destination-region", f"region {region!r} does not answer (is it a region "
                                 f"these credentials reach?): {type(exc).__name__}") from None
        return [ad.name for ad in answer.data]

    def tags(self, job: CopyJob, position: int) -> dict[str, str]:
        """The tags of what the copy makes for one disk (the sweep finds a dead run's by them)."""
        tags = dict(self.run.settings.extra_tags)
        tags.update({contract.TAG_MANAGED_BY: contract.MANAGED_BY, contract.TAG_COPY_ID: job.copy_id,
                     contract.TAG_DISK: str(position), contract.TAG_FLOW_RUN: self.run.run_id})
        return tags

    # -- one disk ------------------------------------------------------------------------------

    @step("copy-disk")
    def copy_disk(self, job: CopyJob, position: int,
                  on_stage: Callable[[int, str], None] | None = None) -> CopiedDisk:
        """Back up, copy, restore one disk; its intermediate backups deleted when it is restored."""
        source = job.sources[position]
        kind = VolumeKind(source.boot)
        seconds: dict[str, float] = {}
        found = self._restored(job, position)
        if found is not None and found.lifecycle_state == "AVAILABLE":
            self.log.info("disk %d (%s): restored already as %s; reused", position, source.id, found.id)
            return CopiedDisk(position, source.id, found.id, source.boot, int(found.size_in_gbs), seconds, True)

        def stage(name: str) -> None:
            self.log.info("disk %d (%s): %s", position, source.id, name)
            if on_stage:
                on_stage(position, name)

        name = f"copy-{job.copy_id[:12]}-disk{position}"
        start = time.monotonic()
        stage("backing up")
        backup, backup_undo = self._backup(job, position, kind, name)
        seconds["backup"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        stage(f"copying to {job.destination_region}")
        with self._copies:
            copy, copy_undo = self._copy(job, position, kind, backup.id, name)
        seconds["copy"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        stage("restoring")
        volume_id = self._restore(job, position, source, kind, copy.id)
        seconds["restore"] = round(time.monotonic() - start, 1)
        stage("restored")
        for undo in (copy_undo, backup_undo):  # intermediate: gone once the volume exists
            self.run.ledger.undo(undo)
        volume = cloud.get_volume(self.destination, volume_id)
        self.log.info("disk %d (%s): restored in %s as %s (%d GB), %.0f MiB/s end to end; %s", position, source.id,
                      job.destination_region, volume_id, volume.size_in_gbs,
                      source.size_bytes / 1024 ** 2 / max(sum(seconds.values()), 0.001),
                      ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        return CopiedDisk(position, source.id, volume_id, source.boot, int(volume.size_in_gbs), seconds)

    def _backup(self, job: CopyJob, position: int, kind: VolumeKind, name: str) -> tuple[Any, Undo]:
        storage = self.source.blockstorage
        existing = [b for b in self._list(storage, kind, job.sources[position].compartment_id,
                                          **{kind.volume_filter: job.sources[position].id})
                    if b.display_name == name and b.lifecycle_state in ("CREATING", "AVAILABLE")]
        if existing:
            backup = existing[0]
        else:
            backup = cloud.with_backoff(getattr(storage, kind.create_backup),
                                        kind.backup_details(job.sources[position].id, name, self.tags(job, position)),
                                        opc_retry_token=self.run.retry_token(f"backup/{job.copy_id}/{position}")).data
        undo = self.run.ledger.register("backup", backup.id, lambda: self._delete_backup(storage, kind, backup.id))
        return self._wait(storage, kind, backup.id), undo

    def _copy(self, job: CopyJob, position: int, kind: VolumeKind, backup_id: str, name: str) -> tuple[Any, Undo]:
        existing = [b for b in self._list(self.destination.blockstorage, kind, job.sources[position].compartment_id,
                                          **{kind.source_filter: backup_id})
                    if b.lifecycle_state in ("CREATING", "AVAILABLE")]
        if existing:
            copy = existing[0]
        else:
            copy = cloud.with_backoff(getattr(self.source.blockstorage, kind.copy_backup), backup_id,
                                      kind.copy_details(job.destination_region, name),
                                      opc_retry_token=self.run.retry_token(f"copy/{job.copy_id}/{position}")).data
        storage = self.destination.blockstorage
        undo = self.run.ledger.register("backup copy", copy.id, lambda: self._delete_backup(storage, kind, copy.id))
        cloud.with_backoff(getattr(storage, kind.update_backup), copy.id,
                           kind.update_details(self.tags(job, position)))
        return self._wait(storage, kind, copy.id), undo

    def _restore(self, job: CopyJob, position: int, source: SourceVolume, kind: VolumeKind, copy_id: str) -> str:
        storage = self.destination.blockstorage
        tags = {**self.tags(job, position), contract.TAG_COPY_OF: source.id, contract.TAG_STATE: contract.STATE_WRITING}
        if source.firmware:
            tags[contract.TAG_FIRMWARE] = source.firmware
        if job.machine:
            tags[contract.TAG_MACHINE] = job.machine
        found = self._restored(job, position)
        token = self.run.retry_token(f"restore/{job.copy_id}/{position}")
        if found is not None and found.lifecycle_state in ("PROVISIONING", "RESTORING", "AVAILABLE"):
            volume = found
        elif kind.boot:
            volume = cloud.with_backoff(storage.create_boot_volume, models.CreateBootVolumeDetails(
                availability_domain=job.availability_domain, compartment_id=job.compartment_id,
                display_name=source.display_name, freeform_tags=tags,
                source_details=models.BootVolumeSourceFromBootVolumeBackupDetails(id=copy_id)),
                opc_retry_token=token).data
        else:
            volume = cloud.with_backoff(storage.create_volume, models.CreateVolumeDetails(
                availability_domain=job.availability_domain, compartment_id=job.compartment_id,
                display_name=source.display_name, freeform_tags=tags,
                source_details=models.VolumeSourceFromVolumeBackupDetails(id=copy_id)),
                opc_retry_token=token).data
        self.run.ledger.register("restored volume", volume.id, lambda: cloud.discard_volume(
            self.destination, job.compartment_id, volume.id, keep=False))
        get = storage.get_boot_volume if kind.boot else storage.get_volume
        cloud.wait_for_state(lambda: get(volume.id).data, "AVAILABLE", f"restored volume {volume.id}",
                             BACKUP_TIMEOUT, poll=self.poll_seconds, failed=("FAULTY", "TERMINATING", "TERMINATED"))
        return volume.id

    def _restored(self, job: CopyJob, position: int) -> Any | None:
        tags = {contract.TAG_COPY_ID: job.copy_id, contract.TAG_DISK: str(position)}
        found = cloud.find_volumes(self.destination, job.compartment_id, tags)
        return found[0] if found else None

    @staticmethod
    def _list(storage: Any, kind: VolumeKind, compartment_id: str, **filters: Any) -> list[Any]:
        return oci.pagination.list_call_get_all_results(getattr(storage, kind.list_backups), compartment_id,
                                                        **filters).data

    def _wait(self, storage: Any, kind: VolumeKind, backup_id: str) -> Any:
        return cloud.wait_for_state(lambda: getattr(storage, kind.get_backup)(backup_id).data, "AVAILABLE",
                                    f"backup {backup_id}", BACKUP_TIMEOUT, poll=self.poll_seconds,
                                    failed=("FAULTY", "TERMINATING", "TERMINATED"))

    @staticmethod
    def _delete_backup(storage: Any, kind: VolumeKind, backup_id: str) -> None:
        cloud.delete_if_present(getattr(storage, kind.delete_backup), backup_id)

    # -- the whole copy ------------------------------------------------------------------------

    def copy_all(self, job: CopyJob, positions: Sequence[int],
                 on_stage: Callable[[int, str], None] | None = None) -> list[CopiedDisk]:
        """Every disk at once."""
        with ThreadPoolExecutor(max(1, len(positions)), thread_name_prefix="copy") as pool:
            futures = [pool.submit(self.copy_disk, job, p, on_stage) for p in positions]
            return [f.result() for f in futures]

    @step("finish-copy")
    def finish(self, job: CopyJob, copied: Sequence[CopiedDisk]) -> str | None:
        """The restored volumes tagged copied (no longer this run's to remove), in one volume group
        named after the machine for a group's copy; the group's id."""
        ordered = sorted(copied, key=lambda c: c.position)
        group_id = None
        if job.machine:
            existing = {cloud.get_volume(self.destination, c.volume_id).volume_group_id for c in ordered}
            if len(existing) == 1 and None not in existing:
                group_id = existing.pop()
            else:
                group = cloud.create_volume_group(self.destination, job.compartment_id, job.availability_domain,
                                                  job.machine, [c.volume_id for c in ordered],
                                                  {**self.tags(job, 0), contract.TAG_MACHINE: job.machine},
                                                  self.run.retry_token(f"group/{job.copy_id}"))
                undo = self.run.ledger.register("volume group", group.id,
                                                 lambda: cloud.delete_volume_group(self.destination, group.id))
                cloud.wait_volume_group_available(self.destination, group.id)
                self.run.ledger.release(undo)
                group_id = group.id
        for c in ordered:
            cloud.tag_volume(self.destination, c.volume_id, {contract.TAG_STATE: contract.STATE_IMPORTED})
            self.run.ledger.release(self.run.ledger.find("restored volume", c.volume_id))
        self.log.info("%d restored volume(s) handed over in %s%s", len(ordered), job.destination_region,
                      f", in volume group {group_id} ({job.machine})" if group_id else "")
        return group_id

    def summary(self, job: CopyJob, copied: Sequence[CopiedDisk], group_id: str | None) -> CopySummary:
        return CopySummary(job.copy_id, job.source_region, job.destination_region, job.compartment_id,
                           job.availability_domain, job.machine, group_id,
                           sorted(copied, key=lambda c: c.position), dict(self.run.steps))


def sweep_backups(clients: cloud.Clients, compartments: Sequence[str], tags: dict[str, str],
                  orphaned: Callable[[Any], bool] = lambda backup: True) -> list[str]:
    """Delete the copies' intermediate backups (volume and boot volume backups with a ``copy-id``)
    carrying ``tags`` that ``orphaned`` picks, in the clients' region."""
    removed = []
    for compartment in dict.fromkeys(compartments):
        for kind in (VolumeKind(False), VolumeKind(True)):
            for backup in RegionCopy._list(clients.blockstorage, kind, compartment):
                backup_tags = backup.freeform_tags or {}
                if backup.lifecycle_state in ("TERMINATING", "TERMINATED") or contract.TAG_COPY_ID not in backup_tags:
                    continue
                if all(backup_tags.get(k) == v for k, v in tags.items()) and orphaned(backup):
                    RegionCopy._delete_backup(clients.blockstorage, kind, backup.id)
                    removed.append(backup.id)
    return removed


def sweep_copy(source: cloud.Clients, destination: cloud.Clients, compartments: Sequence[str],
               tags: dict[str, str]) -> dict[str, list[str]]:
    """Delete the backups (both regions) and the unfinished restored volumes carrying ``tags``
    (a dead copy run's): the crash hook's undo for a copy."""
    removed: dict[str, list[str]] = {"backups": sweep_backups(source, compartments, tags)
                                     + sweep_backups(destination, compartments, tags), "volumes": []}
    for compartment in dict.fromkeys(compartments):
        for volume in cloud.find_volumes(destination, compartment, tags):
            if (volume.freeform_tags or {}).get(contract.TAG_STATE) == contract.STATE_WRITING:
                cloud.discard_volume(destination, compartment, volume.id, keep=False)
                removed["volumes"].append(volume.id)
    return removed
