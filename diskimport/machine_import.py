"""The import of a whole machine: an OVA, an OVF with its disks beside it, or a ``*.machine.json``,
onto one volume per disk from one worker VM, kept in one volume group.

A :class:`MachineImport` adds a machine's steps to an :class:`~diskimport.importer.Importer`
(whose run, volume creation and hand-over it uses): the machine read and every disk inspected
before anything is created (:meth:`~MachineImport.inspect`, a :class:`MachinePlan` with one
:class:`MachineDiskImport` record per disk), the disks another run finished found and reused,
one worker VM launched while every other disk's volume is created, a
:class:`~diskimport.volume_write.VolumeWrite` per disk, the volumes finished and grouped. A
bootable import puts the boot disk on a boot volume and can start the machine from it where
the ``TargetMachine`` block says, then watch its serial console (:mod:`diskimport.guest.boot`).

Each disk's record carries it from its description to its volume, its write and its checks,
through to the summary: nothing is joined by position.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import cloud, contract
from .contract import ImportOptions
from .errors import BootFailed, InvalidRequest, OutOfCapacity
from .guest import boot, report as guest_report
from .images import machine
from .importer import Importer, peak_rss_mb
from .ocids import check_placement
from .ledger import Undo
from .records import FoundVolume, InspectedImage, ObjectVersion, Subject, Volume, WorkerVM
from .run import Run, step
from .summaries import BootCheckReport, BootReport, MachineDiskRow, MachineImportSummary
from .volume_write import VolumeWrite
from .worker_vm.session import WorkerSession


class TargetMachineLike(Protocol):
    """Where a bootable machine import starts the machine (the ``TargetMachine`` block has it)."""

    compartment_id: str
    subnet_id: str
    image_id: str
    shape: str
    ocpus: float | None
    memory_in_gbs: float | None
    firmware: str
    boot_volume_type: str
    network_type: str
    adapt_guest: str
    boot_check: str
    boot_pattern: str
    boot_timeout_seconds: float
    console_poll_seconds: float
    ssh_port: int
    reach_timeout_seconds: float
    ssh_authorized_keys: str | None


@dataclass
class MachineDiskImport:
    """One disk of a machine, from what the descriptor says of it to its volume and its write."""

    described: machine.MachineDisk
    version: ObjectVersion         # the object it is read from (an OVA's member: the OVA itself)
    image: InspectedImage
    volume: Volume | None = None
    reused: FoundVolume | None = None  # imported already, by another run or an earlier attempt
    write: VolumeWrite | None = None   # this run's write, once it is set off

    @property
    def position(self) -> int:
        return self.described.position

    def row(self) -> MachineDiskRow:
        """The disk's line of the machine summary."""
        assert self.volume is not None
        write = self.write if self.write is not None and self.write.result is not None else None
        result = write.result if write is not None else None
        steps = dict(write.steps) if write else {}
        return MachineDiskRow(
            position=self.position, name=self.described.name, object=self.version.name, file=self.described.file,
            format=self.image.format, virtual_size=self.image.virtual_size, volume_id=self.volume.id,
            volume_size_gb=self.volume.size_in_gbs, digest_checked=self.image.digest is not None,
            reused=write is None, fetched_bytes=result.fetched_bytes if result else 0,
            transfer_seconds=round(result.seconds, 3) if result else 0.0, seconds=round(sum(steps.values()), 3),
            steps=steps, filesystems=list(write.checks) if write else [])


@dataclass
class MachinePlan:
    """A machine as its object describes it, and each of its disks, in boot order."""

    version: ObjectVersion
    described: machine.Machine
    disks: list[MachineDiskImport]
    worker: WorkerVM | None = None
    group_id: str | None = None
    qemu_img: str | None = None
    ready_at: dt.datetime | None = None
    boot: BootReport | None = field(default=None)

    @property
    def todo(self) -> list[MachineDiskImport]:
        """The disks this run writes (the others were imported already)."""
        return [disk for disk in self.disks if disk.reused is None]

    @property
    def volumes(self) -> list[Volume]:
        assert all(disk.volume is not None for disk in self.disks), "every disk has its volume once provisioned"
        return [disk.volume for disk in self.disks if disk.volume is not None]


