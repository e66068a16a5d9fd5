"""Flow ``import-virtual-disk``: one uploaded image becomes one checked block volume.

Orchestration only: which step, in what order, with what retries. Each task is a thin
wrapper over a step of :class:`diskimport.importer.Importer` (on its
:class:`~diskimport.run.Run`), which does the work, logs what it decided, keeps the ledger of
undos and unwinds it when the import fails. What a killed run leaves is tagged and found by
the crash hook or by ``sweep-orphans``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK
from diskimport.contract import ImportOptions, parse_options
from diskimport.guest.filesystems import FilesystemCheck
from diskimport.importer import Importer, PreviousImports
from diskimport.records import FinishedVolume, InspectedImage, ObjectVersion, Volume, WorkerVM
from diskimport.summaries import DiskImportSummary
from diskimport.volume_write import VolumeWrite
from flows.reporting import TransferProgress, publish_summary, refusal_reported
from flows.runs import import_slot
from flows.tasks import (cleanup_after_crash, open_run, prepare_worker, step_task, terminate_worker,
                         until_not_yielding)


@step_task("read-object-metadata", retries=4, delays=[1, 2, 5, 10])
def read_object(importer: Importer, namespace: str | None, bucket: str, object_name: str,
                etag: str | None) -> ObjectVersion:
    return importer.read_object(namespace, bucket, object_name, etag)


@step_task("inspect-image-header", retries=4, delays=[1, 2, 5, 10])
def inspect_image(importer: Importer, version: ObjectVersion, options: ImportOptions) -> InspectedImage:
    return importer.inspect(version, options)


@step_task("find-previous-import", retries=3, delays=2)
def find_previous_import(importer: Importer, version: ObjectVersion, force: bool,
                         sync: bool = False, delta_base: str | None = None) -> PreviousImports:
    return importer.previous_imports(version, force, sync, delta_base)


@step_task("remove-stale-workers", retries=3, delays=[2, 5, 10])
def remove_stale_workers(importer: Importer, version: ObjectVersion) -> list[str]:
    return importer.remove_stale_workers(version)


@step_task("provision", retries=2, delays=[5, 15])
def provision(importer: Importer, version: ObjectVersion, image: InspectedImage, options: ImportOptions,
              previous: PreviousImports) -> tuple[WorkerVM, Volume]:
    return importer.provision(version, image, options, previous)


@step_task("write-image", retries=2, delays=[5, 15])
def write_image(write: VolumeWrite) -> Any:
    return write.write(TransferProgress(write.version.name, write.version.size))


@step_task("check-volume", retries=1, delays=5)
def check_volume(write: VolumeWrite) -> list[FilesystemCheck]:
    return write.check()


@step_task("detach-volume", retries=5, delays=[2, 5, 10, 20, 30])
def detach_volume(write: VolumeWrite) -> None:
    write.detach()


@step_task("finish-volume", retries=4, delays=[2, 5, 10, 20])
def finish_volume(importer: Importer, volume: Volume, options: ImportOptions) -> FinishedVolume:
    return importer.finish_volume(volume, options)


def run_name() -> str:
    """``web01.vmdk@8b27ad9b``: the object's base name and ETag, so the runs list tells imports apart."""
    parameters = current_flow_run.parameters
    base = str(parameters.get("object_name", "?")).rsplit("/", 1)[-1][-80:]
    etag = str(parameters.get("etag") or "").strip('"')
    return f"{base}@{etag[:8]}" if etag else base


@flow(name="import-virtual-disk", flow_run_name=run_name, on_crashed=[cleanup_after_crash],
      on_cancellation=[cleanup_after_crash])
def import_virtual_disk(
    bucket: str,
    object_name: str,
    namespace: str | None = None,
    etag: str | None = None,
    ad_number: int | None = None,
    display_name: str | None = None,
    backup_policy: str | None = None,
    vpus: int | None = None,
    force: bool = False,
    sync: bool | None = None,
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
) -> dict[str, Any]:
    """Import one uploaded disk image into a new block volume.

    Parameters win over the object's ``opc-meta-*`` metadata (ad_number, display_name,
    backup_policy, vpus, format, sync). ``etag`` pins the object version to import. A run that
    meets another run importing the same version waits for it and returns its volume. With
    ``sync`` (default: the settings' ``sync_volumes``), a new version of an object imported
    before is written onto that import's volume, only what differs (docs/warm-migration.md).
    """
    with refusal_reported(object_name):
        settings, run = open_run(credentials_block, worker_block, settings_block)
        importer = Importer(run)
        version = read_object(importer, namespace, bucket, object_name, etag)
        parameters = parse_options({"ad_number": ad_number, "display_name": display_name,
                                    "backup_policy": backup_policy, "vpus": vpus, "sync": sync})
        options = importer.options(version, parameters)
        image = inspect_image(importer, version, options)
        syncing = settings.sync_volumes if options.sync is None else options.sync
        if image.delta_base is not None and options.sync is None:
            syncing = True  # a delta upload is a sync by nature (docs/warm-migration.md)

        def attempt() -> dict[str, Any]:
            previous = find_previous_import(importer, version, force, syncing, image.delta_base)
            if previous.imported is not None:
                return importer.reused_summary(version, previous.imported).as_dict()
            with import_slot(settings.worker_concurrency_limit):
                summary = _import(importer, version, image, options, previous)
            publish_summary(summary)
            return summary.as_dict()
        return until_not_yielding(attempt, settings.worker_lost_retries)


def _import(importer: Importer, version: ObjectVersion, image: InspectedImage, options: ImportOptions,
            previous: PreviousImports) -> DiskImportSummary:
    """Provision, write, check, hand over; on any failure the run unwinds what it made."""
    run = importer.run
    with run:
        remove_stale_workers(importer, version)
        worker, volume = provision(importer, version, image, options, previous)
        with run.session(worker) as session:
            qemu_img = prepare_worker(run, session)
            write = importer.volume_write(session, worker, volume, version, image)
            written = write_image(write)
            checks = check_volume(write)
            detach_volume(write)
        finished = finish_volume(importer, volume, options)
        ready_at = dt.datetime.now(dt.timezone.utc)
        terminate_worker(run, worker)
    return importer.summary(version, image, volume, finished, written, checks, qemu_img, ready_at)
