"""Removing what import runs left: the worker VMs and unfinished volumes tagged with a run.

The crash hook removes one run's resources; the sweeper removes those of every run that is
no longer active. Both use the undo functions a failing import uses (:mod:`diskimport.cloud`).
Imported volumes (``import-state=imported``) are the product and are never touched; a failed
one is kept when the settings say ``keep_failed_volume``, and one a sync was writing
(``import-synced-from``: it held an earlier import) is always kept, detached and tagged failed.
Idle VMs of the worker pool belong to no run: the pool's trim removes them, not this sweep.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable

from . import cloud, contract, pool


def sweep(clients: cloud.Clients, instance_compartment: str, volume_compartment: str, tags: dict[str, str],
          keep_failed: bool, orphaned: Callable[[Any], bool] = lambda resource: True) -> dict[str, list[str]]:
    """Terminate the worker VMs and discard the unfinished volumes carrying ``tags`` that ``orphaned`` picks."""
    removed: dict[str, list[str]] = {"instances": [], "volumes": []}
    for instance in cloud.find_instances(clients, instance_compartment, tags):
        if (instance.freeform_tags or {}).get(pool.TAG_POOL_STATE) == pool.IDLE:
            continue  # a worker VM launched ahead, nobody's yet: the pool's trim decides (diskimport/pool.py)
        if orphaned(instance):
            cloud.terminate_worker(clients, instance.id)
            removed["instances"].append(instance.id)
    for volume in cloud.find_volumes(clients, volume_compartment, tags):
        if (volume.freeform_tags or {}).get(pool.TAG_POOL_STATE) == pool.IDLE:
            continue  # a pooled worker VM's blank volume: the pool's trim decides
        state = (volume.freeform_tags or {}).get(contract.TAG_STATE)
        synced = contract.TAG_SYNCED_FROM in (volume.freeform_tags or {})
        if (state == contract.STATE_IMPORTED or (state == contract.STATE_FAILED and (keep_failed or synced))
                or not orphaned(volume)):
            continue
        if cloud.discard_volume(clients, volume_compartment, volume.id, keep_failed or synced) == "deleted":
            removed["volumes"].append(volume.id)
    return removed


def run_tags(flow_run_id: str) -> dict[str, str]:
    """The tags of everything one run created."""
    return {contract.TAG_MANAGED_BY: contract.MANAGED_BY, contract.TAG_FLOW_RUN: flow_run_id}


def orphan_test(run_is_active: Callable[[str], bool], min_age: dt.timedelta) -> Callable[[Any], bool]:
    """Whether a tagged resource is old enough and its run no longer active."""
    cutoff = dt.datetime.now(dt.timezone.utc) - min_age

    def orphaned(resource: Any) -> bool:
        run_id = (resource.freeform_tags or {}).get(contract.TAG_FLOW_RUN, "")
        created = resource.time_created
        return (created is None or created <= cutoff) and not run_is_active(run_id)
    return orphaned
