"""Flow ``export-volume``: a block or boot volume, or a machine's volume group, to image objects.

The steps are :class:`diskimport.export.Exporter`'s: the volumes are resolved and the objects
named before anything is created (an OCID of the wrong kind, a missing bucket, volume or group,
a source that is attached or too large for the format, and an object name taken by something
else, are refused by name); one worker VM reads every volume once, read-only, and uploads each
image as a parallel multipart upload; each object is committed, inspected again and its
SHA-256 written beside it. Objects this export already wrote are not written again, so a
retried or repeated run finishes what is missing. A failed run leaves no upload part, no half
object, no PAR and no worker VM.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK, OCICredentials
from diskimport.export import ExportedImage, Exporter, ExportJob, remove_run_uploads
from diskimport.records import WorkerVM
from diskimport.worker_vm.session import WorkerSession
from flows import tasks
from flows.reporting import UploadProgress, publish_export_summary, refusal_reported
from flows.runs import import_slot
from flows.tasks import (launch_worker, open_run, prepare_worker, remove_stale_workers, step_task, terminate_worker,
                         until_not_yielding)


@step_task("plan-export", retries=4, delays=[1, 2, 5, 10])
def plan_export(exporter: Exporter, **kwargs: Any) -> ExportJob:
    return exporter.plan(**kwargs)


@step_task("find-finished-objects", retries=3, delays=[2, 5, 10])
def finished_objects(exporter: Exporter, job: ExportJob, overwrite: bool) -> dict[int, str]:
    return exporter.finished_objects(job, overwrite)


@step_task("remove-stale-uploads", retries=3, delays=[2, 5, 10])
def remove_stale_uploads(exporter: Exporter, job: ExportJob) -> list[str]:
    return exporter.remove_stale_uploads(job)


@step_task("export-disk", retries=2, delays=[5, 15])
def export_disk(exporter: Exporter, session: WorkerSession, worker: WorkerVM, job: ExportJob,
                position: int) -> ExportedImage:
    progress = UploadProgress(job.objects[position])
    exported = exporter.export_volume(session, worker, job, position, progress.event)
    progress.done()
    return exported


@step_task("write-manifest", retries=3, delays=[2, 5, 10])
def write_manifest(exporter: Exporter, job: ExportJob) -> str | None:
    return exporter.write_manifest(job)


def export_run_name() -> str:
    """``export web-01 -> qcow2``: what is exported, as what."""
    parameters = current_flow_run.parameters
    source = str(parameters.get("volume_id") or parameters.get("volume_group_id") or "?")
    return f"export {source[-12:]} -> {parameters.get('format', 'qcow2')}"


def cleanup_after_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """on_crashed / on_cancellation: every flow's hook (the worker VM, a retry after a crash),
    and the multipart uploads the run left on its objects aborted (found by the run's write
    PARs, so no other run's upload in the bucket is touched), so no part outlives it."""
    parameters = flow_run.parameters
    try:
        clients = OCICredentials.load(parameters.get("credentials_block", DEFAULT_BLOCK)).clients()
        remove_run_uploads(clients, parameters.get("namespace"), parameters["bucket"], str(flow_run.id))
    finally:
        tasks.cleanup_after_crash(flow, flow_run, state)


@flow(name="export-volume", flow_run_name=export_run_name, on_crashed=[cleanup_after_crash],
      on_cancellation=[cleanup_after_crash])
def export_volume(
    bucket: str,
    volume_id: str | None = None,
    volume_group_id: str | None = None,
    format: str = "qcow2",
    compress: bool = False,
    object_name: str | None = None,
    prefix: str = "",
    namespace: str | None = None,
    overwrite: bool = False,
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
) -> dict[str, Any]:
    """Export a volume (``volume_id``: a block or boot volume) or a machine (``volume_group_id``)
    to image objects in ``bucket``: ``format`` qcow2 (``compress``), vmdk (streamOptimized), vhdx,
    vhd (fixed) or raw. One volume goes to ``object_name`` (default ``<prefix><volume name>.<format>``);
    a group's go to ``<prefix><group name>-disk<N>.<format>`` with ``<prefix><group name>.machine.json``.
    """
    with refusal_reported(volume_id or volume_group_id or "export"):
        settings, run = open_run(credentials_block, worker_block, settings_block)
        exporter = Exporter(run)
        job = plan_export(exporter, bucket=bucket, namespace=namespace, format=format, compress=compress,
                          volume_id=volume_id, volume_group_id=volume_group_id, object_name=object_name,
                          prefix=prefix)

        def attempt() -> dict[str, Any]:
            done = finished_objects(exporter, job, overwrite)
            exported: list[ExportedImage] = []
            if job.missing(done):
                with import_slot(settings.worker_concurrency_limit):
                    exported = export_missing(exporter, job, job.missing(done))
            summary = exporter.summary(job, exported, done, write_manifest(exporter, job))
            publish_export_summary(summary)
            return summary.as_dict()
        return until_not_yielding(attempt, settings.worker_lost_retries)


def export_missing(exporter: Exporter, job: ExportJob, positions: list[int]) -> list[ExportedImage]:
    """The objects at ``positions`` written and checked from one worker VM."""
    run = exporter.run
    with run:
        remove_stale_workers(run, job.subject)
        remove_stale_uploads(exporter, job)
        worker = launch_worker(run, job.subject, job.availability_domain)
        with run.session(worker) as session:
            prepare_worker(run, session)
            futures = [export_disk.submit(exporter, session, worker, job, position) for position in positions]
            exported = [future.result() for future in futures]
        terminate_worker(run, worker)
    return exported
