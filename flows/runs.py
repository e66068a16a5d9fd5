"""What the flows ask Prefect about runs: whether a run is still active, and the import slot a
run holds while its worker VM exists."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import random
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from typing import Iterator

import httpx

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from prefect.states import Scheduled

IMPORT_SLOTS = "oci-disk-import-workers"  # the global concurrency limit: worker VMs that may run at once
SLOT_LABEL = "oci-disk-import.worker-slot-lease"  # the lease an attempt holds, on its flow run
log = logging.getLogger(__name__)
HEDGE_SECONDS = 0.3
UNREACHABLE_SECONDS = 600.0  # how long a run keeps asking a server it cannot reach for a import slot
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


def _ensure_import_slots(limit: int) -> None:
    """Create or resize the global concurrency limit that bounds running worker VMs."""
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(IMPORT_SLOTS, limit)
        except ObjectAlreadyExists:  # a concurrent run created it between our read and create
            client.upsert_global_concurrency_limit_by_name(IMPORT_SLOTS, limit)


@contextlib.contextmanager
def import_slot(limit: int, lease_seconds: float = 300.0) -> Iterator[uuid.UUID]:
    """Hold one of ``limit`` import slots: a burst of uploads queues instead of hitting service limits.

    The slot is a lease on the global concurrency limit, renewed while the run holds it, so
    a run whose process is killed gives its slot back when the lease runs out.
    """
    _ensure_import_slots(limit)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id) if flow_run.id else None
    if flow_run.id:
        _release_dead_attempts_lease(uuid.UUID(str(flow_run.id)))
    lease_id = _take_lease(holder, lease_seconds)
    if flow_run.id:
        with get_client(sync_client=True) as client:  # so the next attempt can give it back if this one dies
            client.update_flow_run_labels(uuid.UUID(str(flow_run.id)), {SLOT_LABEL: str(lease_id)})
    released = threading.Event()
    # the threads talk to the server this run's settings name (which may be a context's, not the environment's)
    renewal = threading.Thread(target=contextvars.copy_context().run,
                               args=(_renew_lease, lease_id, lease_seconds, released), daemon=True,
                               name="import-slot-lease")
    renewal.start()
    try:
        yield lease_id
    finally:
        released.set()
        _release_lease(lease_id)


def _take_lease(holder: ConcurrencyLeaseHolder | None, lease_seconds: float) -> uuid.UUID:
    """A lease on one slot. A SQLite-backed server sometimes sits on a request for about two
    seconds when another write holds the database, then answers 503, where the same request
    sent again passes at once; so a request unanswered after ``HEDGE_SECONDS`` gets a twin,
    the first lease granted is kept and the other one is given back."""
    pool = ThreadPoolExecutor(2, thread_name_prefix="import-slot")
    settled = threading.Event()  # one request has its lease: the other stops asking
    requests = [pool.submit(contextvars.copy_context().run, _increment, holder, lease_seconds, settled)]
    if not wait(requests, timeout=HEDGE_SECONDS).done:
        requests.append(pool.submit(contextvars.copy_context().run, _increment, holder, lease_seconds, settled))
    pool.shutdown(wait=False)
    failures: list[BaseException] = []
    for request in as_completed(requests):
        if request.exception() is None and request.result() is not None:
            settled.set()
            for other in requests:
                if other is not request:
                    other.add_done_callback(functools.partial(contextvars.copy_context().run, _give_back))
            return request.result()
        failures.append(request.exception() or RuntimeError("an import slot request ended with no lease"))
    raise failures[0]  # the requests end with a lease or an error, and none had a lease


def _increment(holder: ConcurrencyLeaseHolder | None, lease_seconds: float, settled: threading.Event,
               patience: float = UNREACHABLE_SECONDS) -> uuid.UUID | None:
    """A lease, or ``None`` once ``settled`` says another request has one."""
    unreachable_since: float | None = None
    while not settled.is_set():
        # The client's own retries would wait seconds after a 503; a 503 here is retried at once.
        with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}), get_client(sync_client=True) as client:
            try:
                reply = client.increment_concurrency_slots_with_lease(
                    names=[IMPORT_SLOTS], slots=1, mode="concurrency", lease_duration=lease_seconds, holder=holder)
                return uuid.UUID(reply.json()["lease_id"])
            except httpx.HTTPStatusError as exc:
                status = exc.response.status_code
                if status == 423:  # every slot is taken: wait as long as the server says
                    time.sleep(float(exc.response.headers.get("Retry-After", 1.0)))
                elif status == 503:
                    time.sleep(random.uniform(0.02, 0.2))
                else:
                    raise
            except httpx.TransportError as exc:
                # A stalled or restarting server. Had it granted a lease we never heard of, that
                # lease runs out by itself (nobody renews it); the run asks again.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > patience:
                    raise
                log.warning("asking for a import slot failed (%s: %s); asking again", type(exc).__name__, exc)
                time.sleep(random.uniform(0.5, 2.0))
    return None


def _give_back(request: Future[uuid.UUID | None]) -> None:
    if request.exception() is None and (lease_id := request.result()) is not None:
        _release_lease(lease_id)


def _release_dead_attempts_lease(flow_run_id: uuid.UUID) -> None:
    """An earlier attempt of this run that died (its process or host killed) still holds its
    slot until the lease runs out; the run's label names that lease: give it back now."""
    with get_client(sync_client=True) as client:
        held = (client.read_flow_run(flow_run_id).labels or {}).get(SLOT_LABEL)
    if held:
        try:
            _release_lease(uuid.UUID(str(held)))
            log.info("gave back the import slot a dead attempt of this run held (lease %s)", held)
        except Exception as exc:  # expired or released already
            log.info("the import slot lease %s of an earlier attempt is gone already (%s)", held, exc)


