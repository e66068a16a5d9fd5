"""Flow ``import-virtual-disk``: one uploaded image becomes one checked block volume.

Orchestration only: which step, in what order, with what retries. Each task is a thin
wrapper over a step of :class:`diskimport.importer.Importer`, which does the work, keeps
the ledger of undos and unwinds it when the import fails. What a killed run leaves is
tagged and found by the crash hook or by ``sweep-orphans``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable, TypeVar

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run

from blocks import DEFAULT_BLOCK, ImportSettings, OCICredentials, WorkerShape
from diskimport.contract import ImportOptions, parse_options
from diskimport.errors import is_deterministic, is_worker_lost
from diskimport.filesystems import FilesystemCheck
from diskimport.importer import CompetingImport, Importer, PreviousImports, VolumeWrite
from diskimport.records import FinishedVolume, InspectedImage, ObjectVersion, Volume, WorkerVM
from diskimport.worker import WorkerSession
from flows.reporting import TransferProgress, publish_summary, refusal_reported
from flows.runs import retry_after_crash, run_is_active, worker_slot
from flows.sweep import sweep_run


T = TypeVar("T")


def _retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a refusal (bad image, bad input) fails the same way every
    time, and a run that yields to a competing one must look for its volume, not make another."""
    try:
        state.result()
    except CompetingImport:
        return False
    except Exception as exc:
        return not is_deterministic(exc)
    return False


def _step(name: str, retries: int = 0, delays: list[int] | int = 0) -> Any:
    return task(name=name, retries=retries, retry_delay_seconds=delays, cache_policy=NO_CACHE,
                retry_condition_fn=_retry_unless_deterministic)


@_step("read-object-metadata", retries=4, delays=[1, 2, 5, 10])
def read_object(importer: Importer, namespace: str | None, bucket: str, object_name: str,
                etag: str | None) -> ObjectVersion:
    return importer.read_object(namespace, bucket, object_name, etag)


@_step("inspect-image-header", retries=4, delays=[1, 2, 5, 10])
def inspect_image(importer: Importer, version: ObjectVersion, options: ImportOptions) -> InspectedImage:
    return importer.inspect(version, options)


@_step("find-previous-import", retries=3, delays=2)
def find_previous_import(importer: Importer, version: ObjectVersion, force: bool) -> PreviousImports:
    return importer.previous_imports(version, force)


@_step("remove-stale-workers", retries=3, delays=[2, 5, 10])
def remove_stale_workers(importer: Importer, version: ObjectVersion) -> list[str]:
    return importer.remove_stale_workers(version)


@_step("provision", retries=2, delays=[5, 15])
def provision(importer: Importer, version: ObjectVersion, image: InspectedImage, options: ImportOptions,
              previous: PreviousImports) -> tuple[WorkerVM, Volume]:
    return importer.provision(version, image, options, previous)


@_step("prepare-worker", retries=2, delays=5)
def prepare_worker(importer: Importer, session: WorkerSession) -> str:
    return importer.prepare_worker(session)


@_step("write-image", retries=2, delays=[5, 15])
def write_image(write: VolumeWrite) -> Any:
    return write.write(TransferProgress(write.version.name, write.version.size))


@_step("check-volume", retries=1, delays=5)
def check_volume(write: VolumeWrite) -> list[FilesystemCheck]:
    return write.check()


@_step("detach-volume", retries=5, delays=[2, 5, 10, 20, 30])
def detach_volume(write: VolumeWrite) -> None:
    write.detach()


@_step("finish-volume", retries=4, delays=[2, 5, 10, 20])
def finish_volume(importer: Importer, volume: Volume, options: ImportOptions) -> FinishedVolume:
    return importer.finish_volume(volume, options)


@_step("terminate-worker", retries=5, delays=[2, 5, 10, 20, 30])
def terminate_worker(importer: Importer, worker: WorkerVM) -> None:
    importer.terminate_worker(worker)


def run_name() -> str:
    """``web01.vmdk@8b27ad9b``: the object's base name and ETag, so the runs list tells imports apart."""
    parameters = current_flow_run.parameters
    base = str(parameters.get("object_name", "?")).rsplit("/", 1)[-1][-80:]
    etag = str(parameters.get("etag") or "").strip('"')
    return f"{base}@{etag[:8]}" if etag else base


