"""The import of one object version onto one volume, step by step, with no orchestrator in sight.

An :class:`Importer` holds a :class:`~diskimport.run.Run` (clients, settings, ledger, retry
tokens, tags, keys, the worker VM) and adds an import's own steps: the object read and
inspected, earlier runs of the same version found (its volume reused, a dead run's resumed,
a live one waited for), the volume made beside the worker VM, written
(:class:`~diskimport.volume_write.VolumeWrite`), finished and handed over. A flow calls the
steps in order, and a test calls them directly; a machine's import
(:mod:`diskimport.machine_import`) repeats its volume steps for every disk.

Unwinding is the run's: when the ``with run:`` block fails, the attachment is detached, the
worker VM terminated and the volume deleted (or kept, tagged failed, with
``keep_failed_volume``), newest first.
"""

from __future__ import annotations

import datetime as dt
import resource
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from . import cloud, contract, naming, sync_backups
from .contract import ImportOptions
from .errors import InvalidRequest, OutOfCapacity
from .guest.filesystems import FilesystemCheck
from .images import packed
from .records import FinishedVolume, FoundVolume, InspectedImage, ObjectVersion, Volume, WorkerVM, WriteResult
from .run import Run, Yielding, step
from .summaries import DiskImportSummary, ReusedImportSummary
from .volume_write import VolumeWrite
from .worker_vm.session import WorkerSession

COMPETING_POLL_SECONDS = 2.0
COMPETING_WAIT_SECONDS = 24 * 3600.0  # how long a run waits for another run of the same version


class CompetingImport(Yielding):
    """Another live run is writing the same object version; this run yields to it."""

    def __init__(self, flow_run: str, volume_id: str) -> None:
        super().__init__(f"flow run {flow_run} is importing this object version (volume {volume_id})")
        self.flow_run = flow_run
        self.volume_id = volume_id


@dataclass(frozen=True)
class PreviousImports:
    """What earlier or concurrent runs of the import left: an imported volume, or ones to resume."""

    imported: FoundVolume | None
    resumable: tuple[FoundVolume, ...]
    force: bool = False  # a new volume is wanted even if one was imported
    sync_base: FoundVolume | None = None  # a sync: the volume of the object's earlier version, updated in place


def _position(tag: str | None) -> int | None:
    return int(tag) if tag is not None and tag.isdigit() else None


