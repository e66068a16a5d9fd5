"""Flow ``copy-to-region``: an imported volume, or a machine's volume group, restored in another region.

The steps are :class:`diskimport.regions.RegionCopy`'s: what cannot be copied (a destination
region that is the source's or does not answer, an OCID of the wrong kind, a missing volume or
group, an availability domain the destination does not have) is refused by name before
anything is created; then each disk is backed up, the backup copied to the destination region
and restored there to a volume (a boot volume for a boot disk), all disks at once; the
restored volumes of a machine go in one volume group named after it; the intermediate backups
are deleted in both regions. Each disk's progress (backing up, copying, restoring, restored)
shows in the run's logs, and the disks in a table artifact. A retried run resumes from what
its earlier attempt made; a failed one leaves no backup and no half-restored volume in either
region.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK, ImportSettings, OCICredentials
from diskimport import regions, sweeper
from diskimport.regions import CopyJob, RegionCopy
from diskimport.summaries import CopiedDisk
from flows.reporting import publish_copy_summary, refusal_reported
from flows.runs import retry_after_crash
from flows.tasks import open_run, step_task


@step_task("plan-copy", retries=4, delays=[1, 2, 5, 10])
def plan_copy(copier: RegionCopy, **kwargs: Any) -> CopyJob:
    return copier.plan(**kwargs)


@step_task("copy-disk", retries=2, delays=[10, 30])
def copy_disk(copier: RegionCopy, job: CopyJob, position: int) -> CopiedDisk:
    return copier.copy_disk(job, position)


@step_task("finish-copy", retries=3, delays=[2, 5, 10])
def finish_copy(copier: RegionCopy, job: CopyJob, copied: list[CopiedDisk]) -> str | None:
    return copier.finish(job, copied)


def copy_run_name() -> str:
    parameters = current_flow_run.parameters
    source = str(parameters.get("volume_id") or parameters.get("volume_group_id") or "?")
    return f"copy {source[-12:]} -> {parameters.get('destination_region', '?')}"


def cleanup_after_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """on_crashed / on_cancellation: this run's backups (both regions) and half-restored volumes
    removed, then (a crash only) the run scheduled again."""
    parameters = flow_run.parameters
    credentials = OCICredentials.load(parameters.get("credentials_block", DEFAULT_BLOCK))
    settings = ImportSettings.load(parameters.get("settings_block", DEFAULT_BLOCK))
    source = credentials.clients()
    destination = credentials.clients(parameters["destination_region"])
    compartments = [settings.compartment_id, parameters.get("compartment_id") or settings.compartment_id]
    regions.sweep_copy(source, destination, compartments, sweeper.run_tags(str(flow_run.id)))
    if state.is_crashed():
        retry_after_crash(flow_run.id, settings.crash_retries)


@flow(name="copy-to-region", flow_run_name=copy_run_name, on_crashed=[cleanup_after_crash],
      on_cancellation=[cleanup_after_crash])
def copy_to_region(
    destination_region: str,
    volume_id: str | None = None,
    volume_group_id: str | None = None,
    compartment_id: str | None = None,
    availability_domain: str | None = None,
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
) -> dict[str, Any]:
    """Copy a volume (``volume_id``: block or boot) or a machine (``volume_group_id``) to
    ``destination_region``: restored volumes in ``compartment_id`` (default: the settings
    block's) and ``availability_domain`` (default: the region's first)."""
    with refusal_reported(volume_id or volume_group_id or "copy"):
        credentials = OCICredentials.load(credentials_block)
        settings, run = open_run(credentials_block, worker_block, settings_block)
        copier = RegionCopy(run, credentials.clients(destination_region))
        job = plan_copy(copier, source_region=credentials.home_region() or "", destination_region=destination_region,
                        volume_id=volume_id, volume_group_id=volume_group_id, compartment_id=compartment_id,
                        availability_domain=availability_domain)
        with run:
            futures = [copy_disk.submit(copier, job, position) for position in range(len(job.sources))]
            copied = [future.result() for future in futures]
            group_id = finish_copy(copier, job, copied)
        summary = copier.summary(job, copied, group_id)
        publish_copy_summary(summary)
        return summary.as_dict()
