"""The worker pool at the import core, against the local OCI with the real SDK and sshd worker VMs:
pooled VMs launched ahead are taken by one import each (an ETag-guarded retag decides between
imports that read the same VM), reached with keys of their own, and terminated after the import;
the pool refills after a take and replaces a VM that died; the trim removes what is past its idle
time, beyond the size or outside the hours; the pool stays within the global worker-VM limit and
its OCPU-hour cap; an import with an empty pool launches its own worker as without a pool.

The key store here is a dict in the test's process (the flows keep the keys in Prefect secret
blocks: tests/e2e/test_worker_pool.py)."""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import oci
import pytest

from diskimport import cloud, contract, pool
from diskimport.importer import Importer
from diskimport.run import Run
from blocks import ImportSettings
from tests.diskimport.conftest import import_object, live, version_of, volume_holds

pytestmark = pytest.mark.usefixtures("no_faults")
NOON = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)


class DictKeys:
    """A key store in this process's memory."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.lock = threading.Lock()

    def put(self, name: str, value: str) -> None:
        with self.lock:
            self.values[name] = value

    def get(self, name: str) -> str | None:
        with self.lock:
            return self.values.get(name)

    def names(self) -> list[str]:
        with self.lock:
            return list(self.values)

    def delete(self, name: str) -> None:
        with self.lock:
            self.values.pop(name, None)


@pytest.fixture
def keys() -> DictKeys:
    return DictKeys()


@pytest.fixture
def pooled(credentials, shape, compartment_id, active_runs, keys, localoci):
    """``make(pool_size=..., worker_limit=..., **shape fields)``: a Pool and a maker of runs using it;
    every pooled VM is terminated at the end."""
    made: list[pool.Pool] = []

    def make(worker_limit: int = 64, **fields: Any) -> tuple[pool.Pool, Any]:
        pool_shape = shape.model_copy(update=fields)
        settings = ImportSettings(compartment_id=compartment_id, worker_concurrency_limit=worker_limit)
        made.append(pool.Pool(credentials.clients(), pool_shape, keys, settings))

        def run() -> Run:
            run_id = str(__import__("uuid").uuid4())
            active_runs.add(run_id)
            return Run(credentials.clients(), settings, pool_shape, run_id=run_id,
                       run_is_active=active_runs.__contains__, pool_keys=keys)
        return made[-1], run
    yield make
    clients = credentials.clients()
    for instance in pool.managed_instances(clients, compartment_id):
        if pool.TAG_POOL in (instance.freeform_tags or {}):
            cloud.terminate_worker(clients, instance.id)
    for volume in blank_volumes(clients, compartment_id):
        cloud.delete_volume(clients, volume.id)


def blank_volumes(clients: Any, compartment_id: str) -> list[Any]:
    """The idle pooled VMs' blank volumes."""
    return cloud.find_volumes(clients, compartment_id, {pool.TAG_POOL_STATE: pool.IDLE})

def idle(worker_pool: pool.Pool) -> list[Any]:
    return pool.idle_vms(pool.managed_instances(worker_pool.clients, worker_pool.shape.compartment_id),
                         worker_pool.name, worker_pool.shape_id)


def busy(worker_pool: pool.Pool) -> int:
    return pool.busy_workers(pool.managed_instances(worker_pool.clients, worker_pool.shape.compartment_id))


def wait_refills(run: Run) -> None:
    for thread in run.refills:
        thread.join(timeout=120)
        assert not thread.is_alive()


# -- settings -------------------------------------------------------------------------------------

def test_the_pool_is_sized_by_its_settings_hours_cost_cap_and_the_worker_limit():
    settings = pool.PoolSettings(size=4, hours="07-19")
    assert pool.target_size(settings, 2, NOON, busy_workers=0, worker_limit=10) == 4
    assert pool.target_size(settings, 2, NOON.replace(hour=19), busy_workers=0, worker_limit=10) == 0
    assert pool.target_size(pool.PoolSettings(size=4, hours="00-06,18-24"), 2, NOON.replace(hour=23), 0, 10) == 4
    # an idle VM of 2 OCPUs costs 2 OCPU-hours each hour: a cap of 5 holds two of them
    assert pool.target_size(pool.PoolSettings(size=4, max_ocpu_hours=5), 2, NOON, 0, 10) == 2
    # idle and at work together within the worker limit plus the pool's size
    assert pool.target_size(settings, 2, NOON, busy_workers=10, worker_limit=10) == 4
    assert pool.target_size(settings, 2, NOON, busy_workers=12, worker_limit=10) == 2
    assert pool.target_size(settings, 2, NOON, busy_workers=15, worker_limit=10) == 0
    assert pool.target_size(pool.PoolSettings(size=0), 2, NOON, 0, 10) == 0
    for bad in ("7-25", "19-07", "noon", "07-19,"):
        with pytest.raises(contract.InvalidRequest, match="pool_hours") as refused:
            pool.parse_hours(bad)
        assert refused.value.code == "invalid-setting"


# -- take ------------------------------------------------------------------------------------------

