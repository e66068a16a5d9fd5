"""``make bench``'s worker pool row: the small image's upload to ready with a pool of worker VMs
launched ahead, against the same import without a pool and the reference pipeline, all three in
one run (``make bench BENCH_ARGS="--latency oci --images pool-small-50m"``: under the ``oci``
latency profile a worker takes minutes to launch and boot, which is what the pool takes away).

The pool is the stack's worker block with ``pool_size`` 2, filled by the ``tend-worker-pool``
deployment; the row waits until both pooled VMs answer SSH (an operator's pool is filled long
before the upload), then uploads and times the import from the upload event to the volume ready.
The pool is emptied again at the end. Printed beside the times: the idle pooled VM-minutes per
import (each pooled VM from its launch to its take, or to the row's end for one nobody took).
Targets: with the pool at most 30 s; without it and the reference are the reasons for the pool
(minutes each under the ``oci`` profile), printed with their ratio to the pooled import.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Callable

from deployments import demo, local_stack

POOL = "pool-small-50m"
POOL_SOURCE = "small-50m"
POOL_SIZE = 2
TARGET_S = 30.0


def set_pool_size(env: dict[str, str], size: int) -> None:
    """The stack's worker block with ``pool_size`` set (saved over itself)."""
    from blocks import WorkerShape

    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        shape = WorkerShape.load(local_stack.BLOCKS["worker"])
        shape.pool_size = size
        shape.save(local_stack.BLOCKS["worker"], overwrite=True)


def tend(env: dict[str, str]) -> dict[str, list[str]]:
    from prefect.deployments import run_deployment

    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        started = run_deployment("tend-worker-pool/default", timeout=0)
    final = demo.wait_for_run(env, started.id)
    if not final.state.is_completed():
        raise RuntimeError(f"tend-worker-pool ended {final.state.name}: {final.state.message}")
    return demo.run_result(env, final)


def pooled(env: dict[str, str], since: float) -> list[dict[str, Any]]:
    """The pooled VMs launched since ``since`` (epoch seconds), ended ones too."""
    import datetime as dt

    every = local_stack_inventory(env)
    return [i for i in every["instances"] if i["freeformTags"].get("import-pool")
            and dt.datetime.fromisoformat(i["timeCreated"].replace("Z", "+00:00")).timestamp() >= since]


def local_stack_inventory(env: dict[str, str]) -> dict[str, Any]:
    import httpx

    return httpx.get(env["LOCALOCI_ENDPOINT"] + "/_localoci/inventory?all=1", timeout=30).json()


def wait_answering(env: dict[str, str], instance_ids: list[str], timeout: float = 900.0) -> float:
    """Wait until every one of the instances answers SSH on its private address; the seconds waited."""
    from blocks import OCICredentials, WorkerShape
    from diskimport import cloud

    start = time.monotonic()
    port = int(env["LOCALOCI_SSH_PORT"])
    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        clients = OCICredentials.load(local_stack.BLOCKS["credentials"]).clients()
        compartment = WorkerShape.load(local_stack.BLOCKS["worker"]).compartment_id
    addresses: dict[str, str] = {}
    while True:
        for instance_id in instance_ids:
            if instance_id not in addresses:
                try:
                    addresses[instance_id] = cloud.worker_address(clients, compartment, instance_id, False)
                except cloud.ResourceFailed:
                    pass  # no address before it runs
        if len(addresses) == len(instance_ids) and all(_banner(a, port) for a in addresses.values()):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"pooled worker VMs not answering SSH within {timeout:.0f} s: {instance_ids}")
        time.sleep(2)


def _banner(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2) as s:
            s.settimeout(5)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def idle_minutes(instances: list[dict[str, Any]], now: float) -> float:
    """Each pooled VM's minutes from its launch to its take (or ``now``)."""
    import datetime as dt

    total = 0.0
    for i in instances:
        created = dt.datetime.fromisoformat(i["timeCreated"].replace("Z", "+00:00")).timestamp()
        taken = float(i["freeformTags"].get("import-pool-taken") or now)
        total += max(0.0, taken - created) / 60
    return total


def bench_pool(env: dict[str, str], path: Path, measure: Callable[[Path], tuple[dict[str, Any], str]],
               reference: Callable[[str], dict[str, Any]], delete: Callable[[str], None]) -> dict[str, Any]:
    """The row: ``measure`` times an upload to ready (the object's name beside), ``reference`` runs
    the reference pipeline on an uploaded object, ``delete`` removes an object."""
    without, name = measure(path)
    delete(name)
    since = time.time()
    set_pool_size(env, POOL_SIZE)
    launched: list[str] = []
    try:
        launched = tend(env)["launched"]
        fill_s = wait_answering(env, launched)
        pooled_import, name = measure(path)
        try:
            ref = reference(name)
        finally:
            delete(name)
        instances = pooled(env, since)
        idle = idle_minutes(instances, time.time())
    finally:
        set_pool_size(env, 0)
        tend(env)
    return {"without_pool_s": without["seconds"], "with_pool_s": pooled_import["seconds"],
            "reference_s": ref["seconds"], "pool_fill_s": round(fill_s, 1), "pool_vms": len(instances),
            "idle_vm_minutes_per_import": round(idle, 1), "steps": pooled_import["steps"],
            "took_pooled": "take-pooled-worker" in pooled_import["steps"]
                           and "launch-worker" not in pooled_import["steps"]}


