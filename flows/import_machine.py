"""The ``import-machine`` flow: a whole machine (an OVA, an OVF with its disks beside it, or a
``*.machine.json``) onto one volume per disk, from one worker VM, kept in one volume group.

The steps are :class:`diskimport.machine_import.MachineImport`'s: the machine is read and
every disk inspected before anything is created (a plan with one record per disk); one worker
VM boots while every volume is created; the disks are written, verified and checked at once on
it, each as a single-disk import is (:class:`~diskimport.volume_write.VolumeWrite`); then the
volumes are finished, put in a volume group named after the machine, and the worker VM is
terminated. A disk another run or an earlier attempt finished is not written again; a repeat
of the same object version returns what was imported.

A bootable import (``bootable=True``) puts the boot disk on a boot volume, and (unless
``launch=False``) starts the machine from it where the ``TargetMachine`` block says, its
data volumes attached in disk order, then watches its serial console until it shows that
it booted (:mod:`diskimport.guest.boot`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow
from prefect.futures import wait

from blocks import DEFAULT_BLOCK, TargetMachine
from diskimport import contract
from diskimport.guest import boot
from diskimport.guest.adaptation import AdaptationFailed
from diskimport.errors import InvalidRequest
from diskimport.importer import Importer
from diskimport.machine_import import MachineImport, MachinePlan
from diskimport.records import ObjectVersion, WorkerVM
from diskimport.volume_write import VolumeWrite
from flows.import_disk import find_previous_import, read_object, run_name
from flows.reporting import publish_guest_report, publish_machine_summary, refusal_reported
from flows.runs import import_slot
from flows.tasks import (cleanup_after_crash, open_run, prepare_worker, step_task, terminate_worker,
                         until_not_yielding)


@step_task("inspect-machine", retries=4, delays=[1, 2, 5, 10])
def inspect_machine(machine: MachineImport, version: ObjectVersion) -> MachinePlan:
    return machine.inspect(version)


@step_task("remove-stale-workers", retries=3, delays=[2, 5, 10])
def remove_stale_workers(machine: MachineImport, plan: MachinePlan) -> list[str]:
    return machine.remove_stale_workers(plan)


@step_task("remove-unfinished-volumes", retries=3, delays=[2, 5, 10])
def remove_unfinished_volumes(machine: MachineImport, plan: MachinePlan) -> list[str]:
    return machine.remove_unfinished_volumes(plan)


@step_task("provision", retries=2, delays=[5, 15])
def provision_machine(machine: MachineImport, plan: MachinePlan, bootable: bool) -> WorkerVM:
    return machine.provision(plan, bootable)


@step_task("write-disk", retries=2, delays=[5, 15])
def write_disk(write: VolumeWrite) -> None:
    """One disk: written and verified, checked, detached (as a single-disk import does it); what
    it found stays on its disk's record."""
    write.complete()


@step_task("finish-volumes", retries=4, delays=[2, 5, 10, 20])
def finish_volumes(machine: MachineImport, plan: MachinePlan) -> None:
    machine.finish_volumes(plan)


@step_task("group-volumes", retries=3, delays=[2, 5, 10])
def group_volumes(machine: MachineImport, plan: MachinePlan) -> str:
    return machine.group_volumes(plan)


@step_task("launch-machine", retries=2, delays=[10, 30])
def launch_machine(machine: MachineImport, plan: MachinePlan, firmware: boot.Firmware) -> str:
    return machine.launch(plan, firmware)


@step_task("boot-check")
def check_boot(machine: MachineImport, plan: MachinePlan) -> boot.BootCheck:
    return machine.check_boot(plan)


def load_target(target_block: str) -> TargetMachine:
    try:
        return TargetMachine.load(target_block)
    except ValueError as exc:
        raise InvalidRequest("no-target-machine", f"a bootable machine import needs the TargetMachine block "
                             f"{target_block!r}: {exc}") from None


@flow(name="import-machine", flow_run_name=run_name, on_crashed=[cleanup_after_crash],
      on_cancellation=[cleanup_after_crash])
def import_machine(
    bucket: str,
    object_name: str,
    namespace: str | None = None,
    etag: str | None = None,
    force: bool = False,
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
    bootable: bool = False,
    launch: bool = True,
    target_block: str = DEFAULT_BLOCK,
    adapt_guest: str | None = None,
) -> dict[str, Any]:
    """Import a machine: an ``.ova``, an ``.ovf`` (its disks beside it) or a ``*.machine.json``.

    ``etag`` pins the object version. A run that meets another run importing the same
    version waits for it; disks already imported are not written again. ``bootable``: the
    boot disk goes on a boot volume and, with ``launch``, the machine is started where the
    ``target_block`` (a TargetMachine block) says and its boot is checked. ``adapt_guest``
    (``auto`` or ``off``; None: the TargetMachine block's, ``auto`` by default) says whether a
    bootable Linux guest is adapted to OCI before its launch (docs/guest-adaptation.md).
    """
    with refusal_reported(object_name):
        settings, run = open_run(credentials_block, worker_block, settings_block)
        mode = contract.adapt_mode(adapt_guest) if adapt_guest is not None else None
        machine = MachineImport(Importer(run), load_target(target_block) if bootable else None, mode)
        version = read_object(machine.importer, namespace, bucket, object_name, etag)
        plan = inspect_machine(machine, version)

        def attempt() -> dict[str, Any]:
            find_previous_import(machine.importer, version, force)  # waits while another live run writes it
            machine.reuse_imported(plan, force, bootable)
            with import_slot(settings.worker_concurrency_limit):
                _import(machine, plan, bootable, launch)
            summary = machine.summary(plan)
            publish_machine_summary(summary)
            return summary.as_dict()
        return until_not_yielding(attempt, settings.worker_lost_retries)


def _import(machine: MachineImport, plan: MachinePlan, bootable: bool, launch: bool) -> None:
    """Provision, write every disk not yet imported at once, finish, group, and for a bootable
    machine start it and check its boot; unwound on failure."""
    run = machine.run
    with run:
        remove_stale_workers(machine, plan)  # a killed attempt's worker VM and PARs
        remove_unfinished_volumes(machine, plan)
        if plan.todo:
            worker = provision_machine(machine, plan, bootable)
            with run.session(worker) as session:
                plan.qemu_img = prepare_worker(run, session)
                with run.timed("write-disks"):  # the disks side by side; each counts its own steps
                    writes = [write_disk.submit(write) for write in machine.writes(plan, session)]
                    wait(writes)
                    for written in writes:
                        try:
                            written.result()
                        except AdaptationFailed as failed:  # the report says what the guest is, and what was tried
                            publish_guest_report(failed.report)
                            raise
            finish_volumes(machine, plan)
        group_volumes(machine, plan)
        plan.ready_at = dt.datetime.now(dt.timezone.utc)  # as a disk's: the volumes are ready, the worker goes next
        if plan.todo:
            terminate_worker(run, worker)
        if bootable:
            _start(machine, plan, launch)


def _start(machine: MachineImport, plan: MachinePlan, launch: bool) -> None:
    """The firmware chosen, and unless ``launch`` is off: the machine started and its boot checked."""
    firmware = machine.choose_firmware(plan)
    machine.choose_launch(plan)
    publish_guest_report(plan.disks[0].write.guest if plan.disks[0].write is not None else None)
    if launch:
        launch_machine(machine, plan, firmware)
        if machine.checks_boot():
            check_boot(machine, plan)