def test_a_pooled_vm_goes_to_one_import_only_and_its_keys_leave_the_store(pooled, keys, localoci):
    worker_pool, make_run = pooled(pool_size=1)
    assert len(worker_pool.refill()) == 1 and len(idle(worker_pool)) == 1
    [vm] = idle(worker_pool)
    key_name = vm.freeform_tags[pool.TAG_POOL_KEY]
    assert keys.get(key_name) is not None
    runs = [make_run() for _ in range(4)]
    ad = vm.availability_domain
    start, taken = threading.Barrier(len(runs)), [None] * len(runs)

    def take(i: int) -> None:
        start.wait()
        taken[i] = runs[i].pool.take(ad, runs[i].tags(subject(runs[i])), f"worker-{i}")
    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, t in enumerate(taken) if t is not None]
    assert len(winners) == 1, taken
    won = taken[winners[0]]
    assert won.instance.id == vm.id
    tags = localoci.inventory()["instances"]
    tags = next(i for i in tags if i["id"] == vm.id)["freeformTags"]
    assert tags[pool.TAG_POOL_STATE] == pool.TAKEN and tags[contract.TAG_FLOW_RUN] == runs[winners[0]].run_id
    assert keys.get(key_name) is None  # only the import that took it holds its keys now
    assert runs[0].pool.take(ad, {}, "late") is None
    # its keys are its own: the run's own keys do not open it, the pool's do
    assert won.client_key != runs[winners[0]].client_key and won.host_key != runs[winners[0]].host_key


def subject(run: Run) -> Any:
    from diskimport.records import Subject
    return Subject(kind="import", id=f"pool-test-{run.run_id[:8]}", name="pool-test", version="etag")


def test_an_import_starts_on_a_pooled_vm_which_ends_with_it_and_the_pool_refills(pooled, localoci, bucket, web01,
                                                                                  keys):
    worker_pool, make_run = pooled(pool_size=1)
    [first] = worker_pool.refill()
    [vm] = idle(worker_pool)
    blank = vm.freeform_tags[pool.TAG_POOL_VOLUME]
    run = make_run()
    importer = Importer(run, competing_poll_seconds=0.1)
    version = version_of(importer, localoci, bucket)
    summary = import_object(importer, version, force=True)
    wait_refills(run)
    assert volume_holds(localoci, summary["volume_id"], web01[1])
    assert "take-pooled-worker" in summary["steps"] and "launch-worker" not in summary["steps"], summary["steps"]
    # the blank volume made beside the pooled VM became the import's volume: no create to wait for
    assert summary["volume_id"] == blank
    [volume] = live(localoci, "volumes", version)
    assert volume["id"] == blank and volume["freeformTags"][contract.TAG_STATE] == contract.STATE_IMPORTED
    assert volume["displayName"] == "web01" and volume["sizeInGBs"] == pool.BLANK_VOLUME_GB
    assert pool.TAG_POOL_STATE not in volume["freeformTags"]
    instances = {i["id"]: i for i in localoci.admin("GET", "inventory?all=1")["instances"]}
    assert instances[first]["lifecycleState"] in ("TERMINATING", "TERMINATED")  # used once, then gone
    assert instances[first]["freeformTags"][contract.TAG_IMPORT_ID] == version.import_id
    assert live(localoci, "instances", version) == []
    [refilled] = idle(worker_pool)  # launched behind the take, for the next import
    assert refilled.id != first and keys.get(refilled.freeform_tags[pool.TAG_POOL_KEY]) is not None


def test_a_worker_taken_without_a_volume_to_make_leaves_no_blank_volume(pooled, localoci):
    """A machine's, an export's or a resumed import's worker: its blank volume is not used, and goes."""
    from tests.waiting import wait_for

    worker_pool, make_run = pooled(pool_size=1)
    worker_pool.refill()
    [vm] = idle(worker_pool)
    blank = vm.freeform_tags[pool.TAG_POOL_VOLUME]
    run = make_run()
    worker = run.launch_worker(subject(run), vm.availability_domain)
    try:
        assert worker.id == vm.id
        wait_for(lambda: not [v for v in localoci.inventory()["volumes"] if v["id"] == blank],
                 what="the unused blank volume deleted")
    finally:
        cloud.terminate_worker(run.clients, worker.id)
        wait_refills(run)


def test_an_import_with_an_empty_pool_launches_its_own_worker(pooled, localoci, bucket, web01):
    worker_pool, make_run = pooled(pool_size=1)  # never refilled: empty
    run = make_run()
    importer = Importer(run, competing_poll_seconds=0.1)
    summary = import_object(importer, version_of(importer, localoci, bucket), force=True)
    assert volume_holds(localoci, summary["volume_id"], web01[1])
    assert "launch-worker" in summary["steps"], summary["steps"]
    wait_refills(run)
    assert len(idle(worker_pool)) == 1  # and the pool it found empty was filled behind it


# -- refill and trim -----------------------------------------------------------------------------

