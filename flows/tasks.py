"""What every flow of this project shares: how a step becomes a Prefect task, the run context
opened from the blocks, the run-level steps (the worker VM's), the crash hook, and attempts that
start again after a yield or a lost worker VM.

A task here is a thin wrapper over a core step (:mod:`diskimport`), which does the work and
logs what it decided; the task adds retries and its name in the UI. Clients and SSH sessions
are in the core objects passed to tasks, so no task is cached (``NO_CACHE``).
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK, ImportSettings, OCICredentials, WorkerShape
from diskimport.errors import is_deterministic, is_worker_lost
from diskimport.records import Subject, WorkerVM
from diskimport.run import Run, Yielding
from diskimport.worker_vm.session import WorkerSession
from flows.pool_keys import SecretBlockKeys
from flows.runs import retry_after_crash, run_is_active
from flows.sweep import sweep_run

T = TypeVar("T")


def retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a refusal (bad image, bad input) fails the same way every
    time, and a run that yields to a competing one must look for its volume, not make another."""
    try:
        state.result()
    except Yielding:
        return False
    except Exception as exc:
        return not is_deterministic(exc)
    return False


def step_task(name: str, retries: int = 0, delays: list[int] | int = 0) -> Any:
    """A flow step as a Prefect task: named for the UI, retried on transient failures only, never cached."""
    return task(name=name, retries=retries, retry_delay_seconds=delays, cache_policy=NO_CACHE,
                retry_condition_fn=retry_unless_deterministic)


def open_run(credentials_block: str, worker_block: str, settings_block: str) -> tuple[ImportSettings, Run]:
    """The settings and the run context of this flow run, from its blocks."""
    settings = ImportSettings.load(settings_block)
    return settings, Run(OCICredentials.load(credentials_block).clients(), settings, WorkerShape.load(worker_block),
                         run_id=str(current_flow_run.id or "local"), attempt=current_flow_run.run_count or 1,
                         run_is_active=run_is_active, logger=get_run_logger(), pool_keys=SecretBlockKeys(),
                         pool_name=worker_block)


@step_task("remove-stale-workers", retries=3, delays=[2, 5, 10])
def remove_stale_workers(run: Run, subject: Subject) -> list[str]:
    return run.remove_stale_workers(subject)


@step_task("launch-worker", retries=2, delays=[5, 15])
def launch_worker(run: Run, subject: Subject, availability_domain: str) -> WorkerVM:
    return run.launch_worker(subject, availability_domain)


@step_task("prepare-worker", retries=2, delays=5)
def prepare_worker(run: Run, session: WorkerSession) -> str:
    return run.prepare_worker(session)


@step_task("terminate-worker", retries=5, delays=[2, 5, 10, 20, 30])
def terminate_worker(run: Run, worker: WorkerVM) -> None:
    run.terminate_worker(worker)


def cleanup_after_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """on_crashed / on_cancellation: remove what this run created, then (a crash only) run it again.

    The hook runs in the run host's Prefect worker process once the run's process is gone
    (killed, out of memory): its worker VM and unfinished volume are removed first, so the next
    attempt, which resumes from the tasks that finished, never races this cleanup. A run
    crashes at most ``crash_retries`` times before it stays Crashed. (A run host that dies
    takes this hook with it: such a run is caught by the automations and the reconciler; the
    sweeper removes what it left.)
    """
    settings_block = flow_run.parameters.get("settings_block", DEFAULT_BLOCK)
    sweep_run(flow_run.parameters.get("credentials_block", DEFAULT_BLOCK),
              flow_run.parameters.get("worker_block", DEFAULT_BLOCK), settings_block, str(flow_run.id))
    if state.is_crashed():
        retry_after_crash(flow_run.id, ImportSettings.load(settings_block).crash_retries)


def until_not_yielding(attempt: Callable[[], T], worker_lost_retries: int = 0) -> T:
    """``attempt()`` again each time the run yields to a competing run (it then waits for that
    one), and after a lost worker VM (its SSH refused or cut off: a crashed or vanished VM) up
    to ``worker_lost_retries`` times: the failed attempt has removed what it made, so the next
    one starts on a new worker VM."""
    lost = 0
    while True:
        try:
            return attempt()
        except Yielding as exc:
            get_run_logger().info("%s; waiting for it", exc)
        except Exception as exc:
            if not is_worker_lost(exc) or lost >= worker_lost_retries:
                raise
            lost += 1
            get_run_logger().warning("the worker VM was lost (%s: %s); the run starts again on a new one "
                                     "(%d of %d)", type(exc).__name__, exc, lost, worker_lost_retries)