def _release_lease(lease_id: uuid.UUID) -> None:
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id)


def _renew_lease(lease_id: uuid.UUID, lease_seconds: float, released: threading.Event) -> None:
    while not released.wait(lease_seconds / 4):
        try:
            with get_client(sync_client=True) as client:
                client.renew_concurrency_lease(lease_id, lease_seconds)
        except Exception as exc:  # the next renewal may pass; the lease outlives three misses
            log.warning("could not renew the import slot's lease %s: %s", lease_id, exc)


HOST_CRASH_REPORT = "Flow run infrastructure exited"


def retry_after_crash(flow_run_id: uuid.UUID, retries: int) -> threading.Thread:
    """From the crash hook: schedule the run again once the run host has reported the crash.

    The run host's Prefect worker process runs the hook, then reports the crash a second time
    ("Flow run infrastructure exited ..."), which would mark a run already scheduled again as
    Crashed; so a thread of that process waits for that report first (or a while)."""
    thread = threading.Thread(target=contextvars.copy_context().run,
                              args=(reschedule_crashed_run, flow_run_id, retries), daemon=True,
                              name=f"retry-{flow_run_id}")
    thread.start()
    return thread


def reschedule_crashed_run(flow_run_id: uuid.UUID, retries: int, wait: float = 20.0) -> bool:
    """Schedule a crashed run to run again, as ``prefect flow-run retry`` does, unless it has
    already started ``retries + 1`` times or is no longer crashed. Whether it was scheduled."""
    deadline = time.monotonic() + wait
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state
            if state is None or not state.is_crashed():
                log.info("flow run %s is %s, not crashed: not scheduled again", flow_run_id,
                         state.name if state else "without a state")
                return False
            if (state.message or "").startswith(HOST_CRASH_REPORT) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if run.run_count > retries:
            log.warning("flow run %s crashed on attempt %d of %d: it stays crashed", flow_run_id, run.run_count,
                        retries + 1)
            return False
        schedule_again(client, flow_run_id, f"crashed on attempt {run.run_count} of {retries + 1}; run again")
    log.info("flow run %s crashed on attempt %d of %d: scheduled again", flow_run_id, run.run_count, retries + 1)
    return True


def schedule_again(client: SyncPrefectClient, flow_run_id: uuid.UUID, message: str) -> None:
    """Put a crashed run back in the queue, as ``prefect flow-run retry`` does (``AwaitingRetry``)."""
    client.set_flow_run_state(flow_run_id, Scheduled(name="AwaitingRetry", message=message), force=True)
