"""Flows ``rehearse``, ``cutover`` and ``rollback-cutover``: the end of a warm migration
(:mod:`diskimport.migration`; docs/warm-migration.md gives the order an operator runs them in).

Each names the object whose sync volume holds the machine's boot disk (``bucket``,
``object_name``) and the ``TargetMachine`` block the machine is launched by.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK
from diskimport.migration import Migration
from flows.import_machine import load_target
from flows.reporting import refusal_reported
from flows.tasks import open_run, step_task


def _name(action: str) -> Any:
    return lambda: f"{action} {str(current_flow_run.parameters.get('object_name', '?')).rsplit('/', 1)[-1][-80:]}"


@step_task("rehearse-machine", retries=1, delays=15)
def rehearse_machine(migration: Migration, namespace: str | None, bucket: str, object_name: str,
                     data_objects: list[str]) -> dict[str, Any]:
    return migration.rehearse(namespace, bucket, object_name, data_objects)


@step_task("cut-over-machine", retries=1, delays=15)
def cut_over_machine(migration: Migration, namespace: str | None, bucket: str, object_name: str,
                     data_objects: list[str]) -> dict[str, Any]:
    return migration.cutover(namespace, bucket, object_name, data_objects)


@step_task("roll-back-cutover", retries=2, delays=[5, 15])
def roll_back_cutover(migration: Migration, namespace: str | None, bucket: str, object_name: str,
                      data_objects: list[str]) -> dict[str, Any]:
    return migration.rollback(namespace, bucket, object_name)


def _report(title: str, result: dict[str, Any]) -> None:
    machine = result.get("machine") or {}
    lines = [f"# {title}: `{result['object']}`", "", "| | |", "|---|---|"]
    rows = {"version": result.get("etag"), "sync volume": result.get("volume_id"),
            "instance": machine.get("instance_id") or result.get("instance_id"),
            "boot volume": machine.get("boot_volume_id") or result.get("boot_volume_id"),
            "launch": (f"{machine['firmware']}, {machine['boot_volume_type']} disk, {machine['network_type']} "
                       f"network ({machine['launch_reason']})") if machine else None,
            "boot check": machine.get("boot_check"),
            "guest adapted": (f"{len(machine['guest_changes'])} changes (the originals kept in the guest, under "
                              "/var/lib/oci-disk-import/adaptation; the sync volume is untouched)")
            if machine.get("guest_changes") else machine.get("adapted"),
            "downtime": (f"{result['downtime_seconds']:.0f} s (final upload at {result['final_upload_at']})"
                         if result.get("downtime_seconds") is not None else None)}
    lines += [f"| {key} | `{value}` |" for key, value in rows.items() if value is not None]
    create_markdown_artifact("\n".join(lines), key="migration-report", description=title)


def _migrate(step: Any, title: str, bucket: str, object_name: str, namespace: str | None, target_block: str,
             credentials_block: str, worker_block: str, settings_block: str,
             data_objects: list[str] | None = None) -> dict[str, Any]:
    with refusal_reported(object_name):
        _, run = open_run(credentials_block, worker_block, settings_block)
        result = step(Migration(run, load_target(target_block)), namespace, bucket, object_name,
                      list(data_objects or []))
        _report(title, result)
        return result


@flow(name="rehearse", flow_run_name=_name("rehearse"))
def rehearse(bucket: str, object_name: str, namespace: str | None = None, data_objects: list[str] | None = None,
             target_block: str = DEFAULT_BLOCK, credentials_block: str = DEFAULT_BLOCK,
             worker_block: str = DEFAULT_BLOCK, settings_block: str = DEFAULT_BLOCK) -> dict[str, Any]:
    """Boot the machine from a clone of its sync volume (its data disks' objects in ``data_objects``),
    report, and remove the clones and the machine."""
    return _migrate(rehearse_machine, "Rehearsal", bucket, object_name, namespace, target_block, credentials_block,
                    worker_block, settings_block, data_objects)


@flow(name="cutover", flow_run_name=_name("cutover"))
def cutover(bucket: str, object_name: str, namespace: str | None = None, data_objects: list[str] | None = None,
            target_block: str = DEFAULT_BLOCK, credentials_block: str = DEFAULT_BLOCK,
            worker_block: str = DEFAULT_BLOCK, settings_block: str = DEFAULT_BLOCK) -> dict[str, Any]:
    """Once the final pushes are synced, start the machine from the sync volume (its data disks' objects
    in ``data_objects``) and keep it; report the downtime."""
    return _migrate(cut_over_machine, "Cutover", bucket, object_name, namespace, target_block, credentials_block,
                    worker_block, settings_block, data_objects)


@flow(name="rollback-cutover", flow_run_name=_name("rollback"))
def rollback_cutover(bucket: str, object_name: str, namespace: str | None = None, target_block: str = DEFAULT_BLOCK,
                     credentials_block: str = DEFAULT_BLOCK, worker_block: str = DEFAULT_BLOCK,
                     settings_block: str = DEFAULT_BLOCK) -> dict[str, Any]:
    """Stop the cut-over machine (kept) and give the object its sync volume back, as at the final sync."""
    return _migrate(roll_back_cutover, "Cutover rolled back", bucket, object_name, namespace, target_block,
                    credentials_block, worker_block, settings_block)