def _digest_of(disk: machine.MachineDisk) -> tuple[str, str, str] | None:
    return (disk.digest[0], disk.digest[1], repr(disk.file.rsplit("/", 1)[-1])) if disk.digest else None


class MachineImport:
    """One machine import's steps, on an :class:`~diskimport.importer.Importer` and its run;
    ``target`` is where a bootable import starts the machine."""

    def __init__(self, importer: Importer, target: TargetMachineLike | None = None,
                 adapt_guest: str | None = None) -> None:
        self.importer = importer
        self.run = importer.run
        self.clients = importer.clients
        self.settings = importer.settings
        self.log = importer.log
        if target is not None:
            check_placement("TargetMachine", target.compartment_id, target.subnet_id, target.image_id)
        self.target = target
        # The flow's (or the upload's) adapt_guest, else the TargetMachine block's.
        self.adapt_guest = adapt_guest or (getattr(target, "adapt_guest", None) if target is not None else None) or "auto"

    # -- before anything is created -----------------------------------------------------------

    @step("inspect-machine")
    def inspect(self, version: ObjectVersion) -> MachinePlan:
        """The machine an OVA, an OVF or a ``*.machine.json`` describes, and each disk's object
        version and inspection (every hostile-image check, the descriptor's capacity, the
        manifest's digest for the transfer to check), in boot order. Reads headers and small
        ranges only; the pieces read are kept for the transfers."""
        objects = self.run.objects
        kind = machine.kind_of(version.name)
        if kind == "ova":
            pieces: list[tuple[int, bytes]] = []
            get = objects.recorder(version, pieces)
            described = machine.describe_ova(get, version.size, version.name)
            disks = [MachineDiskImport(disk, version, InspectedImage(
                found.format, found.virtual_size, found.detected_as, found.driver, packed_as.container,
                packed_as.inner_offset, packed_as.inner_size, _digest_of(disk)))
                for disk, found, packed_as in machine.inspect_ova_disks(described, get,
                                                                        self.settings.max_virtual_size_bytes)]
            objects.keep(version, pieces)
            return self._planned(version, described, disks)
        if kind not in ("ovf", "manifest"):
            raise InvalidRequest("not-a-machine", f"{version.name!r} is not an .ova, .ovf or .machine.json object")
        text = objects.whole(version, machine.MAX_DESCRIPTOR,
                             "machine-manifest-invalid" if kind == "manifest" else "ovf-invalid")
        if kind == "manifest":
            described = machine.parse_machine_manifest(text, version.name)
        else:
            prefix, manifest_name = machine.ovf_companions(version.name)
            manifest = objects.small_or_none(version.namespace, version.bucket, manifest_name, machine.MAX_MANIFEST)
            sizes = {prefix + d.file: objects.size_or_none(version.namespace, version.bucket, prefix + d.file)
                     for d in machine.parse_ovf(text).disks}
            described = machine.describe_ovf(text, version.name, manifest, sizes)
        disks = []
        for disk in described.disks:
            disk_version = machine.naming_disk(disk, lambda disk=disk: self.importer.read_object(
                version.namespace, version.bucket, disk.file, None))
            image = machine.about_disk(disk, lambda disk_version=disk_version: self.importer.inspect(
                disk_version, self.importer.options(disk_version, ImportOptions())))
            disks.append(MachineDiskImport(disk, disk_version, dataclasses.replace(image, digest=_digest_of(disk))))
        return self._planned(version, described, disks)

    def _planned(self, version: ObjectVersion, described: machine.Machine,
                 disks: list[MachineDiskImport]) -> MachinePlan:
        self.log.info("%s is machine %r (%s): %s", version.name, described.name, described.source, "; ".join(
            f"disk {d.position + 1} {d.described.file} {d.image.format} {d.image.virtual_size} bytes" for d in disks))
        return MachinePlan(version, described, disks)

    def reuse_imported(self, plan: MachinePlan, force: bool = False, bootable: bool = False) -> None:
        """Mark the disks another run (or an earlier attempt) finished: they are not written again.

        A bootable import's boot disk needs a boot volume: a block volume an earlier import
        (not bootable) wrote it onto cannot be launched from, so the boot disk is written again,
        onto a boot volume, and the data disks are reused. Where both exist, a bootable import
        reuses the boot volume and any other the block volume."""
        found: dict[int, FoundVolume] = {}
        imported = [] if force else [v for v in self.importer.found_volumes(plan.version)
                                     if v.state == contract.STATE_IMPORTED and v.disk is not None]
        for volume in sorted(imported, key=lambda v: cloud.is_boot_volume(v.id) == bootable):  # the preferred last
            if volume.disk == 0 and bootable and not cloud.is_boot_volume(volume.id):
                continue
            found[volume.disk] = volume
        if bootable and any(v.disk == 0 and not cloud.is_boot_volume(v.id) for v in imported) and 0 not in found:
            self.log.info("the boot disk was imported onto a block volume, which cannot boot: it is written "
                          "again, onto a boot volume; the data disks are reused")
        for disk in plan.disks:
            disk.reused = found.get(disk.position)
            disk.volume = disk.reused.as_volume() if disk.reused is not None else None
        if found:
            self.log.info("disk(s) %s imported already; not written again",
                          ", ".join(str(p + 1) for p in sorted(found)))

    # -- resources ----------------------------------------------------------------------------

    def remove_stale_workers(self, plan: MachinePlan) -> list[str]:
        """The worker VMs and PARs a killed attempt or a dead run left, on the machine's object and
        on each disk's own object (an OVF's or a manifest's disks are objects of their own)."""
        removed = self.importer.remove_stale_workers(plan.version)
        for disk in plan.disks:
            if disk.version.key != plan.version.key:
                self.run.remove_stale_pars(disk.version.subject, disk.version.namespace, disk.version.bucket,
                                           disk.version.name)
        return removed

    @step("remove-unfinished-volumes")
    def remove_unfinished_volumes(self, plan: MachinePlan) -> list[str]:
        """Delete the volumes a machine import's dead runs (or this run's killed attempt) left
        half written; those disks are written again. Finished ones are kept and reused."""
        removed = []
        for found in self.importer.found_volumes(plan.version):
            if found.state == contract.STATE_WRITING and (found.flow_run == self.run.run_id
                                                          or not self.run.run_is_active(found.flow_run or "")):
                cloud.discard_volume(self.clients, self.settings.compartment_id, found.id, keep=False)
                removed.append(found.id)
        if removed:
            self.log.info("deleted %d half-written volume(s) a dead run left: %s", len(removed), ", ".join(removed))
        return removed

    @step("provision")
    def provision(self, plan: MachinePlan, bootable: bool = False) -> WorkerVM:
        """One worker VM and a volume per disk to write, all made at once, in the availability
        domain of the disks imported already, else the first with capacity for the worker; each
        volume tagged with its disk's position. With ``bootable``, the boot disk (position 0)
        gets a boot volume instead."""
        reused = [d.reused for d in plan.disks if d.reused is not None]
        ads = [reused[0].availability_domain] if reused else self.run.availability_domains(None)
        todo, name = plan.todo, plan.described.name
        last_error: Exception | None = None
        for ad in ads:
            with ThreadPoolExecutor(max(1, len(todo)), thread_name_prefix="provision") as pool:
                creates = [pool.submit(self.obtain_boot_volume if bootable and disk.position == 0
                                       else self.importer.create_volume, plan.version, ad,
                                       cloud.volume_size_gb(disk.image.virtual_size),
                                       f"{name}-disk{disk.position + 1}",
                                       {contract.TAG_DISK: str(disk.position), contract.TAG_MACHINE: name[:255]})
                           for disk in todo]
                worker, last_error = self.importer.worker_beside(plan.version, ad, creates)
                if worker is not None:
                    for disk, create in zip(todo, creates):  # each create's own disk, as submitted
                        disk.volume = create.result()
                    plan.worker = worker
                    return worker
        raise OutOfCapacity(f"no availability domain had capacity for the worker ({', '.join(ads)}): {last_error}")

    def target_machine(self) -> TargetMachineLike:
        if self.target is None:
            raise InvalidRequest("no-target-machine", "a bootable machine import needs a TargetMachine block "
                                 "(compartment, subnet, shape and a platform image of the machine's region)")
        return self.target

    def obtain_boot_volume(self, version: ObjectVersion, availability_domain: str, size_gb: int, name: str,
                           extra_tags: dict[str, str]) -> Volume:
        """A boot volume of at least ``size_gb`` for the boot disk, tagged ``writing``.

        OCI makes boot volumes only from images and other boot volumes: an instance is launched
        from the target's platform image with the size asked for, then terminated with its boot
        volume preserved. Each step's undo is registered the moment it exists. The volume holds
        the platform image, not zeros, so the write writes the disk's zeros too.
        """
        target, run = self.target_machine(), self.run
        step_name = f"boot-volume/{version.import_id}/{availability_domain}"
        boot_volume_id, undo = boot_volume_from_image(
            run, target, version.subject, availability_domain, size_gb, name,
            {**run.tags(version.subject), **extra_tags, contract.TAG_STATE: contract.STATE_WRITING}, step_name)
        self.importer.register_volume(boot_volume_id)
        run.ledger.release(undo)
        ready = cloud.wait_volume_available(self.clients, boot_volume_id)
        self.log.info("boot volume %s (%d GB) made for the boot disk from the target's image", ready.id,
                      ready.size_in_gbs)
        return Volume(ready.id, availability_domain, ready.size_in_gbs, ready.display_name, fresh=False)

    def writes(self, plan: MachinePlan, session: WorkerSession) -> list[VolumeWrite]:
        """A write for every disk to write, each kept on its disk's record."""
        assert plan.worker is not None, "writes() follows provision()"
        for disk in plan.todo:
            assert disk.volume is not None
            disk.write = VolumeWrite(self.run, session, plan.worker, disk.volume, disk.version, disk.image)
            disk.write.inspects_guest = disk.position == 0 and cloud.is_boot_volume(disk.volume.id)
            disk.write.adapt_guest = self.adapt_guest
        return [disk.write for disk in plan.todo if disk.write is not None]

    # -- handing over ---------------------------------------------------------------------------

    @step("finish-volumes")
    def finish_volumes(self, plan: MachinePlan) -> None:
        """The volumes written finished side by side (as a single disk's is); the step counts the
        time they took together."""
        made = [disk.volume for disk in plan.todo if disk.volume is not None]
        with ThreadPoolExecutor(max(1, len(made)), thread_name_prefix="finish-volume") as pool:
            list(pool.map(lambda volume: self.importer.hand_over(volume, ImportOptions()), made))

    @step("group-volumes")
    def group_volumes(self, plan: MachinePlan) -> str:
        """The machine's volumes in one volume group named after it (the one they are in already,
        after a repeat); until it is available its undo deletes the group only."""
        volumes, name, run = plan.volumes, plan.described.name, self.run
        groups = {cloud.get_volume(self.clients, v.id).volume_group_id for v in volumes}
        existing = groups.pop() if len(groups) == 1 else None
        if existing is not None:
            plan.group_id = existing
            return existing
        if len(groups - {None}) == 1:
            # a bootable import of a machine imported before: its new boot volume joins the group
            # of the data volumes, in place of the block volume the boot disk was first written to
            [existing] = groups - {None}
            cloud.update_volume_group(self.clients, existing, [v.id for v in volumes])
            cloud.wait_volume_group_available(self.clients, existing)
            self.log.info("volume group %s now holds the machine's %d volume(s), its boot volume first", existing,
                          len(volumes))
            plan.group_id = existing
            return existing
        group = cloud.create_volume_group(self.clients, self.settings.compartment_id, volumes[0].availability_domain,
                                          name, [v.id for v in volumes],
                                          {**run.tags(plan.version.subject), contract.TAG_MACHINE: name[:255]},
                                          run.retry_token(f"volume-group/{plan.version.import_id}"))
        undo = run.ledger.register("volume group", group.id, lambda: cloud.delete_volume_group(self.clients, group.id))
        cloud.wait_volume_group_available(self.clients, group.id)
        run.ledger.release(undo)  # the machine's finished volumes stay together from here on
        self.log.info("volume group %s holds the machine's %d volume(s)", group.id, len(volumes))
        plan.group_id = group.id
        return group.id

    def summary(self, plan: MachinePlan) -> MachineImportSummary:
        """A machine import's account: the machine as described, and each disk with its volume."""
        rows = [disk.row() for disk in plan.disks]
        disk_steps = {name for row in rows for name in row.steps}
        version = plan.version
        return MachineImportSummary(
            import_id=version.import_id, object=version.name, bucket=version.bucket, namespace=version.namespace,
            etag=version.etag, machine=plan.described.summary(), volume_group_id=plan.group_id,
            availability_domain=plan.volumes[0].availability_domain, disks=rows, qemu_img=plan.qemu_img,
            ready_at=(plan.ready_at or dt.datetime.now(dt.timezone.utc)).isoformat(), reused=not plan.todo,
            # the machine's own steps; its disks' (which ran side by side) are in their rows
            steps={name: seconds for name, seconds in self.run.steps.items() if name not in disk_steps},
            peak_rss_mb=peak_rss_mb(), boot=plan.boot)

    # -- a bootable machine ---------------------------------------------------------------------

    def choose_firmware(self, plan: MachinePlan) -> boot.Firmware:
        """The firmware to launch with: the target block's, the OVF's or manifest's, the disk's
        (as detected now, or by the run that wrote it, from the boot volume's tag), else BIOS;
        recorded in the plan's boot report."""
        chosen = self._firmware(plan)
        plan.boot = BootReport(plan.volumes[0].id, chosen.firmware, chosen.source, chosen.reason)
        self.log.info("the machine boots by %s (%s: %s)", chosen.firmware, chosen.source, chosen.reason)
        return chosen

    def _firmware(self, plan: MachinePlan) -> boot.Firmware:
        target, described, boot_disk = self.target_machine(), plan.described, plan.disks[0]
        detected = boot_disk.write.firmware if boot_disk.write is not None else None
        if target.firmware != "auto":
            return boot.Firmware(target.firmware, "target", "set in the TargetMachine block")
        if described.firmware:
            return boot.Firmware(described.firmware, "ovf" if described.source != "manifest" else "manifest",
                                 f"given by the {described.source}")
        if detected is None:
            tagged = (cloud.get_volume(self.clients, plan.volumes[0].id).freeform_tags or {}).get(contract.TAG_FIRMWARE)
            if tagged:
                return boot.Firmware(tagged, "disk", "detected when the boot disk was written")
        if detected is not None and detected.firmware:
            return detected
        why = detected.reason if detected is not None else "the boot disk was not examined"
        return boot.Firmware(boot.BIOS, "default", f"not detected ({why}); BIOS assumed")

    def choose_launch(self, plan: MachinePlan) -> tuple[str, str]:
        """The boot volume type and network type to launch with (:func:`launch_types`), recorded in
        the plan's boot report with the reason; a warning where the TargetMachine block sets a
        virtio launch the guest report says cannot boot."""
        target, boot_disk = self.target_machine(), plan.disks[0]
        found = boot_disk.write.guest if boot_disk.write is not None else None
        assert plan.boot is not None, "choose_launch() follows choose_firmware()"
        plan.boot.guest = found.as_dict() if found is not None else None
        hints = plan.described.hints
        asked = {key: hints.get(key) for key in ("boot_volume_type", "network_type") if hints.get(key)}
        set_by = "the machine manifest" if asked else "the TargetMachine block"
        requested = asked.get("boot_volume_type", target.boot_volume_type)
        volume_type, network_type, reason = launch_types(
            found, requested, asked.get("network_type", target.network_type), set_by)
        paravirtualized = found.verdict(guest_report.PARAVIRTUALIZED) if found is not None else None
        if (requested == "PARAVIRTUALIZED" and paravirtualized is not None and paravirtualized.boots is False):
            self.log.warning("%s launches the machine on virtio, which the guest report says it cannot boot on: %s",
                             set_by, "; ".join(paravirtualized.reasons))
        plan.boot.boot_volume_type, plan.boot.network_type, plan.boot.launch_reason = volume_type, network_type, reason
        self.log.info("launch on %s disk and %s network: %s", volume_type, network_type, reason)
        return volume_type, network_type

    def checks_boot(self) -> bool:
        return self.target_machine().boot_check != "off"

    @step("launch-machine")
    def launch(self, plan: MachinePlan, firmware: boot.Firmware) -> str:
        """Start the machine from its boot volume, its data volumes attached in disk order at
        consistent device paths. A repeat finds the instance an earlier attempt started."""
        target, run, described, volumes = self.target_machine(), self.run, plan.described, plan.volumes
        version = plan.version
        # Not the run's tags: the machine is the product, which no cleanup or sweep may take for a worker VM.
        tags = {contract.TAG_MACHINE: described.name[:255], contract.TAG_MACHINE_OF: version.import_id}
        found = cloud.find_instances(self.clients, target.compartment_id, {contract.TAG_MACHINE_OF: version.import_id})
        if found:
            instance = found[0]
        else:
            ocpus = described.hints.get("ocpus", target.ocpus) if described.shape else target.ocpus
            memory = described.hints.get("memory_gbs", target.memory_in_gbs) if described.shape else target.memory_in_gbs
            instance = cloud.launch_machine(
                self.clients, compartment_id=target.compartment_id, availability_domain=volumes[0].availability_domain,
                subnet_id=target.subnet_id, boot_volume_id=volumes[0].id, shape=described.shape or target.shape,
                ocpus=ocpus, memory_in_gbs=memory, firmware=firmware.firmware or boot.BIOS,
                boot_volume_type=plan.boot.boot_volume_type if plan.boot and plan.boot.boot_volume_type
                else target.boot_volume_type,
                network_type=plan.boot.network_type if plan.boot and plan.boot.network_type else target.network_type,
                ssh_authorized_keys=target.ssh_authorized_keys,
                display_name=described.name, tags=tags, retry_token=run.retry_token(f"launch-machine/{version.import_id}"))
        undo = run.ledger.register("machine instance", instance.id,
                                   lambda: cloud.terminate_keeping_boot_volume(self.clients, instance.id))
        cloud.wait_instance_running(self.clients, instance.id)
        for volume in volumes[1:]:
            if cloud.existing_attachment(self.clients, instance.id, volume.id) is None:
                made = cloud.attach_volume(self.clients, instance.id, volume.id, "paravirtualized",
                                           run.retry_token(f"attach-to-machine/{volume.id}"))
                cloud.wait_attached(self.clients, made.id)
        run.ledger.release(undo)  # the machine is the product now
        if plan.boot is not None:
            plan.boot.instance_id = instance.id
        self.log.info("machine %r started as instance %s", described.name, instance.id)
        return instance.id

    def check_reachable(self, instance_id: str) -> tuple[bool, str]:
        """Whether the booted machine answers SSH on its private IP (its banner) within the target's
        ``reach_timeout_seconds``, and what was seen."""
        target = self.target_machine()
        address = cloud.worker_address(self.clients, target.compartment_id, instance_id, public=False)
        deadline = time.monotonic() + target.reach_timeout_seconds
        while True:
            banner = cloud.ssh_banner(address, target.ssh_port)
            if banner is not None:
                return True, f"answers SSH on {address}:{target.ssh_port} ({banner})"
            if time.monotonic() >= deadline:
                return False, (f"no SSH answer on {address}:{target.ssh_port} within "
                               f"{target.reach_timeout_seconds:.0f} s of its boot (no network, a static address or "
                               "a pinned interface, or no sshd: see the guest report)")
            time.sleep(min(target.console_poll_seconds, max(0.0, deadline - time.monotonic())))

    @step("boot-check")
    def check_boot(self, plan: MachinePlan) -> boot.BootCheck:
        """Watch the machine's serial console (OCI's console history) for its boot milestone.
        With ``boot_check: require`` a machine that does not show it is stopped, its volumes
        kept and tagged, and the run fails (``machine-did-not-boot``)."""
        target = self.target_machine()
        assert plan.boot is not None and plan.boot.instance_id, "check_boot() follows launch()"
        instance_id = plan.boot.instance_id
        checked = boot.watch_console(lambda: cloud.console_text(self.clients, instance_id), target.boot_pattern,
                                     target.boot_timeout_seconds, target.console_poll_seconds)
        result = "booted" if checked.booted else "not-booted"
        for volume in plan.volumes:
            cloud.tag_volume(self.clients, volume.id, {contract.TAG_BOOT: result})
        self.log.info("boot check: %s", checked.describe())
        reachable, said = None, None
        if checked.booted and target.reach_timeout_seconds > 0:
            reachable, said = self.check_reachable(instance_id)
            self.log.info("reachability: %s", said)
        plan.boot.boot_check = BootCheckReport(checked.booted, round(checked.seconds, 1), checked.pattern,
                                               list(checked.console_tail), checked.describe(), reachable, said)
        if not checked.booted and target.boot_check == "require":
            cloud.stop_instance(self.clients, instance_id)
            raise BootFailed("machine-did-not-boot", f"instance {instance_id} {checked.describe()}; "
                             "it is stopped, its volumes are kept")
        return checked


