"""Flow ``sweep-orphans``: remove what dead import runs left behind.

A run whose process was killed runs no hook. Its worker and unfinished volume still
carry the import's tags, including the flow run id; the sweeper removes every such
resource whose run is no longer active. Imported volumes (``import-state=imported``)
are the product and are never touched.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound

from blocks import ImportSettings, OCICredentials, WorkerShape
from diskimport import cloud, naming

ACTIVE = {StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED, StateType.CANCELLING}


def _clients(credentials_block: str) -> cloud.Clients:
    credentials = OCICredentials.load(credentials_block)
    return cloud.Clients(compute=credentials.get_client("compute"), blockstorage=credentials.get_client("blockstorage"),
                         network=credentials.get_client("network"),
                         object_storage=credentials.get_client("object_storage"))


def _remove(clients: cloud.Clients, compartment_id: str, instances: list[Any], volumes: list[Any],
            keep_failed: bool) -> dict[str, list[str]]:
    removed: dict[str, list[str]] = {"instances": [], "volumes": []}
    for instance in instances:
        cloud.terminate_worker(clients, instance.id)
        removed["instances"].append(instance.id)
    for volume in volumes:
        state = (volume.freeform_tags or {}).get(naming.TAG_STATE)
        if state == naming.STATE_IMPORTED or (state == naming.STATE_FAILED and keep_failed):
            continue
        for attachment in cloud.live_attachments(clients, compartment_id, volume.id):
            cloud.detach_volume(clients, attachment.id)
        cloud.delete_volume(clients, volume.id)
        removed["volumes"].append(volume.id)
    return removed


def sweep_run(credentials_block: str, worker_block: str, settings_block: str, flow_run_id: str) -> dict[str, list[str]]:
    """Remove the worker and unfinished volume of one flow run (crash and cancellation hook)."""
    clients = _clients(credentials_block)
    shape, settings = WorkerShape.load(worker_block), ImportSettings.load(settings_block)
    tags = {naming.TAG_MANAGED_BY: naming.MANAGED_BY, naming.TAG_FLOW_RUN: flow_run_id}
    instances = cloud.find_instances(clients, shape.compartment_id, tags)
    volumes = cloud.find_volumes(clients, settings.compartment_id, tags)
    return _remove(clients, settings.compartment_id, instances, volumes, settings.keep_failed_volume)


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


@flow(name="sweep-orphans")
def sweep_orphans(
    credentials_block: str = "local-oci",
    worker_block: str = "local-worker",
    settings_block: str = "local-import",
    min_age_minutes: float = 10.0,
) -> dict[str, list[str]]:
    """Terminate workers and delete unfinished volumes whose import run is no longer active."""
    logger = get_run_logger()
    clients = _clients(credentials_block)
    shape, settings = WorkerShape.load(worker_block), ImportSettings.load(settings_block)
    managed = {naming.TAG_MANAGED_BY: naming.MANAGED_BY}
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=min_age_minutes)

    def orphaned(resource: Any) -> bool:
        run_id = (resource.freeform_tags or {}).get(naming.TAG_FLOW_RUN, "")
        created = resource.time_created
        old_enough = created is None or created <= cutoff
        return old_enough and not run_is_active(run_id)

    instances = [i for i in cloud.find_instances(clients, shape.compartment_id, managed) if orphaned(i)]
    volumes = [v for v in cloud.find_volumes(clients, settings.compartment_id, managed) if orphaned(v)]
    removed = _remove(clients, settings.compartment_id, instances, volumes, settings.keep_failed_volume)
    logger.info("sweep removed %d worker(s) and %d volume(s)", len(removed["instances"]), len(removed["volumes"]))
    return removed
