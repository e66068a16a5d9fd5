"""Flow ``sweep-orphans``: remove what dead import runs left behind.

It also tends the worker pool (flows/worker_pool.py). A run whose process was killed runs no hook. Its worker VM and unfinished volume still
carry the import's tags, including the flow run id; the sweeper removes every such
resource whose run is no longer active (:mod:`diskimport.sweeper`). Imported volumes
are the product and are never touched.
"""

from __future__ import annotations

import datetime as dt

from prefect import flow, get_run_logger

from blocks import DEFAULT_BLOCK, ImportSettings, OCICredentials, WorkerShape
from diskimport import contract, regions, sweeper
from flows.runs import run_is_active
from flows.worker_pool import tend


def sweep_run(credentials_block: str, worker_block: str, settings_block: str, flow_run_id: str) -> dict[str, list[str]]:
    """Remove the worker VM and unfinished volume of one flow run (crash and cancellation hook)."""
    shape, settings = WorkerShape.load(worker_block), ImportSettings.load(settings_block)
    return sweeper.sweep(OCICredentials.load(credentials_block).clients(), shape.compartment_id,
                         settings.compartment_id, sweeper.run_tags(flow_run_id), settings.keep_failed_volume)


@flow(name="sweep-orphans")
def sweep_orphans(
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
    min_age_minutes: float = 10.0,
) -> dict[str, list[str]]:
    """Terminate worker VMs, delete unfinished volumes and copies' backups whose run is no longer active."""
    shape, settings = WorkerShape.load(worker_block), ImportSettings.load(settings_block)
    clients = OCICredentials.load(credentials_block).clients()
    orphaned = sweeper.orphan_test(run_is_active, dt.timedelta(minutes=min_age_minutes))
    managed = {contract.TAG_MANAGED_BY: contract.MANAGED_BY}
    removed = sweeper.sweep(clients, shape.compartment_id, settings.compartment_id, managed,
                            settings.keep_failed_volume, orphaned)
    removed["backups"] = regions.sweep_backups(clients, [settings.compartment_id], managed, orphaned)
    removed["pooled_workers"] = tend(credentials_block, worker_block, settings_block)["terminated"]
    get_run_logger().info("sweep removed %d worker VM(s), %d volume(s) and %d backup(s)", len(removed["instances"]),
                          len(removed["volumes"]), len(removed["backups"]))
    return removed
