"""Flow ``sweep-orphans``: remove what dead import runs left behind.

A run whose process was killed runs no hook. Its worker VM and unfinished volume still
carry the import's tags, including the flow run id; the sweeper removes every such
resource whose run is no longer active, with the same undo functions a failing import
uses (:mod:`diskimport.cloud`). Imported volumes (``import-state=imported``) are the
product and are never touched.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger

from blocks import DEFAULT_BLOCK, ImportSettings, OCICredentials, WorkerShape
from diskimport import cloud, contract
from flows.runs import run_is_active


def _remove(clients: cloud.Clients, compartment_id: str, instances: list[Any], volumes: list[Any],
            keep_failed: bool) -> dict[str, list[str]]:
    removed: dict[str, list[str]] = {"instances": [], "volumes": []}
    for instance in instances:
        cloud.terminate_worker(clients, instance.id)
        removed["instances"].append(instance.id)
    for volume in volumes:
        state = (volume.freeform_tags or {}).get(contract.TAG_STATE)
        if state == contract.STATE_IMPORTED or (state == contract.STATE_FAILED and keep_failed):
            continue
        if cloud.discard_volume(clients, compartment_id, volume.id, keep_failed) == "deleted":
            removed["volumes"].append(volume.id)
    return removed


def sweep_run(credentials_block: str, worker_block: str, settings_block: str, flow_run_id: str) -> dict[str, list[str]]:
    """Remove the worker VM and unfinished volume of one flow run (crash and cancellation hook)."""
    clients = OCICredentials.load(credentials_block).clients()
    shape, settings = WorkerShape.load(worker_block), ImportSettings.load(settings_block)
    tags = {contract.TAG_MANAGED_BY: contract.MANAGED_BY, contract.TAG_FLOW_RUN: flow_run_id}
    instances = cloud.find_instances(clients, shape.compartment_id, tags)
    volumes = cloud.find_volumes(clients, settings.compartment_id, tags)
    return _remove(clients, settings.compartment_id, instances, volumes, settings.keep_failed_volume)


@flow(name="sweep-orphans")
def sweep_orphans(
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
    min_age_minutes: float = 10.0,
) -> dict[str, list[str]]:
    """Terminate worker VMs and delete unfinished volumes whose import run is no longer active."""
    logger = get_run_logger()
    clients = OCICredentials.load(credentials_block).clients()
    shape, settings = WorkerShape.load(worker_block), ImportSettings.load(settings_block)
    managed = {contract.TAG_MANAGED_BY: contract.MANAGED_BY}
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=min_age_minutes)

    def orphaned(resource: Any) -> bool:
        run_id = (resource.freeform_tags or {}).get(contract.TAG_FLOW_RUN, "")
        created = resource.time_created
        old_enough = created is None or created <= cutoff
        return old_enough and not run_is_active(run_id)

    instances = [i for i in cloud.find_instances(clients, shape.compartment_id, managed) if orphaned(i)]
    volumes = [v for v in cloud.find_volumes(clients, settings.compartment_id, managed) if orphaned(v)]
    removed = _remove(clients, settings.compartment_id, instances, volumes, settings.keep_failed_volume)
    logger.info("sweep removed %d worker VM(s) and %d volume(s)", len(removed["instances"]), len(removed["volumes"]))
    return removed