def boot_volume_from_image(run: Run, target: TargetMachineLike, subject: Subject, availability_domain: str,
                           size_gb: int, name: str, tags: dict[str, str], step_name: str) -> tuple[str, Undo]:
    """A boot volume of at least ``size_gb`` holding the target's platform image, named ``name`` and
    tagged ``tags``: OCI makes boot volumes only from images and other boot volumes, so an instance
    is launched from the image with that size, then terminated with its boot volume preserved.
    Returns the boot volume and the undo of its maker (released once the caller registers the
    volume's own)."""
    clients = run.clients
    maker = cloud.launch_for_boot_volume(
        clients, compartment_id=target.compartment_id, availability_domain=availability_domain,
        subnet_id=target.subnet_id, image_id=target.image_id, shape=target.shape, ocpus=target.ocpus,
        memory_in_gbs=target.memory_in_gbs, size_gb=max(cloud.MIN_VOLUME_GB, size_gb),
        display_name=f"boot-volume-for-{subject.id[:12]}", tags=run.tags(subject),
        retry_token=run.retry_token(step_name))
    undo = run.ledger.register("boot volume maker", maker.id, lambda: cloud.terminate_worker(clients, maker.id))
    try:
        running = cloud.wait_instance_running(clients, maker.id)
        boot_volume_id = cloud.boot_volume_of(clients, running)
        cloud.update_volume(clients, boot_volume_id, display_name=name, freeform_tags=tags)
        cloud.terminate_keeping_boot_volume(clients, maker.id)
    except BaseException:
        run.undone(step_name)
        raise
    return boot_volume_id, undo


