"""Reconcile import runs with the hosts that run them: the state-based backstop for the automations.

The automations (:mod:`deployments.automations`) react to events: a heartbeat that stops, a
Pending run that never moves on, a Crashed run. A Prefect server that restarts, or an event
pipeline that drops events under load, loses some of those events, and then a dead run stays
Running (or Pending, or Crashed) until a person acts. So, on each pass, this looks at the
import runs' *states* and the heartbeats on record:

- a Running run with no heartbeat for ``silence`` seconds is marked Crashed;
- a Pending run submitted more than ``silence`` seconds ago is marked Crashed (its host died
  before the run started);
- a run Crashed for more than ``grace`` seconds (long enough for the crash hook or the retry
  automation to have acted) and less than ``max_age``, which has started at most ``retries``
  times, is scheduled again (``AwaitingRetry``), as the automation would have.

A run is judged silent only after this process has reached the server for ``silence``
seconds without a gap: heartbeats sent while the server was down are lost, and a run is not
dead for that. Only runs of the import flows started from a deployment are touched (a run
with no deployment has nobody to run it again). The next attempt resumes, as any retry does.

Run it beside the Prefect server, wherever runs send heartbeats (``make up`` starts it on a
PostgreSQL-backed stack)::

    PREFECT_API_URL=... python -m deployments.reconciler --heartbeat 30 --retries 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState,
    FlowRunFilterStateType)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter
from prefect.states import Crashed

from deployments.automations import FLOWS, SILENCE_MESSAGE
from flows.runs import schedule_again

log = logging.getLogger(__name__)
HEARTBEAT = "prefect.flow-run.heartbeat"
PAGE = 200


@dataclass
class Pass:
    """What one pass did, by flow run id."""

    crashed_silent: list[str] = field(default_factory=list)
    crashed_pending: list[str] = field(default_factory=list)
    rescheduled: list[str] = field(default_factory=list)
    left_crashed: list[str] = field(default_factory=list)


def _runs(client: SyncPrefectClient, types: list[StateType],
          deployment_ids: list[uuid.UUID] | None) -> Iterable[FlowRun]:
    """The import runs started from a deployment (of ``deployment_ids``, if given) whose state
    is one of ``types``."""
    offset = 0
    deployments = (FlowRunFilterDeploymentId(any_=deployment_ids) if deployment_ids is not None
                   else FlowRunFilterDeploymentId(is_null_=False))
    while True:
        page = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=FLOWS)),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=types)),
                                          deployment_id=deployments),
            limit=PAGE, offset=offset)
        yield from page
        if len(page) < PAGE:
            return
        offset += PAGE


def _heard_from(client: SyncPrefectClient, run_ids: list[uuid.UUID], since: dt.datetime) -> set[uuid.UUID]:
    """The runs among ``run_ids`` with a heartbeat on record since ``since``."""
    heard: set[uuid.UUID] = set()
    for start in range(0, len(run_ids), 50):
        batch = run_ids[start:start + 50]
        page = client.read_events(EventFilter(
            occurred=EventOccurredFilter(since=since),
            event=EventNameFilter(name=[HEARTBEAT]),
            resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}" for run_id in batch])), limit=50)
        while True:
            heard.update(uuid.UUID(event.resource.id.rsplit(".", 1)[1]) for event in page.events)
            if not page.next_page or heard.issuperset(batch):
                break
            page = client.read_events_page(page.next_page)
    return heard


def _age(run: FlowRun, now: dt.datetime) -> float:
    stamp = run.state.timestamp if run.state else None
    return (now - stamp).total_seconds() if stamp else 0.0


def reconcile_once(client: SyncPrefectClient, silence: float, retries: int, grace: float = 60.0,
                   max_age: float = 6 * 3600.0, judge_silence: bool = True,
                   now: dt.datetime | None = None, deployment_ids: list[uuid.UUID] | None = None) -> Pass:
    """One pass over the import runs (of ``deployment_ids`` only, if given); ``judge_silence``
    false skips the Running and Pending checks (the server was not watched long enough to tell
    a dead run from lost heartbeats)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    done = Pass()
    if judge_silence:
        running = [r for r in _runs(client, [StateType.RUNNING], deployment_ids) if _age(r, now) > silence]
        heard = _heard_from(client, [r.id for r in running], now - dt.timedelta(seconds=silence)) if running else set()
        for run in running:
            if run.id not in heard:
                _crash(client, run, f"{SILENCE_MESSAGE} for {silence:.0f} s: its host or process died "
                                    "(found by the reconciler)", done.crashed_silent)
        for run in _runs(client, [StateType.PENDING], deployment_ids):
            if _age(run, now) > silence:
                _crash(client, run, f"{SILENCE_MESSAGE} since it was submitted {_age(run, now):.0f} s ago: it "
                                    "never started; its host died (found by the reconciler)", done.crashed_pending)
    for run in _runs(client, [StateType.CRASHED], deployment_ids):
        if not grace < _age(run, now) < max_age:
            continue
        if run.run_count > retries:
            done.left_crashed.append(str(run.id))
            continue
        current = client.read_flow_run(run.id)  # the crash hook or the automation may have acted since
        if current.state is None or current.state.id != run.state.id:
            continue
        schedule_again(client, run.id, f"crashed on attempt {run.run_count} of {retries + 1} and not run again; "
                                       "run again (the reconciler)")
        done.rescheduled.append(str(run.id))
        log.warning("flow run %s (%s) was left crashed on attempt %d of %d: scheduled again", run.id, run.name,
                    run.run_count, retries + 1)
    return done


def _crash(client: SyncPrefectClient, run: FlowRun, message: str, into: list[str]) -> None:
    result = client.set_flow_run_state(run.id, Crashed(message=message), force=False)
    if result.status == SetStateStatus.ACCEPT:
        into.append(str(run.id))
        log.warning("flow run %s (%s): %s", run.id, run.name, message)


class Reconciler:
    """Passes every ``every`` seconds, judging silence only once the server has answered for
    ``silence`` seconds in a row."""

    def __init__(self, heartbeat: float = 30.0, silence_heartbeats: int = 3, retries: int = 2,
                 every: float = 30.0, grace: float = 60.0) -> None:
        self.silence = heartbeat * silence_heartbeats
        self.retries, self.every, self.grace = retries, every, grace
        self.reachable_since: float | None = None

    def step(self) -> Pass | None:
        try:
            with get_client(sync_client=True) as client:
                client.hello()
                now = time.monotonic()
                self.reachable_since = self.reachable_since or now
                return reconcile_once(client, self.silence, self.retries, self.grace,
                                      judge_silence=now - self.reachable_since >= self.silence)
        except Exception as exc:  # the server is down or restarting: start the watch again
            log.info("the Prefect server did not answer (%s: %s)", type(exc).__name__, exc)
            self.reachable_since = None
            return None

    def forever(self) -> None:
        while True:
            started = time.monotonic()
            self.step()
            time.sleep(max(1.0, self.every - (time.monotonic() - started)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat", type=float, default=30, help="the flow runs' heartbeat, in seconds")
    parser.add_argument("--silence", type=int, default=3, help="missed heartbeats before a run counts as dead")
    parser.add_argument("--retries", type=int, default=2, help="attempts after the first for a run that died")
    parser.add_argument("--every", type=float, default=30, help="seconds between passes")
    parser.add_argument("--grace", type=float, default=60,
                        help="seconds a run stays Crashed before the reconciler schedules it again")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Reconciler(args.heartbeat, args.silence, args.retries, args.every, args.grace).forever()


if __name__ == "__main__":
    main()
