"""What the flows ask Prefect about runs: whether a run is still active, and the slot a run
holds while its worker VM exists."""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

WORKER_LIMIT = "oci-disk-import-workers"
ACTIVE = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING}


def run_is_active(flow_run_id: str) -> bool:
    """Whether the run that tagged a resource may still be using it (unknown runs are not)."""
    try:
        run_id = uuid.UUID(flow_run_id)
    except ValueError:
        return False
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
    except ObjectNotFound:
        return False
    return run.state is not None and run.state.type in ACTIVE


def _ensure_worker_limit(limit: int) -> None:
    """Create or resize the global concurrency limit that bounds running worker VMs."""
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(WORKER_LIMIT, limit)
        except ObjectAlreadyExists:  # a concurrent run created it between our read and create
            client.upsert_global_concurrency_limit_by_name(WORKER_LIMIT, limit)


@contextlib.contextmanager
def worker_slot(limit: int) -> Iterator[None]:
    """Hold one of ``limit`` worker VM slots: a burst of uploads queues instead of hitting service limits."""
    _ensure_worker_limit(limit)
    with concurrency(WORKER_LIMIT, occupy=1, strict=True, timeout_seconds=None):
        yield
