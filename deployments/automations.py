"""Automations that recover import runs whose host died, the Prefect way.

A run whose process dies while its Prefect worker lives is reported Crashed by that worker,
and the flow's crash hook cleans up and schedules it again (``flows/runs.py``). When the
whole host dies, worker included, nobody reports anything and the run stays Running. So:

1. every flow run sends heartbeats (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, in seconds, set on
   whatever starts flow runs: the work pool's job variables or the workers' environment);
2. **"oci-disk-import: silent runs crash"** marks an import run Crashed when no heartbeat (and no
   end) followed its last heartbeat within ``silence`` seconds (three heartbeats, by default);
3. **"oci-disk-import: runs that never start crash"** does the same for a run still Pending
   ``silence`` seconds after it was submitted (its host died before the run began);
4. **"oci-disk-import: retry runs crashed by silence"** schedules such a run again
   (``AwaitingRetry``) while it has started at most ``retries`` times (its ``prefect.run-count``),
   so a run that keeps dying stays Crashed. The next attempt removes the dead attempt's worker
   VM and half-written volumes and resumes, as any retry does; the hourly sweeper stays the
   last line.

Only the two import flows are watched (their Crashed events name the flow as a related
resource). Set them up, or update them after a change, on any Prefect server::

    PREFECT_API_URL=... python -m deployments.automations --heartbeat 30 --retries 2

``make up`` does this for the local stack.
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

FLOWS = ["import-virtual-disk", "import-machine"]
SILENT = "oci-disk-import: silent runs crash"
PENDING = "oci-disk-import: runs that never start crash"
RETRY = "oci-disk-import: retry runs crashed by silence"
NAMES = (SILENT, PENDING, RETRY)
SILENCE_MESSAGE = "No heartbeat from the flow run"
ENDS = ["prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
        "prefect.flow-run.Crashed"]


def _import_flows() -> ResourceSpecification:
    return ResourceSpecification({"prefect.resource.role": "flow", "prefect.resource.name": FLOWS})


def silent_runs_crash(silence: timedelta) -> Automation:
    return Automation(
        name=SILENT, description="An import run that stopped sending heartbeats (its host died) is Crashed.",
        trigger=EventTrigger(
            posture=Posture.Proactive, after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ENDS},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=_import_flows(), for_each={"prefect.resource.id"}, threshold=1, within=silence),
        # Not forced: a run that ended while the server missed its last events keeps its end.
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED, force=False,
            message=f"{SILENCE_MESSAGE} for {silence.total_seconds():.0f} s: its host or process died")])


def pending_runs_crash(window: timedelta) -> Automation:
    """A run whose host died between its submission and its start stays Pending, without ever
    sending a heartbeat: it is Crashed once it has been Pending for ``window``."""
    return Automation(
        name=PENDING, description="An import run submitted to a host that died before starting it is Crashed.",
        trigger=EventTrigger(
            posture=Posture.Proactive, after={"prefect.flow-run.Pending"},
            expect={"prefect.flow-run.Running", "prefect.flow-run.Scheduled", *ENDS},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=_import_flows(), for_each={"prefect.resource.id"}, threshold=1, within=window),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED, force=False,
            message=f"{SILENCE_MESSAGE} since it was submitted {window.total_seconds():.0f} s ago: it never "
                    "started; its host died")])


def retry_silent_crashes(retries: int) -> Automation:
    return Automation(
        name=RETRY, description=f"An import run crashed by silence runs again, at most {retries + 1} times in all.",
        trigger=EventTrigger(
            posture=Posture.Reactive, expect={"prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*",
                                         "prefect.state-message": f"{SILENCE_MESSAGE}*",
                                         "prefect.run-count": [str(n) for n in range(0, retries + 1)]}),
            match_related=_import_flows(), for_each={"prefect.resource.id"}, threshold=1,
            within=timedelta(0)),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", force=True,
                                    message="crashed without a heartbeat; run again")])


def ensure(heartbeat_seconds: int = 30, retries: int = 2, silence_heartbeats: int = 3) -> list[Automation]:
    """Create the two automations, or update them to these settings; return them."""
    silence = timedelta(seconds=heartbeat_seconds * silence_heartbeats)
    wanted = [silent_runs_crash(silence), pending_runs_crash(silence), retry_silent_crashes(retries)]
    for automation in wanted:
        try:
            existing = Automation.read(name=automation.name)
        except ValueError:
            automation.id = automation.create().id
        else:
            automation.id = existing.id
            automation.update()
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heartbeat", type=int, default=30, help="the flow runs' heartbeat, in seconds (>= 30)")
    parser.add_argument("--retries", type=int, default=2, help="attempts after the first for a run that died")
    parser.add_argument("--silence", type=int, default=3, help="missed heartbeats before a run counts as dead")
    args = parser.parse_args()
    for automation in ensure(args.heartbeat, args.retries, args.silence):
        print(f"{automation.name}: {automation.id}")


if __name__ == "__main__":
    main()