def test_a_pooled_vm_that_dies_before_it_is_taken_is_replaced(pooled, compute, keys):
    worker_pool, _ = pooled(pool_size=2)
    launched = worker_pool.refill()
    assert len(launched) == 2 and worker_pool.refill() == []  # full: nothing more
    cloud.terminate_worker(worker_pool.clients, launched[0])  # it dies
    [replacement] = worker_pool.refill()
    assert replacement not in launched and sorted(i.id for i in idle(worker_pool)) == sorted([launched[1], replacement])
    # the dead one's keys are dropped once they are old enough not to be a launch in flight
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=pool.ORPHAN_KEY_SECONDS + 1)
    worker_pool.settings = pool.PoolSettings(size=2, idle_minutes=60)
    worker_pool.trim(later)
    assert len(keys.names()) == 2


def test_refills_at_once_leave_the_pool_at_its_size(pooled, keys):
    worker_pool, _ = pooled(pool_size=2)
    start, launched = threading.Barrier(3), []

    def refill() -> None:
        start.wait()
        launched.extend(worker_pool.refill())
    threads = [threading.Thread(target=refill) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(idle(worker_pool)) == 2 and sorted(launched) == sorted(i.id for i in idle(worker_pool))
    assert len(keys.names()) == 2  # the extra VMs went with their keys (and blank volumes)
    assert len(blank_volumes(worker_pool.clients, worker_pool.shape.compartment_id)) == 2


def test_the_trim_removes_idle_vms_past_their_time_beyond_the_size_or_outside_the_hours(pooled, keys):
    worker_pool, _ = pooled(pool_size=3, pool_idle_minutes=30)
    launched = worker_pool.refill()
    assert len(launched) == 3
    now = dt.datetime.now(dt.timezone.utc)
    assert worker_pool.trim(now) == []
    worker_pool.settings = pool.PoolSettings(size=1, idle_minutes=30)  # the pool was made smaller
    trimmed = worker_pool.trim(now)
    assert len(trimmed) == 2 and len(idle(worker_pool)) == 1 and len(keys.names()) == 1
    # their blank volumes go with them
    assert [v.id for v in blank_volumes(worker_pool.clients, worker_pool.shape.compartment_id)] == [
        idle(worker_pool)[0].freeform_tags[pool.TAG_POOL_VOLUME]]
    hour = (now.hour + 12) % 24
    worker_pool.settings = pool.PoolSettings(size=1, idle_minutes=30, hours=f"{hour:02d}-{hour + 1:02d}")
    assert len(worker_pool.trim(now)) == 1 and idle(worker_pool) == []  # outside its hours: none
    worker_pool.settings = pool.PoolSettings(size=1, idle_minutes=30)
    [young] = worker_pool.refill(now)
    assert worker_pool.trim(now + dt.timedelta(minutes=29)) == []
    assert worker_pool.trim(now + dt.timedelta(minutes=31)) == [young]  # past its idle time
    assert keys.names() == []


def test_idle_pooled_vms_and_workers_at_work_stay_within_the_worker_limit_plus_the_pool(pooled, make_run):
    first, _ = pooled(pool_size=3)
    others = busy(first)  # workers other tests of this session may have left running
    worker_pool, _ = pooled(pool_size=3, worker_limit=others)  # every import slot taken: at the limit
    busy_run = make_run()
    worker = busy_run.launch_worker(subject(busy_run), worker_pool.availability_domain())
    try:
        assert busy(worker_pool) == others + 1  # one more at work than the limit (the limit was lowered)
        assert len(worker_pool.refill()) == 2  # so the pool holds one fewer: limit + size in all
        assert worker_pool.refill() == []
    finally:
        cloud.terminate_worker(busy_run.clients, worker.id)
    assert len(worker_pool.refill()) == 1  # back within the limit: the pool's full size


def test_the_sweep_leaves_idle_pooled_vms_to_the_pool(pooled, credentials, shape, compartment_id):
    from diskimport import sweeper

    worker_pool, _ = pooled(pool_size=1)
    [vm] = worker_pool.refill()
    [blank] = [v.id for v in blank_volumes(credentials.clients(), compartment_id)]
    removed = sweeper.sweep(credentials.clients(), compartment_id, compartment_id,
                            {contract.TAG_MANAGED_BY: contract.MANAGED_BY}, False)
    assert vm not in removed["instances"] and [i.id for i in idle(worker_pool)] == [vm]
    assert blank not in removed["volumes"] and [v.id for v in blank_volumes(credentials.clients(), compartment_id)] == [
        blank]


def test_update_instance_with_a_stale_etag_is_refused(pooled, compute):
    worker_pool, _ = pooled(pool_size=1)
    [vm] = worker_pool.refill()
    # once RUNNING: the boot's own transition changes the ETag too (a fresh-clone run saw it land in between)
    read = oci.wait_until(compute, compute.get_instance(vm), "lifecycle_state", "RUNNING", max_wait_seconds=300)
    etag = read.headers["etag"]
    details = oci.core.models.UpdateInstanceDetails(freeform_tags={**read.data.freeform_tags, "x": "1"})
    updated = compute.update_instance(vm, details, if_match=etag)
    assert updated.data.freeform_tags["x"] == "1" and updated.headers["etag"] != etag
    with pytest.raises(oci.exceptions.ServiceError) as refused:
        compute.update_instance(vm, details, if_match=etag)
    assert refused.value.status == 412