def pool_lines(row: dict[str, Any]) -> list[str]:
    return [f"{POOL}: with a pool of {POOL_SIZE} {row['with_pool_s']:.1f} s (upload event to volume ready), "
            f"without a pool {row['without_pool_s']:.1f} s, reference {row['reference_s']:.1f} s; "
            f"pool filled and answering in {row['pool_fill_s']:.0f} s; idle pooled VM-minutes per import "
            f"{row['idle_vm_minutes_per_import']:.1f} ({row['pool_vms']} pooled VMs, one import)",
            f"{POOL}: steps " + ", ".join(f"{k} {v:.1f}" for k, v in row["steps"].items())]


def pool_targets(row: dict[str, Any]) -> list[tuple[str, bool, str]]:
    return [
        (f"{POOL} with a pool of {POOL_SIZE} <= {TARGET_S:.0f} s", row["with_pool_s"] <= TARGET_S and row["took_pooled"],
         f"{row['with_pool_s']:.1f} s{'' if row['took_pooled'] else ' (it did not take a pooled VM)'}"),
        (f"{POOL} without a pool >= 180 s (the launch the pool saves)", row["without_pool_s"] >= 180,
         f"{row['without_pool_s']:.1f} s, {row['without_pool_s'] / row['with_pool_s']:.1f}x the pooled import"),
        (f"{POOL} reference >= 180 s", row["reference_s"] >= 180,
         f"{row['reference_s']:.1f} s, {row['reference_s'] / row['with_pool_s']:.1f}x the pooled import"),
    ]


BURST = "pool-burst-20"
BURST_UPLOADS, BURST_POOL = 20, 4
BURST_TARGET = 0.6


def burst_makespan(env: dict[str, str], path: Path, tag: str) -> dict[str, Any]:
    """Upload ``path`` BURST_UPLOADS times under new names at once; the seconds from the first upload
    to the last volume ready, and how many imports took a pooled VM. The volumes and objects are deleted."""
    import datetime as dt

    import oci

    names = [f"bench/burst-{tag}-{int(time.time())}-{n:02d}.qcow2" for n in range(BURST_UPLOADS)]
    start = dt.datetime.now(dt.timezone.utc)
    etags = [demo.upload(env, path, name) for name in names]
    runs = [demo.run_started_by_upload(env, name, etag, timeout=600) for name, etag in zip(names, etags)]
    finals = [demo.wait_for_run(env, run.id, timeout=7200) for run in runs]
    failed = [f.state.message for f in finals if not f.state.is_completed()]
    if failed:
        raise RuntimeError(f"{len(failed)} of the burst's imports failed: {failed[0]}")
    summaries = [demo.run_result(env, f) for f in finals]
    end = max(dt.datetime.fromisoformat(s["ready_at"]) for s in summaries)
    client, config = demo.stack_clients(env)
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    for name, summary in zip(names, summaries):
        blockstorage.delete_volume(summary["volume_id"])
        client.delete_object(env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], name)
    return {"makespan_s": round((end - start).total_seconds(), 1),
            "took_pooled": sum(1 for s in summaries if "take-pooled-worker" in s["steps"]
                               and "launch-worker" not in s["steps"])}


def bench_burst(env: dict[str, str], path: Path) -> dict[str, Any]:
    """The burst row: BURST_UPLOADS uploads at once without a pool, then with a pool of BURST_POOL."""
    without = burst_makespan(env, path, "nopool")
    since = time.time()
    set_pool_size(env, BURST_POOL)
    try:
        wait_answering(env, tend(env)["launched"])
        pooled_burst = burst_makespan(env, path, "pool")
        idle = idle_minutes(pooled(env, since), time.time())
    finally:
        set_pool_size(env, 0)
        tend(env)
    return {"without_pool_s": without["makespan_s"], "with_pool_s": pooled_burst["makespan_s"],
            "ratio": round(pooled_burst["makespan_s"] / without["makespan_s"], 3),
            "took_pooled": pooled_burst["took_pooled"],
            "idle_vm_minutes_per_import": round(idle / BURST_UPLOADS, 2)}


def burst_lines(row: dict[str, Any]) -> list[str]:
    return [f"{BURST}: {BURST_UPLOADS} uploads at once, makespan with a pool of {BURST_POOL} {row['with_pool_s']:.1f} s "
            f"({row['took_pooled']} imports took a pooled VM), without a pool {row['without_pool_s']:.1f} s: "
            f"{row['ratio']:.2f}; idle pooled VM-minutes per import {row['idle_vm_minutes_per_import']:.2f}"]


def burst_targets(row: dict[str, Any]) -> list[tuple[str, bool, str]]:
    return [(f"{BURST} makespan with a pool of {BURST_POOL} <= {BURST_TARGET} x without", row["ratio"] <= BURST_TARGET,
             f"{row['ratio']:.2f}")]
