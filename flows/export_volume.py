"""Flow ``export-volume``: a block or boot volume, or a machine's volume group, to image objects.

The steps are :class:`diskimport.export.Exporter`'s: the volumes are resolved and the objects
named before anything is created (a source that is attached, missing or too large for the
format, and an object name taken by something else, are refused by name); one worker VM
reads every volume once, read-only, and uploads each image as a parallel multipart upload;
each object is committed, inspected again and its SHA-256 written beside it. Objects this
export already wrote are not written again, so a retried or repeated run finishes what is
missing. A failed run leaves no upload part, no half object, no PAR and no worker VM.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK, OCICredentials
from diskimport.export import ExportedImage, Exporter, ExportJob, remove_run_uploads
from diskimport.records import WorkerVM
from flows.import_disk import _step, prepare_worker, remove_stale_workers, run_importer, terminate_worker, \
    until_not_yielding
from flows.import_disk import cleanup_after_crash as _sweep_after_crash
from flows.reporting import _cell, _size, refusal_reported
from flows.runs import worker_slot


@_step("plan-export", retries=4, delays=[1, 2, 5, 10])
def plan_export(exporter: Exporter, **kwargs: Any) -> ExportJob:
    return exporter.plan(**kwargs)


@_step("find-finished-objects", retries=3, delays=[2, 5, 10])
def finished_objects(exporter: Exporter, job: ExportJob, overwrite: bool) -> dict[int, str]:
    return exporter.finished_objects(job, overwrite)


@_step("remove-stale-uploads", retries=3, delays=[2, 5, 10])
def remove_stale_uploads(exporter: Exporter, job: ExportJob) -> list[str]:
    return exporter.remove_stale_uploads(job)


@_step("launch-worker", retries=2, delays=[5, 15])
def launch_worker(exporter: Exporter, job: ExportJob) -> WorkerVM:
    return exporter.launch_worker(job)


@_step("export-disk", retries=2, delays=[5, 15])
def export_disk(exporter: Exporter, session: Any, worker: WorkerVM, job: ExportJob, position: int) -> ExportedImage:
    progress = UploadProgress(job.objects[position], job.sources[position].size_bytes)
    exported = exporter.export_volume(session, worker, job, position, progress.event)
    progress.done()
    return exported


@_step("write-manifest", retries=3, delays=[2, 5, 10])
def write_manifest(exporter: Exporter, job: ExportJob) -> str | None:
    return exporter.write_manifest(job)


class UploadProgress:
    """A progress artifact per exported disk: the share of its image uploaded."""

    def __init__(self, name: str, size: int) -> None:
        self.logger = get_run_logger()
        self.name, self.total, self.shown = name, 0, 0.0
        self.artifact = create_progress_artifact(0.0, description=f"Uploading {name}")

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            self.total = int(event.get("size") or 0)
        elif kind == "part" and self.total:
            percent = round(100.0 * int(event.get("uploaded", 0)) / self.total, 1)
            if percent - self.shown >= 5:
                self._show(percent)
        elif kind == "final":
            self.total = int(event.get("size") or 0)
            self.logger.info("%s is final: %s bytes in %s parts; %s part(s) qemu-img changed after they were sent "
                             "went again", self.name, event.get("size"), event.get("parts"), event.get("resent"))
        elif kind == "retry":
            self.logger.warning("retrying part %s of %s: %s", event.get("part"), self.name, event.get("error"))

    def _show(self, percent: float) -> None:
        self.shown = percent
        try:
            update_progress_artifact(self.artifact, percent)
        except Exception as exc:  # progress reporting must never break the export
            self.logger.debug("progress not reported: %s", exc)

    def done(self) -> None:
        self._show(100.0)


def export_run_name() -> str:
    """``export web-01 -> qcow2``: what is exported, as what."""
    parameters = current_flow_run.parameters
    source = str(parameters.get("volume_id") or parameters.get("volume_group_id") or "?")
    return f"export {source[-12:]} -> {parameters.get('format', 'qcow2')}"


def cleanup_after_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """on_crashed / on_cancellation: the import's hook (the worker VM, a retry after a crash), and
    the multipart uploads the run left on its objects aborted (found by the run's write PARs, so
    no other run's upload in the bucket is touched), so no part outlives it."""
    parameters = flow_run.parameters
    try:
        clients = OCICredentials.load(parameters.get("credentials_block", DEFAULT_BLOCK)).clients()
        namespace = parameters.get("namespace") or clients.object_storage.get_namespace().data
        remove_run_uploads(clients, namespace, parameters["bucket"], str(flow_run.id))
    finally:
        _sweep_after_crash(flow, flow_run, state)


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
        settings, importer = run_importer(credentials_block, worker_block, settings_block)
        exporter = Exporter(importer)
        job = plan_export(exporter, bucket=bucket, namespace=namespace, format=format, compress=compress,
                          volume_id=volume_id, volume_group_id=volume_group_id, object_name=object_name,
                          prefix=prefix)

        def attempt() -> dict[str, Any]:
            done = finished_objects(exporter, job, overwrite)
            todo = [p for p in range(len(job.objects)) if p not in done]
            exported: list[ExportedImage] = []
            ready_at = dt.datetime.now(dt.timezone.utc)
            if todo:
                with worker_slot(settings.worker_concurrency_limit):
                    exported, ready_at = _export(exporter, job, todo)
            else:
                get_run_logger().info("every object of this export is written already")
            manifest = write_manifest(exporter, job)
            summary = exporter.summary(job, exported, done, manifest)
            summary["ready_at"] = ready_at.isoformat()
            publish_export_summary(summary)
            return summary
        return until_not_yielding(attempt, settings.worker_lost_retries)


def _export(exporter: Exporter, job: ExportJob, todo: list[int]) -> tuple[list[ExportedImage], dt.datetime]:
    """The objects written and checked from one worker VM; and when they were all ready."""
    importer = exporter.core
    with importer:
        remove_stale_workers(importer, job)
        remove_stale_uploads(exporter, job)
        worker = launch_worker(exporter, job)
        with importer.session(worker) as session:
            prepare_worker(importer, session)
            futures = [export_disk.submit(exporter, session, worker, job, position) for position in todo]
            exported = [future.result() for future in futures]
        ready_at = dt.datetime.now(dt.timezone.utc)
        terminate_worker(importer, worker)
    return exported, ready_at


def publish_export_summary(summary: dict[str, Any]) -> None:
    what = f"machine `{summary['machine']}`" if summary["machine"] else f"`{summary['disks'][0]['volume_id']}`"
    lines = [f"# Exported {what} as {summary['format']}" + (" (compressed)" if summary["compressed"] else ""), "",
             "| volume | object | size | sha256 | seconds |", "|---|---|---|---|---|"]
    for disk in summary["disks"]:
        size = _size(disk["object_bytes"]) if "object_bytes" in disk else "already written"
        seconds = ", ".join(f"{k} {v:.1f}" for k, v in disk.get("seconds", {}).items())
        lines.append(f"| `{disk['volume_id']}` | `{_cell(disk['object'])}` | {size} | `{disk.get('sha256', '-')}` "
                     f"| {seconds or '-'} |")
    if summary["manifest"]:
        lines += ["", f"Machine manifest: `{summary['manifest']}` (re-import it with `import-machine`)."]
    create_markdown_artifact("\n".join(lines), key="export-summary", description="Export summary")
