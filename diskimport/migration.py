"""The end of a warm migration: rehearse the machine, cut over to it, and roll the cutover back.

The object's **sync volume** (the block volume its sync-mode imports and delta pushes keep up
to date, :mod:`diskimport.delta`) holds the source machine's boot disk. OCI launches only from
boot volumes, and makes those only from images and other boot volumes, so both a rehearsal and
a cutover make a boot volume from the target's platform image (as a bootable machine import
does), copy the disk onto it on a worker VM, check its filesystems, inspect and adapt the guest
(:mod:`diskimport.guest.adaptation`, per the ``TargetMachine`` block), launch it with the firmware
and launch mode the disk and the guest report call for, and watch its console for the login
prompt (``boot_pattern``).

- :meth:`Migration.rehearse` copies from a **clone** of the sync volume (made in a second, point
  in time), so the volume is attached to nothing while the copy runs and the next sync is not
  disturbed; afterwards the machine, its boot volume and the clone are removed, and the report
  says whether it booted and in how long.
- :meth:`Migration.cutover` waits until the sync volume holds the object's current version (the
  operator's final push, with the source stopped), then copies from the volume itself, launches
  the machine and keeps it: the product. The sync volume is never written: it stays the
  pre-cutover state, tagged ``import-cutover-to`` (no sync writes onto it any more). The report
  gives the downtime: from the final upload's end (the object's ``Last-Modified``) to the login
  prompt on the new machine's console.
- :meth:`Migration.rollback` stops the machine and keeps it and its boot volume (tagged
  ``rolled-back``) for inspection; the sync volume, untouched since the final sync, is the
  object's again (its cutover tag removed): the source restarts and the next push syncs onto it.

A machine's data disks are objects of their own, pushed and synced like its boot disk
(``data_objects``): each is cloned (point in time) and the clones are attached to the machine in
order, paravirtualized, for a rehearsal (then removed) as for a cutover (then kept, the product;
their sync volumes are tagged and given back on a rollback like the boot disk's).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from . import cloud, contract
from .errors import InvalidRequest
from .guest import boot
from .importer import found_volume
from .machine_import import TargetMachineLike, boot_volume_from_image, launch_types
from .records import FoundVolume, InspectedImage, ObjectVersion, Subject, Volume, WriteResult
from .run import Run, step
from .volume_write import VolumeWrite
from .worker_vm import slices
from .worker_vm.qemu_img import QemuImg

TAG_CUTOVER_TO = contract.TAG_CUTOVER_TO  # a sync volume cut over: the instance it was cut over to
TAG_REHEARSAL_OF = "import-rehearsal-of"  # a rehearsal's clone, boot volume and machine: the sync volume
TAG_CUTOVER_OF = "import-cutover-of"      # a cutover's machine and boot volume: the sync volume
STATE_ROLLED_BACK = "rolled-back"


@dataclass
class MachineReport:
    """What a rehearsal or a cutover started, and what its console showed."""

    instance_id: str
    boot_volume_id: str
    firmware: str
    boot_volume_type: str
    network_type: str
    launch_reason: str
    adapted: bool
    booted: bool
    boot_seconds: float
    boot_check: str
    console_tail: list[str]
    booted_at: str | None = None
    guest_changes: list[dict[str, Any]] = field(default_factory=list)  # what the adaptation changed, each kept

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Migration:
    """Rehearsal, cutover and rollback of the machine an object's sync volume holds the boot disk of."""

    def __init__(self, run: Run, target: TargetMachineLike, poll_seconds: float = 2.0,
                 wait_seconds: float = 3600.0) -> None:
        self.run, self.target, self.clients, self.log = run, target, run.clients, run.log
        self.poll_seconds, self.wait_seconds = poll_seconds, wait_seconds

    @property
    def steps(self) -> dict[str, float]:
        return self.run.steps

    # -- the sync volume -----------------------------------------------------------------------

    def sync_volumes(self, version: ObjectVersion) -> list[FoundVolume]:
        source = contract.source_id(version.namespace, version.bucket, version.name)
        return [found_volume(v) for v in cloud.find_volumes(self.clients, self.run.settings.compartment_id,
                                                      {contract.TAG_SOURCE: source}) if v.lifecycle_state == "AVAILABLE"]

    @step("find-synced-volume")
    def synced(self, namespace: str | None, bucket: str, object_name: str, wait: bool = False
               ) -> tuple[ObjectVersion, FoundVolume]:
        """The object's current version and the sync volume holding it. With ``wait`` (a cutover
        started as the final push ends), waits while the volume still holds an older version or
        is being synced to this one: the upload's run may not even have started. Refused
        (``cutover-not-synced``) when no volume holds it: none at all, its sync failed, or the wait
        ran out."""
        deadline = time.monotonic() + (self.wait_seconds if wait else 0.0)
        while True:
            version = self.run.objects.version(namespace, bucket, object_name, None)
            found = self.sync_volumes(version)
            holding = [v for v in found if v.state == contract.STATE_IMPORTED and v.disk is None
                       and v.tags.get(contract.TAG_IMPORT_ID) == version.import_id]
            if holding:
                return version, holding[0]
            coming = [v for v in found if v.disk is None and (
                v.state == contract.STATE_IMPORTED
                or (v.state == contract.STATE_WRITING and v.tags.get(contract.TAG_IMPORT_ID) == version.import_id))]
            if not coming or time.monotonic() >= deadline:
                held = ", ".join(f"{v.id} ({v.state}, version {v.tags.get(contract.TAG_ETAG)})" for v in found)
                raise InvalidRequest("cutover-not-synced", f"no sync volume holds version {version.etag} of "
                                     f"{object_name} (its newest upload){': ' + held if held else ''}; push it with "
                                     "sync, and wait for its run to end")
            self.log.info("waiting for version %s of %s to be synced onto %s", version.etag, object_name,
                          coming[0].id)
            time.sleep(self.poll_seconds)

    # -- the three -----------------------------------------------------------------------------

    def rehearse(self, namespace: str | None, bucket: str, object_name: str,
                 data_objects: Sequence[str] = ()) -> dict[str, Any]:
        """Launch the machine from a clone of the sync volume (and of each data disk's, attached in
        order), check it boots, remove it all."""
        version, volume = self.synced(namespace, bucket, object_name)
        data = [self.synced(namespace, bucket, name)[1] for name in data_objects]
        subject = Subject("rehearsal", version.import_id, version.name, version.etag)
        run = self.run
        with run:
            clone = self.clone(volume, subject)
            disks = [self.clone(v, subject) for v in data]
            report = self.start_machine(version, volume, clone, subject, product=False, data=[d.id for d in disks])
            for undo in reversed(run.ledger.pending()):  # the machine, its boot volume, the clones
                run.ledger.undo(undo)
        self.log.info("rehearsal of %s: %s; the machine and the clones are removed", object_name, report.boot_check)
        return {"object": object_name, "etag": version.etag, "volume_id": volume.id, "clone_id": clone.id,
                "data_volumes": [{"object": n, "volume_id": v.id, "clone_id": d.id}
                                 for n, v, d in zip(data_objects, data, disks)],
                "machine": report.as_dict(), "steps": dict(self.steps)}

    def cutover(self, namespace: str | None, bucket: str, object_name: str,
                data_objects: Sequence[str] = ()) -> dict[str, Any]:
        """Start the machine from the sync volume once it holds the final version (each data disk
        from a clone of its own, attached in order), and keep it."""
        version, volume = self.synced(namespace, bucket, object_name, wait=True)
        data = [self.synced(namespace, bucket, name, wait=True)[1] for name in data_objects]
        for synced in (volume, *data):
            if synced.tags.get(TAG_CUTOVER_TO):
                raise InvalidRequest("sync-volume-in-use", f"volume {synced.id} was cut over to instance "
                                     f"{synced.tags[TAG_CUTOVER_TO]} already; roll that cutover back first")
        subject = Subject("cutover", version.import_id, version.name, version.etag)
        with self.run:
            disks = [self.clone(v, subject) for v in data]  # the machine writes its clones, never the sync volumes
            report = self.start_machine(version, volume, volume.as_volume(), subject, product=True,
                                        data=[d.id for d in disks])
            # the machine and its volumes are the product now: no undo, no sweep takes them
            cloud.update_volume(self.clients, report.boot_volume_id, freeform_tags=self.product_tags(version, volume))
            for synced, disk in zip(data, disks):
                cloud.update_volume(self.clients, disk.id, freeform_tags=self.product_tags(version, synced))
            for synced in (volume, *data):
                cloud.tag_volume(self.clients, synced.id, {TAG_CUTOVER_TO: report.instance_id})
            for undo in self.run.ledger.pending():
                self.run.ledger.release(undo)
        uploaded = dt.datetime.fromtimestamp(version.modified or 0, dt.timezone.utc)
        downtime = ((dt.datetime.fromisoformat(report.booted_at) - uploaded).total_seconds()
                    if report.booted_at and version.modified else None)
        self.log.info("cut over %s to instance %s: %s; downtime %s", object_name, report.instance_id,
                      report.boot_check, f"{downtime:.0f} s" if downtime is not None else "unknown (no login prompt)")
        return {"object": object_name, "etag": version.etag, "volume_id": volume.id, "machine": report.as_dict(),
                "data_volumes": [{"object": n, "volume_id": v.id, "clone_id": d.id}
                                 for n, v, d in zip(data_objects, data, disks)],
                "final_upload_at": uploaded.isoformat(), "downtime_seconds": downtime, "steps": dict(self.steps)}

    @step("rollback-cutover")
    def rollback(self, namespace: str | None, bucket: str, object_name: str) -> dict[str, Any]:
        """Stop the cut-over machine (kept, with its boot volume, tagged rolled-back) and give the
        object its sync volume back, as it was at the final sync."""
        version = self.run.objects.version(namespace, bucket, object_name, None)
        cut = [v for v in self.sync_volumes(version) if v.tags.get(TAG_CUTOVER_TO)]
        if not cut:
            raise InvalidRequest("not-cut-over", f"no sync volume of {object_name} was cut over")
        volume = cut[0]
        instance_id = volume.tags[TAG_CUTOVER_TO]
        instance = cloud.with_backoff(self.clients.compute.get_instance, instance_id).data
        if instance.lifecycle_state not in ("STOPPED", "TERMINATING", "TERMINATED"):
            cloud.stop_instance(self.clients, instance_id)
        boot_volume_id = cloud.boot_volume_of(self.clients, instance)
        if instance.lifecycle_state not in ("TERMINATING", "TERMINATED"):
            cloud.tag_volume(self.clients, boot_volume_id, {contract.TAG_STATE: STATE_ROLLED_BACK})
        compartment = self.run.settings.compartment_id
        for synced in cloud.find_volumes(self.clients, compartment, {TAG_CUTOVER_TO: instance_id}):  # data disks too
            kept = {k: v for k, v in (synced.freeform_tags or {}).items() if k != TAG_CUTOVER_TO}
            cloud.update_volume(self.clients, synced.id, freeform_tags=kept)
            for disk in cloud.find_volumes(self.clients, compartment, {TAG_CUTOVER_OF: synced.id}):
                cloud.tag_volume(self.clients, disk.id, {contract.TAG_STATE: STATE_ROLLED_BACK})
        self.log.info("cutover of %s rolled back: instance %s stopped; volume %s holds version %s again for the "
                      "next sync", object_name, instance_id, volume.id, volume.tags.get(contract.TAG_ETAG))
        return {"object": object_name, "volume_id": volume.id, "instance_id": instance_id,
                "boot_volume_id": boot_volume_id, "etag": volume.tags.get(contract.TAG_ETAG)}

    # -- the parts -----------------------------------------------------------------------------

    @step("clone-volume")
    def clone(self, volume: FoundVolume, subject: Subject) -> Volume:
        """A point-in-time clone of the sync volume, its undo (delete) registered at once."""
        run = self.run
        tags = {**run.tags(subject), TAG_REHEARSAL_OF: volume.id}
        made = cloud.clone_volume(self.clients, self.run.settings.compartment_id, volume.id,
                                  volume.availability_domain, f"rehearsal of {volume.display_name}"[:255], tags,
                                  run.retry_token(f"clone/{volume.id}"))
        run.ledger.register("volume", made.id, lambda: cloud.discard_volume(
            self.clients, self.run.settings.compartment_id, made.id))
        ready = cloud.wait_volume_available(self.clients, made.id)
        return Volume(ready.id, ready.availability_domain, ready.size_in_gbs, ready.display_name, fresh=False)

    def start_machine(self, version: ObjectVersion, synced: FoundVolume, source: Volume, subject: Subject,
                      product: bool, data: Sequence[str] = ()) -> MachineReport:
        """Boot volume from the platform image, the disk copied onto it and adapted, the machine
        launched from it and its console watched."""
        run, target = self.run, self.target
        virtual_size = int(synced.tags.get(contract.TAG_VIRTUAL_SIZE) or source.size_in_gbs * 1024 ** 3)
        # until a cutover ends, its boot volume is the run's (a sweep removes it if the run dies)
        boot_id, maker = boot_volume_from_image(run, target, subject, source.availability_domain,
                                                cloud.volume_size_gb(virtual_size), f"{synced.display_name}-boot",
                                                {**run.tags(subject), TAG_REHEARSAL_OF: synced.id} if not product
                                                else run.tags(subject), f"boot-volume/{subject.kind}/{synced.id}")
        run.ledger.register("volume", boot_id, lambda: cloud.discard_volume(
            self.clients, run.settings.compartment_id, boot_id))
        run.ledger.release(maker)
        boot_volume = cloud.wait_volume_available(self.clients, boot_id)
        written = self.copy_and_adapt(version, source, Volume(boot_id, source.availability_domain,
                                                              boot_volume.size_in_gbs, boot_volume.display_name,
                                                              fresh=False), virtual_size, subject)
        tags = {**run.tags(subject), TAG_REHEARSAL_OF: synced.id} if not product else self.product_tags(version, synced)
        return self.launch_and_watch(version, boot_id, written, tags, subject, data)

    @staticmethod
    def product_tags(version: ObjectVersion, synced: FoundVolume) -> dict[str, str]:
        """A cutover's machine and boot volume: not a run's (no cleanup or sweep takes them)."""
        return {contract.TAG_MACHINE: version.name.rsplit("/", 1)[-1][:255], contract.TAG_MACHINE_OF: version.import_id,
                TAG_CUTOVER_OF: synced.id}

    @step("copy-and-adapt")
    def copy_and_adapt(self, version: ObjectVersion, source: Volume, boot_volume: Volume, virtual_size: int,
                       subject: Subject) -> VolumeWrite:
        """On a worker VM: the disk copied from ``source`` onto the boot volume, its filesystems
        checked, the guest inspected and (``adapt_guest: auto``, a Linux guest) adapted."""
        run = self.run
        worker = run.launch_worker(subject, source.availability_domain)
        image = InspectedImage("raw", virtual_size, "raw")
        with run.session(worker) as session:
            run.prepare_worker(session)
            reader = VolumeWrite(run, session, worker, source, version, image)
            writer = VolumeWrite(run, session, worker, boot_volume, version, image)
            source_device, target_device = reader.attach(), writer.attach()
            started = time.monotonic()
            QemuImg(session).convert_nodes(slices.device_node(source_device, 0, virtual_size),
                                           slices.device_node(target_device, 0, virtual_size), target_is_zero=False)
            reader.detach()
            writer.result = WriteResult(target_device, virtual_size, virtual_size, 0, time.monotonic() - started, 0,
                                        0, 1)
            writer.check()
            found = writer.inspect_guest()
            if found.os_type == "linux" and self.target.adapt_guest == "auto":
                writer.adapt()
            writer.detach()
        run.terminate_worker(worker)
        return writer

    @step("launch-machine")
    def launch_and_watch(self, version: ObjectVersion, boot_volume_id: str, written: VolumeWrite,
                         tags: dict[str, str], subject: Subject, data: Sequence[str] = ()) -> MachineReport:
        run, target = self.run, self.target
        if target.firmware != "auto":
            firmware = target.firmware
        else:
            firmware = written.firmware.firmware if written.firmware and written.firmware.firmware else boot.BIOS
        volume_type, network_type, reason = launch_types(written.guest, target.boot_volume_type, target.network_type)
        instance = cloud.launch_machine(
            self.clients, compartment_id=target.compartment_id, availability_domain=written.volume.availability_domain,
            subnet_id=target.subnet_id, boot_volume_id=boot_volume_id, shape=target.shape, ocpus=target.ocpus,
            memory_in_gbs=target.memory_in_gbs, firmware=firmware, boot_volume_type=volume_type,
            network_type=network_type, ssh_authorized_keys=target.ssh_authorized_keys,
            display_name=version.name.rsplit("/", 1)[-1][:200] + f" ({subject.kind})", tags=tags,
            retry_token=run.retry_token(f"launch/{subject.kind}/{boot_volume_id}"))
        # terminated with its boot volume: a rehearsal's goes; a cutover releases this undo at its end
        run.ledger.register("machine instance", instance.id,
                            lambda: cloud.terminate_worker(self.clients, instance.id))
        cloud.wait_instance_running(self.clients, instance.id)
        for volume_id in data:  # the data disks, in order, at consistent device paths
            if cloud.existing_attachment(self.clients, instance.id, volume_id) is None:
                made = cloud.attach_volume(self.clients, instance.id, volume_id, "paravirtualized",
                                           run.retry_token(f"attach-to-machine/{volume_id}"))
                cloud.wait_attached(self.clients, made.id)
        checked = boot.watch_console(lambda: cloud.console_text(self.clients, instance.id), target.boot_pattern,
                                     target.boot_timeout_seconds, target.console_poll_seconds)
        booted_at = dt.datetime.now(dt.timezone.utc).isoformat() if checked.booted else None
        changes = list(written.guest.adaptation.changes) if written.guest and written.guest.adaptation else []
        return MachineReport(instance.id, boot_volume_id, firmware, volume_type, network_type, reason, bool(changes),
                             checked.booted, round(checked.seconds, 1), checked.describe(),
                             list(checked.console_tail), booted_at, changes)