def launch_types(found: guest_report.GuestReport | None, volume_type: str, network_type: str,
                 set_by: str = "the TargetMachine block") -> tuple[str, str, str]:
    """``(boot volume type, network type, reason)`` for a launch: the values asked for (by the
    machine manifest, else the TargetMachine block) where they are not ``auto``; else from the
    guest report: virtio (``PARAVIRTUALIZED``) unless the guest cannot boot on it and can boot
    emulated (``IDE`` and ``E1000``)."""
    if found is None:
        mode, reason = guest_report.PARAVIRTUALIZED, "the boot disk was not inspected by this run (it was written before)"
    else:
        paravirtualized, emulated = found.verdict(guest_report.PARAVIRTUALIZED), found.verdict(guest_report.EMULATED)
        if paravirtualized.boots is False and emulated.boots:
            mode, reason = guest_report.EMULATED, f"the guest boots emulated only ({'; '.join(paravirtualized.reasons)})"
        elif paravirtualized.boots is False:
            mode, reason = guest_report.PARAVIRTUALIZED, ("the guest report says it boots neither way; virtio tried "
                                                          f"({'; '.join(paravirtualized.reasons)})")
        elif paravirtualized.boots:
            mode, reason = guest_report.PARAVIRTUALIZED, "the guest has the virtio drivers"
        else:
            mode, reason = guest_report.PARAVIRTUALIZED, "the guest report cannot tell; virtio tried"
    emulated_mode = mode == guest_report.EMULATED
    chosen_volume = volume_type if volume_type != "auto" else ("IDE" if emulated_mode else "PARAVIRTUALIZED")
    chosen_network = network_type if network_type != "auto" else ("E1000" if emulated_mode else "PARAVIRTUALIZED")
    if volume_type != "auto" or network_type != "auto":
        reason = f"set in {set_by} ({reason})"
    return chosen_volume, chosen_network, reason