def found_volume(volume: Any) -> FoundVolume:
    """A listed volume as the record the import steps read (state, run, tags)."""
    tags = dict(volume.freeform_tags or {})
    return FoundVolume(volume.id, tags.get(contract.TAG_STATE), volume.availability_domain, volume.size_in_gbs,
                       volume.display_name, tags.get(contract.TAG_FLOW_RUN),
                       volume.time_created.isoformat() if volume.time_created else "",
                       _position(tags.get(contract.TAG_DISK)), tags)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Importer:
    """One import's steps, on its :class:`~diskimport.run.Run`."""

    def __init__(self, run: Run, competing_poll_seconds: float = COMPETING_POLL_SECONDS,
                 competing_wait_seconds: float = COMPETING_WAIT_SECONDS) -> None:
        self.run = run
        self.clients = run.clients
        self.settings = run.settings
        self.log = run.log
        self.competing_poll_seconds = competing_poll_seconds
        self.competing_wait_seconds = competing_wait_seconds
        self.syncing = False  # a sync-mode import: its volume's manifest is recorded (diskimport.delta)

    @property
    def steps(self) -> dict[str, float]:
        return self.run.steps

    # -- before anything is created -----------------------------------------------------------

    @step("read-metadata")
    def read_object(self, namespace: str | None, bucket: str, object_name: str, etag: str | None) -> ObjectVersion:
        """HEAD the object; refuse a missing one, or one whose ETag is not the one asked for."""
        version = self.run.objects.version(namespace, bucket, object_name, etag)
        self.log.info("%s: %d bytes, ETag %s", object_name, version.size, version.etag)
        return version

    @staticmethod
    def options(version: ObjectVersion, parameters: ImportOptions) -> ImportOptions:
        """The import's options: the run's parameters win over the object's ``opc-meta-*`` metadata."""
        return contract.merge(parameters, contract.parse_options(version.metadata))

    @step("inspect-header")
    def inspect(self, version: ObjectVersion, options: ImportOptions) -> InspectedImage:
        """Learn format and virtual size from the object's head and tail; refuse dangerous images."""
        pieces: list[tuple[int, bytes]] = []
        found, inner = packed.inspect_object(self.run.objects.recorder(version, pieces), version.size,
                                             version.name, options.format, options.virtual_size,
                                             self.settings.max_virtual_size_bytes)
        self.run.objects.keep(version, pieces)
        if inner is None:
            image = InspectedImage(found.format, found.virtual_size, found.detected_as, found.driver,
                                   delta_base=found.delta_base)
        else:
            image = InspectedImage(found.format, found.virtual_size, found.detected_as, found.driver, inner.container,
                                   inner.inner_offset, inner.inner_size)
        self.log.info("%s is %s (detected as %s%s), %d bytes virtual; %d bytes of its head and tail read",
                      version.name, image.format, image.detected_as,
                      f", inside a {image.container}" if image.container else "", image.virtual_size,
                      sum(len(data) for _, data in pieces))
        return image

    def found_volumes(self, version: ObjectVersion) -> list[FoundVolume]:
        volumes = cloud.find_volumes(self.clients, self.settings.compartment_id,
                                     {contract.TAG_IMPORT_ID: version.import_id})
        return [found_volume(v) for v in volumes]

    def _competitor(self, found: Sequence[FoundVolume], own: FoundVolume | None = None) -> FoundVolume | None:
        """A volume of this import that another live run is writing: the run this one yields to.

        When two runs have created volumes, the one whose volume the service created first
        goes on; both runs see the same creation times, so exactly one yields.
        """
        run = self.run
        rivals = [v for v in found if v.state == contract.STATE_WRITING and v.flow_run and v.flow_run != run.run_id
                  and (own is None or (v.created, v.id) < (own.created, own.id)) and run.run_is_active(v.flow_run)]
        return rivals[0] if rivals else None

    @step("find-previous-import")
    def previous_imports(self, version: ObjectVersion, force: bool = False, sync: bool = False,
                         delta_base: str | None = None) -> PreviousImports:
        """What other runs of this import did. Waits while another live run writes the same version.

        Returns the imported volume to reuse (none with ``force``) and volumes left half
        written by runs that are gone, which this run resumes. With ``sync`` and neither, the
        volume of the object's latest earlier import, to update in place (:meth:`sync_base`).
        A delta upload (``delta_base``: the import its overlay applies onto) is a sync onto the
        volume of exactly that import, or refused (``delta-base-mismatch``).
        """
        if delta_base is not None and (force or not sync):
            raise InvalidRequest("delta-base-mismatch", f"{version.name} is a delta over import {delta_base}: it is "
                                 "applied onto that import's volume only, so sync cannot be false nor force true")
        self.syncing = sync
        deadline = time.monotonic() + self.competing_wait_seconds
        while True:
            found = self.found_volumes(version)
            imported = next((v for v in found if v.state == contract.STATE_IMPORTED), None)
            competitor = self._competitor(found)
            if competitor is None or (imported is not None and not force):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {competitor.flow_run} has been importing this object version "
                                   f"(volume {competitor.id}) for longer than {self.competing_wait_seconds:.0f}s "
                                   "that this run waits; retry this run once it has ended")
            self.log.info("flow run %s is importing this object version (volume %s); waiting for it",
                          competitor.flow_run, competitor.id)
            time.sleep(self.competing_poll_seconds)
        resumable = () if force else tuple(
            v for v in found if v.state == contract.STATE_WRITING
            and (v.flow_run == self.run.run_id or not self.run.run_is_active(v.flow_run or "")))
        base = self.sync_base(version) if sync and not force and imported is None and not resumable else None
        if delta_base is not None and imported is None and not resumable:
            self._check_delta_base(version, base, delta_base)
        previous = PreviousImports(None if force else imported, resumable, force, base)
        if base is not None:
            self.log.info("syncing onto volume %s, which holds version %s of %s: only what differs is written",
                          base.id, base.tags.get(contract.TAG_ETAG), version.name)
        if previous.imported is not None:
            self.log.info("already imported as volume %s; nothing is written again", previous.imported.id)
        elif resumable:
            self.log.info("resuming volume(s) a dead run left half written: %s", ", ".join(v.id for v in resumable))
        return previous

    def sync_base(self, version: ObjectVersion) -> FoundVolume | None:
        """The imported volume holding the object's latest earlier version, if any: a sync writes onto it
        (or the volume a failed sync kept, or one a sync whose run died was writing).

        Syncs of one object run one at a time: while another live run syncs another version onto
        the object's volume, this one waits for it (up to the wait a competing import gets).
        Refused (and nothing changed) when that volume holds a newer version than this one, or is
        attached to an instance that is not stopped: after a cutover the machine is what holds the
        truth, and a sync would write under it.
        """
        found = self._sync_volumes_once_free(version)
        # an earlier version's import, or a sync that failed or died (its volume kept): synced again, only
        # what differs
        earlier = [v for v in found if v.disk is None and (
            (v.state == contract.STATE_IMPORTED and v.tags.get(contract.TAG_IMPORT_ID) != version.import_id)
            or (v.state == contract.STATE_FAILED and v.synced_from is not None)
            or (v.state == contract.STATE_WRITING and v.synced_from is not None
                and not self.run.run_is_active(v.flow_run or "")))]
        if not earlier:
            return None
        base = max(earlier, key=lambda v: (_version_time(v), v.created, v.id))
        if version.modified is not None and _version_time(base) > version.modified:
            raise InvalidRequest("sync-older-version", f"volume {base.id} holds version "
                                 f"{base.tags.get(contract.TAG_ETAG)} of {version.name}, uploaded after this one "
                                 f"({version.etag}): a sync never writes an older version over a newer one")
        if base.tags.get(contract.TAG_CUTOVER_TO):
            raise InvalidRequest("sync-volume-in-use", f"volume {base.id} (version {base.tags.get(contract.TAG_ETAG)} "
                                 f"of {version.name}) was cut over to instance {base.tags[contract.TAG_CUTOVER_TO]}: the "
                                 "machine holds the truth now; roll the cutover back (rollback-cutover) to sync again")
        for attachment in cloud.live_attachments(self.clients, self.settings.compartment_id, base.id):
            instance = cloud.with_backoff(self.clients.compute.get_instance, attachment.instance_id).data
            if instance.lifecycle_state not in ("STOPPED", "TERMINATING", "TERMINATED"):
                raise InvalidRequest("sync-volume-in-use", f"volume {base.id} (version "
                                     f"{base.tags.get(contract.TAG_ETAG)} of {version.name}) is attached to instance "
                                     f"{instance.id}, which is {instance.lifecycle_state}: a sync does not write "
                                     "under a running machine; stop it or detach the volume first")
        return base

    def _sync_volumes_once_free(self, version: ObjectVersion) -> list[FoundVolume]:
        """The object's volumes, once no other live run is syncing onto one of them."""
        source = contract.source_id(version.namespace, version.bucket, version.name)
        deadline = time.monotonic() + self.competing_wait_seconds
        while True:
            found = [found_volume(v) for v in cloud.find_volumes(self.clients, self.settings.compartment_id,
                                                                 {contract.TAG_SOURCE: source})]
            busy = [v for v in found if v.state == contract.STATE_WRITING and v.synced_from is not None
                    and v.flow_run and v.flow_run != self.run.run_id and self.run.run_is_active(v.flow_run)]
            if not busy:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {busy[0].flow_run} has been syncing {version.name} onto volume "
                                   f"{busy[0].id} for longer than {self.competing_wait_seconds:.0f}s that this run "
                                   "waits; retry this run once it has ended")
            self.log.info("flow run %s is syncing another version of %s onto volume %s; syncs of one object run "
                          "one at a time, so this one waits", busy[0].flow_run, version.name, busy[0].id)
            time.sleep(self.competing_poll_seconds)

    def _check_delta_base(self, version: ObjectVersion, base: FoundVolume | None, delta_base: str) -> None:
        held = base.held_whole if base is not None else None
        if held is None or contract.import_id(version.namespace, version.bucket, version.name, held) != delta_base:
            where = (f"its volume {base.id} holds version {held}" if base is not None
                     else "no volume holds an earlier version of it")
            raise InvalidRequest("delta-base-mismatch", f"{version.name} is a delta over import {delta_base}, but "
                                 f"{where}: push again (the client starts from the import the volume holds)")

    def version_tags(self, version: ObjectVersion, virtual_size: int) -> dict[str, str]:
        """The tags that say which object, which version of it (by upload time) and what disk size a volume holds."""
        tags = {contract.TAG_SOURCE: contract.source_id(version.namespace, version.bucket, version.name),
                contract.TAG_VIRTUAL_SIZE: str(virtual_size)}
        if version.modified is not None:
            tags[contract.TAG_VERSION_TIME] = str(int(version.modified))
        return tags

    def adopt_for_sync(self, base: FoundVolume, version: ObjectVersion, image: InspectedImage) -> Volume:
        """Take the earlier import's volume for this version: its backup found (taken ahead when the import
        before ended) or taken now (:mod:`.sync_backups`; the sync writes once the backup is AVAILABLE:
        ``Volume.backup_id``), then tagged as this import's, being written, and synced from the version
        it held; grown first if the new disk is larger. Its undo keeps it."""
        run = self.run
        previous_size = int(base.tags.get(contract.TAG_VIRTUAL_SIZE) or 0)
        backup = sync_backups.backup_before_sync(self.clients, self.settings.compartment_id, base, version.etag,
                                                 run.retry_token(f"sync-backup/{version.import_id}"), self.log)
        tags = {**run.tags(version.subject), **self.version_tags(version, max(previous_size, image.virtual_size)),
                contract.TAG_STATE: contract.STATE_WRITING, contract.TAG_SYNCED_FROM: base.held_whole or ""}
        cloud.tag_volume(self.clients, base.id, tags)
        self.register_volume(base.id, synced=True)
        size_gb = max(base.size_in_gbs, cloud.volume_size_gb(image.virtual_size))
        if size_gb > base.size_in_gbs:
            cloud.update_volume(self.clients, base.id, size_in_gbs=size_gb)
            cloud.wait_volume_available(self.clients, base.id)
            self.log.info("volume %s grown from %d GB to %d GB for the new version", base.id, base.size_in_gbs,
                          size_gb)
        self.log.info("volume %s is backed up as %s before the sync writes; rollback-sync restores it", base.id,
                      backup.id)
        return Volume(base.id, base.availability_domain, size_gb, base.display_name, fresh=False,
                      synced_from=tags[contract.TAG_SYNCED_FROM], previous_virtual_size=previous_size or None,
                      manifest=base.tags.get(contract.TAG_MANIFEST) if base.state == contract.STATE_IMPORTED else None,
                      backup_id=backup.id)

    # -- resources ----------------------------------------------------------------------------

    def remove_stale_workers(self, version: ObjectVersion) -> list[str]:
        """Terminate the worker VMs this import's dead runs (or this run's killed attempt) left,
        and delete the PARs they left on the object."""
        removed = self.run.remove_stale_workers(version.subject)
        self.run.remove_stale_pars(version.subject, version.namespace, version.bucket, version.name)
        return removed

    def volume_name(self, version: ObjectVersion, options: ImportOptions) -> str:
        if options.display_name:
            return options.display_name
        try:
            return naming.volume_display_name(self.settings.volume_name_template, version.name, version.etag)
        except ValueError as exc:
            raise InvalidRequest("invalid-setting", str(exc)) from None

    def create_volume(self, version: ObjectVersion, availability_domain: str, size_gb: int, name: str,
                      extra_tags: dict[str, str] | None = None) -> Volume:
        """Create the volume (tagged ``writing``) and wait until it is available.

        Its undo is registered as soon as the create returns; a volume whose wait fails is
        deleted at once (the next try creates another, with a new retry token).
        """
        run = self.run
        step_name = f"create-volume/{version.import_id}/{availability_domain}"
        if extra_tags and contract.TAG_DISK in extra_tags:  # a machine's disks: one create each
            step_name += f"/disk{extra_tags[contract.TAG_DISK]}"
        tags = {**run.tags(version.subject), **(extra_tags or {}), contract.TAG_STATE: contract.STATE_WRITING}
        created = cloud.create_volume(self.clients, self.settings.compartment_id, availability_domain, size_gb,
                                      self.settings.vpus_during_import, name, tags, run.retry_token(step_name))
        self.register_volume(created.id)
        try:
            ready = cloud.wait_volume_available(self.clients, created.id)
        except BaseException:
            self.discard_now(created.id, step_name)
            raise
        self.log.info("volume %s (%d GB, %s) created for %s", ready.id, ready.size_in_gbs, availability_domain,
                      name)
        return Volume(ready.id, ready.availability_domain, ready.size_in_gbs, ready.display_name, fresh=True)

    def adopt_blank_volume(self, version: ObjectVersion, availability_domain: str, size_gb: int, name: str,
                           extra_tags: dict[str, str], volume_id: str | None) -> Volume | None:
        """Make the blank volume of a pooled worker VM this import's volume, as ``create_volume``
        would have made it, if it is the size and compartment that needs; otherwise delete it (the
        import then creates its own beside the worker). Its undo is registered at once."""
        if volume_id is None:
            return None
        run = self.run
        step_name = f"blank-volume/{version.import_id}/{availability_domain}"
        self.register_volume(volume_id)
        try:
            blank = cloud.wait_volume_available(self.clients, volume_id)
        except Exception as exc:  # a blank volume that failed: the import makes its own
            self.log.warning("the pooled worker VM's blank volume %s cannot be used: %s", volume_id, exc)
            self.discard_now(volume_id, step_name)
            return None
        if blank.size_in_gbs != size_gb or blank.compartment_id != self.settings.compartment_id:
            self.discard_now(volume_id, step_name)
            return None
        tags = {**run.tags(version.subject), **extra_tags, contract.TAG_STATE: contract.STATE_WRITING}
        cloud.update_volume(self.clients, volume_id, display_name=name, freeform_tags=tags)
        self.log.info("volume %s (%d GB, %s), made blank beside the pooled worker VM, taken for %s", volume_id,
                      blank.size_in_gbs, availability_domain, name)
        return Volume(volume_id, blank.availability_domain, blank.size_in_gbs, name, fresh=True)

    def register_volume(self, volume_id: str, synced: bool = False) -> Any:
        """The volume's undo: deleted, or kept and tagged failed with ``keep_failed_volume`` or after
        a failure that keeps them (a failed guest adaptation); never when the run only yields to another.
        A volume being synced held an earlier import: it is always kept (tagged failed, its tags saying
        which version it was being synced from and to)."""
        run = self.run
        return run.ledger.register("volume", volume_id, lambda: cloud.discard_volume(
            self.clients, self.settings.compartment_id, volume_id,
            keep=(synced or self.settings.keep_failed_volume or run.keeps_volumes) and not run.yielding))

    def adopt_volume(self, found: FoundVolume) -> Volume:
        """Resume a half-written volume of a dead run: tag it as this run's, undo it like a new one
        (a half-synced one is synced again: only what still differs is written)."""
        cloud.tag_volume(self.clients, found.id, {contract.TAG_FLOW_RUN: self.run.run_id})
        self.register_volume(found.id, synced=found.synced_from is not None)
        return found.as_volume()

    @step("provision")
    def provision(self, version: ObjectVersion, image: InspectedImage, options: ImportOptions,
                  previous: PreviousImports) -> tuple[WorkerVM, Volume]:
        """The worker VM and the volume, made side by side; the next AD when one is out of capacity.

        A volume left half written by a dead run is resumed in its own AD. Raises
        :class:`CompetingImport` when another live run created its volume at the same time
        and goes on instead of this one, or another run finished the import meanwhile (a run
        may wait long for an import slot; not with ``previous.force``): the caller then looks
        for previous imports again, and returns that volume.
        """
        ads = self.run.availability_domains(options.ad_number)
        size_gb = cloud.volume_size_gb(image.virtual_size)
        name = self.volume_name(version, options)
        resumable = [v for v in previous.resumable if v.size_in_gbs >= size_gb or v.synced_from is not None]
        candidates = [v.availability_domain for v in resumable]
        candidates += [ad for ad in ads if ad not in candidates]
        if previous.sync_base is not None:  # the worker goes where the volume is
            resumable, candidates = [previous.sync_base], [previous.sync_base.availability_domain]
        tags = self.version_tags(version, image.virtual_size)
        last_error: Exception | None = None
        for ad in candidates:
            reuse = next((v for v in resumable if v.availability_domain == ad), None)
            blank = None if reuse or self.run.pool is None else self.adopt_blank_volume(
                version, ad, size_gb, name, tags, self.run.take_ahead(version.subject, ad))
            with ThreadPoolExecutor(1, thread_name_prefix="provision") as pool:
                creates = [] if reuse or blank else [pool.submit(self.create_volume, version, ad, size_gb, name, tags)]
                worker, last_error = self.worker_beside(version, ad, creates)
                if worker is None:
                    continue
                if reuse is not None and reuse is previous.sync_base:
                    volume = self.adopt_for_sync(reuse, version, image)
                else:
                    volume = self.adopt_volume(reuse) if reuse else blank or creates[0].result()
            found = self.found_volumes(version)
            own = next((v for v in found if v.id == volume.id), None)
            rival = self._competitor(found, own) if own is not None else None
            # another run may have finished the import while this one waited for an import slot
            rival = rival or (None if previous.force else next(
                (v for v in found if v.state == contract.STATE_IMPORTED and v.id != volume.id), None))
            if rival is not None:
                raise CompetingImport(rival.flow_run or "", rival.id)
            return worker, volume
        raise OutOfCapacity(f"no availability domain had capacity for the worker ({', '.join(candidates)}): "
                            f"{last_error}")

    def worker_beside(self, version: ObjectVersion, ad: str, creates: Sequence[Future[Volume]]
                      ) -> tuple[WorkerVM | None, OutOfCapacity | None]:
        """Launch the worker VM in ``ad`` while its volumes are created (``creates``); when ``ad``
        has no capacity for the worker, None and why, the volumes made there given up."""
        try:
            return self.run.launch_worker(version.subject, ad), None
        except OutOfCapacity as exc:
            self.log.warning("%s is out of capacity for the worker shape; trying the next availability domain", ad)
            for create in creates:
                if create.exception() is None:
                    self.discard_now(create.result().id, f"create-volume/{version.import_id}/{ad}")
            return None, exc

    def discard_now(self, volume_id: str, step_name: str) -> None:
        """Delete a volume this run just created and is giving up (its next create is a new one)."""
        self.run.ledger.release(self.run.ledger.find("volume", volume_id))
        cloud.discard_volume(self.clients, self.settings.compartment_id, volume_id, keep=False)
        self.run.undone(step_name)

    def volume_write(self, session: WorkerSession, worker: WorkerVM, volume: Volume, version: ObjectVersion,
                     image: InspectedImage) -> VolumeWrite:
        write = VolumeWrite(self.run, session, worker, volume, version, image)
        write.records_manifest = self.syncing or image.delta_base is not None  # what the next delta starts from
        return write

    # -- handing over ---------------------------------------------------------------------------

    @step("finish-volume")
    def finish_volume(self, volume: Volume, options: ImportOptions) -> FinishedVolume:
        """Set the volume's lasting performance and backup policy, tag it imported: it is ready.

        From here on the volume is the product, no longer this run's to remove.
        """
        return self.hand_over(volume, options)

    def hand_over(self, volume: Volume, options: ImportOptions) -> FinishedVolume:
        vpus = options.vpus if options.vpus is not None else self.settings.vpus_after_import
        policy = options.backup_policy or self.settings.backup_policy
        cloud.set_volume_performance(self.clients, volume.id, vpus)
        policy_id = None
        if policy:
            policy_id = cloud.backup_policy_id(self.clients, policy)
            cloud.assign_backup_policy(self.clients, volume.id, policy_id)
        cloud.tag_volume(self.clients, volume.id, {contract.TAG_STATE: contract.STATE_IMPORTED})
        self.run.ledger.release(self.run.ledger.find("volume", volume.id))
        self.log.info("volume %s is imported: %d VPUs/GB%s", volume.id, vpus,
                      f", backup policy {policy}" if policy else "")
        if self.syncing:  # the next sync writes after this backup, taken now that nothing writes the volume
            sync_backups.backup_ahead(self.clients, self.settings.compartment_id, volume.id,
                                      self.run.retry_token(f"sync-ahead/{volume.id}"), self.log)
        return FinishedVolume(vpus, policy_id)

    def summary(self, version: ObjectVersion, image: InspectedImage, volume: Volume, finished: FinishedVolume,
                written: WriteResult, checks: Sequence[FilesystemCheck], qemu_img: str,
                ready_at: dt.datetime) -> DiskImportSummary:
        """The finished import's account: the flow run's result, and what its summary shows."""
        return DiskImportSummary(
            import_id=version.import_id, object=version.name, bucket=version.bucket, namespace=version.namespace,
            etag=version.etag, format=image.format, virtual_size=image.virtual_size, object_bytes=version.size,
            volume_id=volume.id, volume_size_gb=volume.size_in_gbs, availability_domain=volume.availability_domain,
            resumed=not volume.fresh, vpus_per_gb=finished.vpus_per_gb, backup_policy_id=finished.backup_policy_id,
            qemu_img=qemu_img, bytes_written=written.virtual_size, fetched_bytes=written.fetched_bytes,
            transfer_seconds=written.seconds, write_phases=written.phases, verified_bytes=written.verified_bytes,
            write_slices=written.slices, transfer_retries=written.retries, ready_at=ready_at.isoformat(),
            peak_rss_mb=peak_rss_mb(), steps=dict(self.steps), filesystems=list(checks),
            synced_from=volume.synced_from, synced=written.synced)

    @staticmethod
    def reused_summary(version: ObjectVersion, volume: FoundVolume) -> ReusedImportSummary:
        """The result of a run that found the object version imported already (by itself or another run)."""
        return ReusedImportSummary(version.import_id, version.name, version.bucket, version.namespace, version.etag,
                                   volume.id, volume.size_in_gbs, volume.availability_domain, volume.flow_run)


def _version_time(volume: FoundVolume) -> float:
    value = volume.tags.get(contract.TAG_VERSION_TIME, "")
    return float(value) if value.isdigit() else 0.0
