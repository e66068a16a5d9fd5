"""The ``import-machine`` flow: a whole machine (an OVA, an OVF with its disks beside it, or a
``*.machine.json``) onto one volume per disk, from one worker VM, kept in one volume group.

The steps are :mod:`diskimport.importer`'s, as for one disk: the machine is read and every
disk inspected before anything is created; one worker VM boots while every volume is
created; the disks are written, verified and checked at once on it, each as a single-disk
import is (:class:`~diskimport.importer.VolumeWrite`); then the volumes are finished, put in
a volume group named after the machine, and the worker VM is terminated. A disk another run
or an earlier attempt finished is not written again; a repeat of the same object version
returns what was imported.

A bootable import (``bootable=True``) puts the boot disk on a boot volume, and (unless
``launch=False``) starts the machine from it where the ``TargetMachine`` block says, its
data volumes attached in disk order, then watches its serial console until it shows that
it booted (:mod:`diskimport.boot`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow

from blocks import DEFAULT_BLOCK, TargetMachine
from diskimport import boot, machine
from diskimport.contract import ImportOptions
from diskimport.errors import InvalidRequest
from diskimport.importer import Importer, VolumeWrite
from diskimport.records import InspectedImage, ObjectVersion
from flows.import_disk import (_step, cleanup_after_crash, find_previous_import, read_object, remove_stale_workers,
                               run_importer, run_name, terminate_worker, until_not_yielding)
from flows.reporting import publish_machine_summary, refusal_reported
from flows.runs import worker_slot


@_step("inspect-machine", retries=4, delays=[1, 2, 5, 10])
def inspect_machine(importer: Importer, version: ObjectVersion
                    ) -> tuple[machine.Machine, list[tuple[ObjectVersion, InspectedImage]]]:
    return importer.inspect_machine(version)


@_step("remove-unfinished-volumes", retries=3, delays=[2, 5, 10])
def remove_unfinished_volumes(importer: Importer, version: ObjectVersion) -> list[str]:
    return importer.remove_unfinished_volumes(version)


@_step("provision", retries=2, delays=[5, 15])
def provision_machine(importer: Importer, version: ObjectVersion, disks: list[tuple[int, InspectedImage]],
                      name: str, availability_domain: str | None, bootable: bool) -> Any:
    return importer.provision_machine(version, disks, name, availability_domain, bootable)


@_step("prepare-worker", retries=2, delays=5)
def prepare_worker(importer: Importer, session: Any) -> str:
    return importer.prepare_worker(session)


@_step("write-disk", retries=2, delays=[5, 15])
def write_disk(write: VolumeWrite) -> dict[str, Any]:
    """One disk: written and verified, checked, detached (as a single-disk import does it)."""
    written, checks = write.run()
    return {"written": written, "checks": checks, "firmware": write.firmware, "steps": write.steps}


@_step("finish-volumes", retries=4, delays=[2, 5, 10, 20])
def finish_volumes(importer: Importer, volumes: list[Any]) -> None:
    importer.finish_volumes(volumes, ImportOptions())


@_step("group-volumes", retries=3, delays=[2, 5, 10])
def group_volumes(importer: Importer, version: ObjectVersion, name: str, volumes: list[Any]) -> str:
    return importer.group_volumes(version, name, volumes)


@_step("launch-machine", retries=2, delays=[10, 30])
def launch_machine(importer: Importer, version: ObjectVersion, described: machine.Machine, volumes: list[Any],
                   firmware: boot.Firmware) -> Any:
    return importer.launch_machine(version, described, volumes, firmware)


@_step("boot-check")
def check_boot(importer: Importer, instance_id: str, volumes: list[Any]) -> boot.BootCheck:
    return importer.check_boot(instance_id, volumes)


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
) -> dict[str, Any]:
    """Import a machine: an ``.ova``, an ``.ovf`` (its disks beside it) or a ``*.machine.json``.

    ``etag`` pins the object version. A run that meets another run importing the same
    version waits for it; disks already imported are not written again. ``bootable``: the
    boot disk goes on a boot volume and, with ``launch``, the machine is started where the
    ``target_block`` (a TargetMachine block) says and its boot is checked.
    """
    with refusal_reported(object_name):
        settings, importer = run_importer(credentials_block, worker_block, settings_block)
        if bootable:
            importer.target = load_target(target_block)
        version = read_object(importer, namespace, bucket, object_name, etag)
        described, disks = inspect_machine(importer, version)

        def attempt() -> dict[str, Any]:
            find_previous_import(importer, version, force)  # waits while another live run writes this machine
            done = {} if force else importer.imported_disks(version)
            with worker_slot(settings.worker_concurrency_limit):
                summary = _import(importer, version, described, disks, done, bootable, launch)
            publish_machine_summary(summary)
            return summary
        return until_not_yielding(attempt, settings.worker_lost_retries)


def _import(importer: Importer, version: ObjectVersion, described: machine.Machine,
            disks: list[tuple[ObjectVersion, InspectedImage]], done: dict[int, Any], bootable: bool = False,
            launch: bool = False) -> dict[str, Any]:
    """Provision, write every disk not yet imported at once, finish, group, and for a bootable
    machine start it and check its boot; unwound on failure."""
    todo = [(position, image) for position, (_, image) in enumerate(disks) if position not in done]
    written: dict[int, Any] = {}
    volumes: dict[int, Any] = {position: found.as_volume() for position, found in done.items()}
    qemu_img = None
    with importer:
        remove_stale_workers(importer, version)  # a killed attempt's worker VM and half-written volumes
        for disk_version, _ in disks:
            if disk_version.key != version.key:  # an OVF's or a manifest's disks are objects of their own
                importer.remove_stale_pars(disk_version)
        remove_unfinished_volumes(importer, version)
        if todo:
            ad = next(iter(done.values())).availability_domain if done else None
            worker, made = provision_machine(importer, version, todo, described.name, ad, bootable)
            with importer.session(worker) as session:
                qemu_img = prepare_worker(importer, session)
                writes = {position: importer.volume_write(session, worker, volume, disks[position][0], image)
                          for (position, image), volume in zip(todo, made)}
                written = importer.write_disks(writes, lambda write: write_disk.submit(write).result)
            volumes.update({position: volume for (position, _), volume in zip(todo, made)})
            finish_volumes(importer, made)
        ordered = [volumes[position] for position in range(len(disks))]
        group_id = group_volumes(importer, version, described.name, ordered)
        ready_at = dt.datetime.now(dt.timezone.utc)  # as a disk's: the volumes are ready, the worker goes next
        if todo:
            terminate_worker(importer, worker)
        started = _start(importer, version, described, ordered, written, launch) if bootable else None
    summary = importer.machine_summary(version, described, disks, ordered, written, group_id, qemu_img, ready_at)
    if started is not None:
        summary["boot"] = started
    return summary


def _start(importer: Importer, version: ObjectVersion, described: machine.Machine, volumes: list[Any],
           written: dict[int, Any], launch: bool) -> dict[str, Any]:
    """The firmware chosen, and unless ``launch`` is off: the machine started and its boot checked."""
    detected = written[0]["firmware"] if 0 in written else None
    firmware = importer.choose_firmware(described, detected, volumes[0].id)
    started: dict[str, Any] = {"boot_volume_id": volumes[0].id, "firmware": firmware.firmware,
                               "firmware_source": firmware.source, "firmware_reason": firmware.reason,
                               "instance_id": None, "boot_check": None}
    if not launch:
        return started
    instance = launch_machine(importer, version, described, volumes, firmware)
    started["instance_id"] = instance.id
    target = importer.target_machine()
    if target.boot_check != "off":
        checked = check_boot(importer, instance.id, volumes)
        started["boot_check"] = {"booted": checked.booted, "seconds": round(checked.seconds, 1),
                                 "pattern": checked.pattern, "console_tail": checked.console_tail,
                                 "result": checked.describe()}
    return started