def cleanup_after_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """on_crashed / on_cancellation: remove what this run created, then (a crash only) run it again.

    The hook runs in the Prefect worker once the run's process is gone (killed, out of memory):
    its worker VM and unfinished volume are removed first, so the next attempt, which resumes
    from the tasks that finished, never races this cleanup. A run crashes at most
    ``crash_retries`` times before it stays Crashed. (A host that dies takes its Prefect worker
    and this hook with it: such a run stays Running until someone acts; the sweeper removes what
    it left.)
    """
    settings_block = flow_run.parameters.get("settings_block", DEFAULT_BLOCK)
    sweep_run(flow_run.parameters.get("credentials_block", DEFAULT_BLOCK),
              flow_run.parameters.get("worker_block", DEFAULT_BLOCK), settings_block, str(flow_run.id))
    if state.is_crashed():
        retry_after_crash(flow_run.id, ImportSettings.load(settings_block).crash_retries)


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
    credentials_block: str = DEFAULT_BLOCK,
    worker_block: str = DEFAULT_BLOCK,
    settings_block: str = DEFAULT_BLOCK,
) -> dict[str, Any]:
    """Import one uploaded disk image into a new block volume.

    Parameters win over the object's ``opc-meta-*`` metadata (ad_number, display_name,
    backup_policy, vpus, format). ``etag`` pins the object version to import. A run that
    meets another run importing the same version waits for it and returns its volume.
    """
    with refusal_reported(object_name):
        settings, importer = run_importer(credentials_block, worker_block, settings_block)
        version = read_object(importer, namespace, bucket, object_name, etag)
        parameters = parse_options({"ad_number": ad_number, "display_name": display_name,
                                    "backup_policy": backup_policy, "vpus": vpus})
        options = importer.options(version, parameters)
        image = inspect_image(importer, version, options)

        def attempt() -> dict[str, Any]:
            previous = find_previous_import(importer, version, force)
            if previous.imported is not None:
                get_run_logger().info("object version already imported as %s", previous.imported.id)
                return importer.reused_summary(version, previous.imported)
            with worker_slot(settings.worker_concurrency_limit):
                summary = _import(importer, version, image, options, previous)
            publish_summary(summary)
            return summary
        return until_not_yielding(attempt, settings.worker_lost_retries)


def run_importer(credentials_block: str, worker_block: str, settings_block: str) -> tuple[ImportSettings, Importer]:
    """The import settings and an importer for this flow run, from its blocks."""
    settings = ImportSettings.load(settings_block)
    return settings, Importer(OCICredentials.load(credentials_block).clients(), settings,
                              WorkerShape.load(worker_block), run_id=str(current_flow_run.id or "local"),
                              attempt=current_flow_run.run_count or 1, run_is_active=run_is_active,
                              logger=get_run_logger())


def until_not_yielding(attempt: Callable[[], T], worker_lost_retries: int = 0) -> T:
    """``attempt()`` again each time the run yields to a competing run (it then waits for that
    one), and after a lost worker VM (its SSH refused or cut off: a crashed or vanished VM) up
    to ``worker_lost_retries`` times: the failed attempt has removed what it made, so the next
    one starts on a new worker VM."""
    lost = 0
    while True:
        try:
            return attempt()
        except CompetingImport as exc:
            get_run_logger().info("%s; waiting for it", exc)
        except Exception as exc:
            if not is_worker_lost(exc) or lost >= worker_lost_retries:
                raise
            lost += 1
            get_run_logger().warning("the worker VM was lost (%s: %s); the import runs again on a new one "
                                     "(%d of %d)", type(exc).__name__, exc, lost, worker_lost_retries)


def _import(importer: Importer, version: ObjectVersion, image: InspectedImage, options: ImportOptions,
            previous: PreviousImports) -> dict[str, Any]:
    """Provision, write, check, hand over; on any failure the importer unwinds what it made."""
    with importer:
        remove_stale_workers(importer, version)
        worker, volume = provision(importer, version, image, options, previous)
        with importer.session(worker) as session:
            qemu_img = prepare_worker(importer, session)
            write = importer.volume_write(session, worker, volume, version, image)
            written = write_image(write)
            checks = check_volume(write)
            detach_volume(write)
        finished = finish_volume(importer, volume, options)
        ready_at = dt.datetime.now(dt.timezone.utc)
        terminate_worker(importer, worker)
    return importer.summary(version, image, volume, finished, written, checks, qemu_img, ready_at)
