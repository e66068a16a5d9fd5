"""The worker pool end to end on the shared stack: a worker shape block of its own with a pool of
one, filled by the ``tend-worker-pool`` deployment (its VM's keys in a Prefect secret block), an
import through a real flow run that starts on the pooled VM and refills the pool behind it, and
the pool emptied again by the same deployment once its size is 0. The pool's rules are tested at
the core in tests/diskimport/test_pool.py."""

from __future__ import annotations

import uuid
from typing import Any

from deployments import demo, local_stack
from diskimport import pool
from tests.e2e.conftest import image_of, run_import

BLOCK = "pooled-e2e"


def tend(stack: dict[str, str]) -> dict[str, list[str]]:
    from prefect.deployments import run_deployment

    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        started = run_deployment("tend-worker-pool/default", parameters={"worker_block": BLOCK}, timeout=0)
    final = demo.wait_for_run(stack, started.id)
    assert final.state.is_completed(), final.state.message
    return demo.run_result(stack, final)


def idle(stack: dict[str, str]) -> list[dict[str, Any]]:
    return [i for i in demo.inventory(stack)["instances"] if i["freeformTags"].get(pool.TAG_POOL) == BLOCK
            and i["freeformTags"].get(pool.TAG_POOL_STATE) == pool.IDLE
            and i["lifecycleState"] not in ("TERMINATING", "TERMINATED")]


def pool_secrets(stack: dict[str, str]) -> list[str]:
    from flows.pool_keys import SecretBlockKeys

    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        return SecretBlockKeys().names()


def set_pool_size(stack: dict[str, str], size: int) -> None:
    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        from blocks import WorkerShape

        shape = WorkerShape.load(local_stack.BLOCKS["worker"])
        # a new document (saving the loaded block would overwrite the block it was loaded from)
        pooled = WorkerShape(**{**{name: getattr(shape, name) for name in WorkerShape.model_fields}, "pool_size": size})
        pooled.save(BLOCK, overwrite=True)


def test_an_import_starts_on_a_vm_of_the_pool_which_refills_behind_it(stack, disks, tmp_path):
    set_pool_size(stack, 1)
    try:
        [launched] = tend(stack)["launched"]
        assert [i["id"] for i in idle(stack)] == [launched]
        [vm] = idle(stack)
        [key] = [k for k in pool_secrets(stack) if k == vm["freeformTags"][pool.TAG_POOL_KEY]]
        blank = vm["freeformTags"][pool.TAG_POOL_VOLUME]

        image = image_of(disks["gpt"], "qcow2", tmp_path / "pooled.qcow2")
        _, run = run_import(stack, image, f"pool/{uuid.uuid4().hex[:8]}.qcow2", worker_block=BLOCK)
        final = demo.wait_for_run(stack, run.id)
        assert final.state.is_completed(), final.state.message
        summary = demo.run_result(stack, final)
        assert "take-pooled-worker" in summary["steps"] and "launch-worker" not in summary["steps"], list(summary["steps"])
        assert summary["volume_id"] == blank  # the blank volume made beside the pooled VM
        every = {i["id"]: i for i in local_stack_inventory_all(stack)["instances"]}
        assert every[launched]["lifecycleState"] in ("TERMINATING", "TERMINATED")  # used by this import, then gone
        assert every[launched]["freeformTags"]["import-flow-run"] == str(run.id)
        assert key not in pool_secrets(stack)  # its keys left the store with the take
        [refilled] = idle(stack)  # the import refilled the pool behind its take
        assert refilled["id"] != launched and refilled["freeformTags"][pool.TAG_POOL_KEY] in pool_secrets(stack)
    finally:
        set_pool_size(stack, 0)
        tend(stack)
    assert idle(stack) == [] and pool_secrets(stack) == []  # an emptied pool keeps no VM and no key
    assert not [v for v in demo.inventory(stack)["volumes"] if v["freeformTags"].get(pool.TAG_POOL) == BLOCK
                and v["freeformTags"].get(pool.TAG_POOL_STATE) == pool.IDLE]  # nor a blank volume


def local_stack_inventory_all(stack: dict[str, str]) -> dict[str, Any]:
    return demo.local_http().get(stack["LOCALOCI_ENDPOINT"] + "/_localoci/inventory?all=1").json()
