"""Flow ``tend-worker-pool``: keep the worker pool at its settings (docs/worker-pool.md).

It terminates the idle pooled VMs past their idle time or beyond the pool's target, then
launches VMs until the pool holds its target. Imports refill the pool themselves after each
take and ``sweep-orphans`` tends it every hour; run this one to fill the pool at once, or on a
schedule for idle time kept to the minute.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from blocks import DEFAULT_BLOCK, ImportSettings, OCICredentials, WorkerShape
from diskimport import pool
from flows.pool_keys import SecretBlockKeys


def tend(credentials_block: str, worker_block: str, settings_block: str) -> dict[str, list[str]]:
    """Trim, then refill, the pool of ``worker_block``'s shape."""
    shape, settings = WorkerShape.load(worker_block), ImportSettings.load(settings_block)
    worker_pool = pool.Pool(OCICredentials.load(credentials_block).clients(), shape, SecretBlockKeys(),
                            settings, get_run_logger(), worker_block)
    return {"terminated": worker_pool.trim(), "launched": worker_pool.refill()}


@flow(name="tend-worker-pool")
def tend_worker_pool(
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
) -> dict[str, list[str]]:
    """Terminate idle pooled worker VMs past their time or beyond the pool's size; launch new ones up to it."""
    return tend(credentials_block, worker_block, settings_block)
