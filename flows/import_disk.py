"""Flow ``import-virtual-disk``: one uploaded image becomes one checked block volume.

Orchestration only: which step, in what order, with what retries. The work itself is
in :mod:`diskimport`. Every resource the run creates carries the import's tags and has
its undo written beside its creation; what a killed run leaves is found by
``sweep-orphans``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import oci
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact
from prefect.cache_policies import INPUTS, NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.runtime import flow_run as current_flow_run

from blocks import ImportSettings, OCICredentials, WorkerShape
from diskimport import cloud, filesystems, inspection, iscsi, metadata, naming, nested, slices, transfer
from diskimport.keys import SshKeyPair, cloud_init_host_keys
from diskimport.qemu_img import QemuImg
from diskimport.worker import WorkerSession
from flows.sweep import run_is_active, sweep_run

WORKER_LIMIT = "oci-disk-import-workers"
DETERMINISTIC = (inspection.ImageRejected, metadata.InvalidRequest, filesystems.FilesystemErrors, ValueError)


def _retry_unless_deterministic(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: a bad image or bad input fails the same way every time."""
    try:
        state.result()
    except DETERMINISTIC:
        return False
    except Exception:
        return True
    return False


def clients_for(credentials: OCICredentials) -> cloud.Clients:
    return cloud.Clients(
        compute=credentials.get_client("compute"), blockstorage=credentials.get_client("blockstorage"),
        network=credentials.get_client("network"), object_storage=credentials.get_client("object_storage"),
    )


@dataclass
class StepTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - start, 3)


# -- steps ---------------------------------------------------------------------------

@task(name="read-object-metadata", retries=4, retry_delay_seconds=[1, 2, 5, 10],
      retry_condition_fn=_retry_unless_deterministic, cache_policy=NO_CACHE)
def read_object_metadata(credentials_block: str, namespace: str | None, bucket: str, object_name: str,
                         etag: str | None) -> dict[str, Any]:
    clients = clients_for(OCICredentials.load(credentials_block))
    ns = namespace or cloud.with_backoff(clients.object_storage.get_namespace).data
    try:
        head = cloud.with_backoff(clients.object_storage.head_object, ns, bucket, object_name)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            raise metadata.InvalidRequest(f"object {object_name!r} not found in bucket {bucket!r} "
                                          f"of namespace {ns!r}") from None
        raise
    version = metadata.object_version(ns, bucket, object_name, head.headers)
    if etag and version.etag != etag:
        raise metadata.InvalidRequest(f"object {object_name!r} changed: its current ETag is {version.etag}, "
                                      f"not {etag} that this import was asked for")
    return asdict(version)


@task(name="inspect-image-header", retries=4, retry_delay_seconds=[1, 2, 5, 10],
      retry_condition_fn=_retry_unless_deterministic, cache_policy=INPUTS, persist_result=True)
def inspect_image_header(credentials_block: str, namespace: str, bucket: str, object_name: str, etag: str,
                         size: int, claimed: str | None, max_virtual_size: int) -> dict[str, Any]:
    clients = clients_for(OCICredentials.load(credentials_block))

    pieces: list[tuple[int, bytes]] = []

    def read_range(start: int, end: int) -> bytes:
        reply = cloud.with_backoff(clients.object_storage.get_object, namespace, bucket, object_name,
                                   range=f"bytes={start}-{end}", if_match=etag)
        pieces.append((start, reply.data.content))
        return pieces[-1][1]

    found = asdict(inspection.inspect(read_range, size, claimed, max_virtual_size))
    # The bytes read here are handed to the worker, so the transfer does not fetch them again.
    return {**found, "pieces": pieces}


@task(name="find-previous-import", retries=3, retry_delay_seconds=2, cache_policy=NO_CACHE)
def find_previous_import(credentials_block: str, compartment_id: str, import_key: str) -> list[dict[str, Any]]:
    clients = clients_for(OCICredentials.load(credentials_block))
    volumes = cloud.find_volumes(clients, compartment_id, {naming.TAG_IMPORT_ID: import_key})
    return [{"id": v.id, "state": (v.freeform_tags or {}).get(naming.TAG_STATE), "ad": v.availability_domain,
             "size_in_gbs": v.size_in_gbs, "display_name": v.display_name,
             "flow_run": (v.freeform_tags or {}).get(naming.TAG_FLOW_RUN)} for v in volumes]


@task(name="create-volume", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_deterministic)
def create_volume(credentials_block: str, compartment_id: str, ad: str, size_gb: int, vpus: int, name: str,
                  tags: dict[str, str]) -> dict[str, Any]:
    clients = clients_for(OCICredentials.load(credentials_block))
    volume = cloud.create_volume(clients, compartment_id, ad, size_gb, vpus, name, tags)
    volume = cloud.wait_volume_available(clients, volume.id)
    return {"id": volume.id, "ad": volume.availability_domain, "size_in_gbs": volume.size_in_gbs}


@task(name="launch-worker", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE)
def launch_worker(credentials_block: str, shape_block: str, ad: str, ssh_public_key: str, user_data: str,
                  tags: dict[str, str], name: str) -> dict[str, Any]:
    credentials, shape = OCICredentials.load(credentials_block), WorkerShape.load(shape_block)
    clients = clients_for(credentials)
    instance = cloud.launch_worker(
        clients, compartment_id=shape.compartment_id, availability_domain=ad, subnet_id=shape.subnet_id,
        image_id=shape.image_id, shape=shape.shape, ocpus=shape.ocpus, memory_in_gbs=shape.memory_in_gbs,
        boot_volume_size_gb=shape.boot_volume_size_gb, assign_public_ip=shape.assign_public_ip, display_name=name,
        ssh_public_key=ssh_public_key, user_data=user_data, tags=tags)
    try:
        cloud.wait_instance_running(clients, instance.id)
        address = cloud.worker_address(clients, shape.compartment_id, instance.id, shape.assign_public_ip)
    except Exception:
        cloud.terminate_worker(clients, instance.id, wait=False)
        raise
    return {"id": instance.id, "address": address}


@task(name="terminate-worker", retries=5, retry_delay_seconds=[2, 5, 10, 20, 30], cache_policy=NO_CACHE)
def terminate_worker(credentials_block: str, instance_id: str) -> None:
    cloud.terminate_worker(clients_for(OCICredentials.load(credentials_block)), instance_id)


@task(name="attach-volume", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def attach_volume(credentials_block: str, instance_id: str, volume_id: str, kind: str) -> dict[str, Any]:
    attachment = cloud.attach_volume(clients_for(OCICredentials.load(credentials_block)), instance_id, volume_id,
                                     kind)
    details = {"id": attachment.id, "device": attachment.device, "type": attachment.attachment_type}
    if attachment.attachment_type == "iscsi":
        details.update(iqn=attachment.iqn, ipv4=attachment.ipv4, port=attachment.port)
    return details


@task(name="iscsi-login", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def iscsi_login(session: WorkerSession, attachment: dict[str, Any]) -> str:
    return iscsi.login(session, iscsi.IscsiTarget(attachment["iqn"], attachment["ipv4"], attachment["port"]))


@task(name="iscsi-logout", retries=3, retry_delay_seconds=5, cache_policy=NO_CACHE)
def iscsi_logout(session: WorkerSession, attachment: dict[str, Any]) -> None:
    iscsi.logout(session, iscsi.IscsiTarget(attachment["iqn"], attachment["ipv4"], attachment["port"]))


@task(name="detach-volume", retries=5, retry_delay_seconds=[2, 5, 10, 20, 30], cache_policy=NO_CACHE)
def detach_volume(credentials_block: str, attachment_id: str) -> None:
    cloud.detach_volume(clients_for(OCICredentials.load(credentials_block)), attachment_id)


@task(name="prepare-worker", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def prepare_worker(session: WorkerSession, timeout: float) -> str:
    session.connect(timeout=timeout)
    return transfer.ensure_tools(session)


@task(name="write-image", retries=2, retry_delay_seconds=[5, 15], cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_deterministic)
def write_image(session: WorkerSession, credentials_block: str, version: dict[str, Any], image: dict[str, Any],
                attach: Callable[[], str], import_key: str, target_is_zero: bool,
                settings: transfer.TransferSettings) -> dict[str, Any]:
    """Stream the object onto the worker while qemu-img writes it to the volume, and verify it.

    The worker fetches the object through a short-lived read-only PAR with parallel ranged
    GETs (minus the head and tail inspected before, which are handed over); qemu-img reads
    it over NBD as it arrives. ``attach`` attaches the volume (and returns its device)
    while the first bytes arrive. The disk is written slice by slice, and each slice is
    compared with the worker's copy of the image while the next one is written
    (:mod:`diskimport.slices`), so nothing is read twice from Object Storage and the
    verification is done soon after the last byte arrives. The copy (``staging`` in the
    result) is removed here if the step fails, else by the caller while the checks run.
    """
    logger = get_run_logger()
    clients = clients_for(OCICredentials.load(credentials_block))
    qemu = QemuImg(session)
    fmt, size = image["format"], version["size"]
    staging = transfer.make_staging_dir(session, import_key, size)
    par_id, access_uri = cloud.read_only_par(clients, version["namespace"], version["bucket"], version["name"],
                                             dt.timedelta(hours=2), f"oci-disk-import-{import_key}")
    stream: transfer.ObjectStream | None = None
    phases = StepTimer()
    kept = False
    try:
        url = clients.object_storage.base_client.endpoint.rstrip("/") + access_uri
        progress = _TransferProgress(version["name"], size)
        with phases.step("start-transfer"):
            stream = transfer.start_stream(session, session, url, version["etag"], size, staging, image["pieces"],
                                           settings, on_event=progress.event)
        with phases.step("second-opinion"):
            info = transfer.second_opinion(qemu, stream.nbd_url, fmt, image["virtual_size"])
        with phases.step("attach"):
            device = attach()
        writer = slices.SliceWriter(session, qemu, fmt, info.virtual_size, stream.socket, stream.path, device,
                                    target_is_zero=target_is_zero, on_progress=progress.written,
                                    direct_io=not slices.compressed_grains(fmt, info), image_bytes=size)
        with phases.step("write-and-verify"):
            fetched = writer.write(stream.finish)
        stream = None
        cloud.delete_par(clients, version["namespace"], version["bucket"], par_id)
        par_id = None
        progress.done()
        verified = writer.summary()
        logger.info("wrote and verified %s (%s, %d bytes virtual, %d slices); fetched %d bytes in %.1fs with %d "
                    "retries", version["name"], fmt, info.virtual_size, verified["slices"], fetched["fetched_bytes"],
                    fetched["seconds"], fetched["retries"])
        kept = True
        return {"virtual_size": info.virtual_size, "image_bytes": size, "phases": phases.seconds,
                "device": device, "staging": staging, **verified, **fetched}
    finally:
        if stream is not None:
            stream.abort()
        if par_id is not None:
            cloud.delete_par(clients, version["namespace"], version["bucket"], par_id)
        if not kept:
            transfer.remove_staging(session, staging)


@task(name="check-not-nested", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_deterministic)
def check_not_nested(session: WorkerSession, device: str, virtual_size: int) -> None:
    """The volume must be a disk, not another image format written out raw (a nested image)."""
    nested.check_not_nested(session, device, virtual_size)


class _TransferProgress:
    """One progress artifact for the run's long step: bytes arriving and bytes written."""

    def __init__(self, name: str, size: int) -> None:
        self.logger = get_run_logger()  # events arrive on the transfer's thread, outside the run context
        self.size = max(size, 1)
        self.fetched = 0
        self.percent_written = 0.0
        self.shown = 0.0
        self.artifact = create_progress_artifact(0.0, description=f"Transferring {name} and writing it onto "
                                                                  "the volume")

    def _update(self, force: bool = False) -> None:
        percent = round(min(100.0 * self.fetched / self.size, self.percent_written), 1)
        if force or percent - self.shown >= 5:
            self.shown = percent
            try:
                update_progress_artifact(self.artifact, percent)
            except Exception as exc:  # progress reporting must never break the transfer
                self.logger.debug("progress not reported: %s", exc)

    def event(self, event: dict[str, Any]) -> None:
        if event.get("event") in ("progress", "fetched"):
            self.fetched = int(event.get("fetched", 0))
            self._update()
        elif event.get("event") == "retry":
            self.logger.warning("retrying bytes %s-%s of the object: %s", event.get("start"),
                                     event.get("end"), event.get("error"))

    def written(self, percent: float) -> None:
        self.percent_written = percent
        self._update()

    def done(self) -> None:
        self.fetched, self.percent_written = self.size, 100.0
        self._update(force=True)


@task(name="check-filesystems", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE,
      retry_condition_fn=_retry_unless_deterministic)
def check_filesystems(session: WorkerSession, device: str, virtual_size: int) -> list[dict[str, Any]]:
    results = filesystems.check_device(session, device, virtual_size)
    failed = [r for r in results if r.failed]
    if failed:
        detail = "\n".join(f"partition {r.partition} ({r.filesystem}): {r.detail}" for r in failed)
        raise filesystems.FilesystemErrors(f"filesystem check failed:\n{detail}")
    return [asdict(r) for r in results]


@task(name="finish-volume", retries=4, retry_delay_seconds=[2, 5, 10, 20], cache_policy=NO_CACHE)
def finish_volume(credentials_block: str, volume_id: str, vpus_after: int, backup_policy: str | None,
                  tags: dict[str, str]) -> dict[str, Any]:
    clients = clients_for(OCICredentials.load(credentials_block))
    volume = cloud.set_volume_performance(clients, volume_id, vpus_after)
    policy_id = None
    if backup_policy:
        policy_id = cloud.backup_policy_id(clients, backup_policy)
        cloud.assign_backup_policy(clients, volume_id, policy_id)
    cloud.with_backoff(clients.blockstorage.update_volume, volume_id,
                       oci.core.models.UpdateVolumeDetails(freeform_tags={**(volume.freeform_tags or {}), **tags}))
    return {"vpus_per_gb": vpus_after, "backup_policy_id": policy_id}


@task(name="discard-volume", retries=5, retry_delay_seconds=[2, 5, 10, 20, 30], cache_policy=NO_CACHE)
def discard_volume(credentials_block: str, compartment_id: str, volume_id: str, keep: bool) -> str:
    """Undo of create-volume: detach it everywhere, then delete it (or keep it tagged failed)."""
    clients = clients_for(OCICredentials.load(credentials_block))
    for attachment in cloud.live_attachments(clients, compartment_id, volume_id):
        cloud.detach_volume(clients, attachment.id)
    if keep:
        volume = cloud.with_backoff(clients.blockstorage.get_volume, volume_id).data
        tags = {**(volume.freeform_tags or {}), naming.TAG_STATE: naming.STATE_FAILED}
        cloud.with_backoff(clients.blockstorage.update_volume, volume_id,
                           oci.core.models.UpdateVolumeDetails(freeform_tags=tags))
        return "kept"
    cloud.delete_volume(clients, volume_id)
    return "deleted"


# -- the flow ----------------------------------------------------------------------------

def _refuse_if_another_run_is_importing(previous: list[dict[str, Any]], flow_run_id: str) -> None:
    """Two runs writing the same object version would fight over one volume: the later one stops."""
    for volume in previous:
        owner = volume.get("flow_run")
        if volume["state"] == naming.STATE_WRITING and owner and owner != flow_run_id and run_is_active(owner):
            raise metadata.InvalidRequest(f"flow run {owner} is importing this object version right now "
                                          f"(volume {volume['id']}); this run stops instead of competing with it")


def _availability_domains(credentials: OCICredentials, shape: WorkerShape, ad_number: int | None) -> list[str]:
    identity = credentials.get_client("identity")
    names = [ad.name for ad in cloud.with_backoff(identity.list_availability_domains, shape.compartment_id).data]
    if ad_number is not None:
        if ad_number > len(names):
            raise metadata.InvalidRequest(f"ad_number {ad_number} is out of range: the region has {len(names)} "
                                          "availability domains")
        return [names[ad_number - 1]]
    preferred = [ad for ad in shape.availability_domains if ad in names]
    return preferred or names


def _ensure_worker_limit(limit: int) -> None:
    """Create or resize the global concurrency limit that bounds running worker VMs."""
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(WORKER_LIMIT, limit)
        except ObjectAlreadyExists:  # a concurrent run created it between our read and create
            client.upsert_global_concurrency_limit_by_name(WORKER_LIMIT, limit)


def cleanup_after_crash(flow: Any, flow_run: Any, state: Any) -> None:
    """on_crashed / on_cancellation: remove what this run created (the sweeper covers SIGKILL)."""
    sweep_run(flow_run.parameters.get("credentials_block", "local-oci"),
              flow_run.parameters.get("worker_block", "local-worker"),
              flow_run.parameters.get("settings_block", "local-import"), str(flow_run.id))


@flow(name="import-virtual-disk", on_crashed=[cleanup_after_crash], on_cancellation=[cleanup_after_crash])
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
    credentials_block: str = "local-oci",
    worker_block: str = "local-worker",
    settings_block: str = "local-import",
) -> dict[str, Any]:
    """Import one uploaded disk image into a new block volume.

    Parameters win over the object's ``opc-meta-*`` metadata (ad_number, display_name,
    backup_policy, vpus, format). ``etag`` pins the object version to import.
    """
    logger = get_run_logger()
    timer = StepTimer()
    flow_run_id = str(current_flow_run.id or "local")
    credentials = OCICredentials.load(credentials_block)
    shape = WorkerShape.load(worker_block)
    settings = ImportSettings.load(settings_block)

    with timer.step("read-metadata"):
        version = read_object_metadata(credentials_block, namespace, bucket, object_name, etag)
        options = metadata.merge(
            metadata.parse_options({"ad_number": ad_number, "display_name": display_name,
                                    "backup_policy": backup_policy, "vpus": vpus}),
            metadata.parse_options(version["metadata"]))
    import_key = naming.import_id(version["namespace"], bucket, object_name, version["etag"])
    with timer.step("inspect-header"):
        claimed = inspection.claimed_format(object_name, options.format)
        image = inspect_image_header(credentials_block, version["namespace"], bucket, object_name, version["etag"],
                                     version["size"], claimed, settings.max_virtual_size_bytes)
    logger.info("%s is %s, %d bytes virtual", object_name, image["format"], image["virtual_size"])

    previous = find_previous_import(credentials_block, settings.compartment_id, import_key)
    _refuse_if_another_run_is_importing(previous, flow_run_id)
    done = [v for v in previous if v["state"] == naming.STATE_IMPORTED]
    if done and not force:
        logger.info("object version already imported as %s; nothing to do", done[0]["id"])
        return {"volume_id": done[0]["id"], "reused": True, "import_id": import_key}

    ads = _availability_domains(credentials, shape, options.ad_number)
    tags = naming.import_tags(import_key, object_name, version["etag"], flow_run_id, settings.extra_tags)
    size_gb = cloud.volume_size_gb(image["virtual_size"])
    name = options.display_name or naming.volume_display_name(settings.volume_name_template, object_name,
                                                              version["etag"])
    resumable = [v for v in previous if v["state"] == naming.STATE_WRITING and v["size_in_gbs"] >= size_gb
                 and (v["flow_run"] == flow_run_id or not run_is_active(v["flow_run"] or ""))] if not force else []
    client_key, host_key = SshKeyPair.generate(), SshKeyPair.generate()
    clients = clients_for(credentials)

    _ensure_worker_limit(settings.worker_concurrency_limit)
    with concurrency(WORKER_LIMIT, occupy=1, strict=True, timeout_seconds=None):
        # A worker that an earlier, killed attempt (or a dead run) left behind cannot be reached
        # (its keys died with that process): terminate it before starting over.
        for stale in cloud.find_instances(clients, shape.compartment_id, {naming.TAG_IMPORT_ID: import_key}):
            owner = (stale.freeform_tags or {}).get(naming.TAG_FLOW_RUN)
            if owner == flow_run_id or not run_is_active(owner or ""):
                terminate_worker(credentials_block, stale.id)

        volume: dict[str, Any] | None = None
        worker: dict[str, Any] | None = None
        attachment: dict[str, Any] | None = None
        succeeded = False
        try:
            with timer.step("provision"):
                worker, volume = _provision(credentials_block, worker_block, settings, ads, resumable, size_gb,
                                            name, tags, client_key, host_key)
            session = WorkerSession(worker["address"], shape.ssh_port, shape.ssh_user, client_key, host_key,
                                    sudo=shape.use_sudo)
            with session:
                with timer.step("prepare-worker"):
                    qemu_version = prepare_worker(session, shape.boot_timeout_seconds)
                attached: dict[str, Any] = {}

                def attach() -> str:
                    attached.update(attach_volume(credentials_block, worker["id"], volume["id"],
                                                  shape.attachment_type))
                    return iscsi_login(session, attached) if attached["type"] == "iscsi" else attached["device"]

                try:
                    with timer.step("write"):
                        written = write_image(session, credentials_block, version, image, attach, import_key,
                                              target_is_zero=volume["fresh"],
                                              settings=transfer.TransferSettings(
                                                  connections=settings.transfer_connections,
                                                  chunk_bytes=settings.transfer_chunk_mib * 1024 * 1024))
                finally:
                    attachment = attached or None
                with timer.step("check-volume"):
                    # Both checks only read the device and run side by side; the verified copy goes meanwhile.
                    not_nested = check_not_nested.submit(session, written["device"], written["virtual_size"])
                    checked = check_filesystems.submit(session, written["device"], image["virtual_size"])
                    try:
                        transfer.remove_staging(session, written["staging"])
                    finally:
                        checks = checked.result()
                        not_nested.result()
                if attachment["type"] == "iscsi":
                    iscsi_logout(session, attachment)
            with timer.step("detach"):
                detach_volume(credentials_block, attachment["id"])
                attachment = None
            with timer.step("finish-volume"):
                finished = finish_volume(credentials_block, volume["id"],
                                         options.vpus if options.vpus is not None else settings.vpus_after_import,
                                         options.backup_policy or settings.backup_policy,
                                         {naming.TAG_STATE: naming.STATE_IMPORTED})
            ready_at = dt.datetime.now(dt.timezone.utc)
            with timer.step("terminate-worker"):
                terminate_worker(credentials_block, worker["id"])
                worker = None
            succeeded = True
        finally:
            if worker is not None:
                terminate_worker(credentials_block, worker["id"])
            if not succeeded and volume is not None:
                outcome = discard_volume(credentials_block, settings.compartment_id, volume["id"],
                                         settings.keep_failed_volume)
                logger.warning("import failed; volume %s %s", volume["id"], outcome)

    summary = {
        "import_id": import_key, "object": object_name, "bucket": bucket, "namespace": version["namespace"],
        "etag": version["etag"], "format": image["format"], "virtual_size": image["virtual_size"],
        "object_bytes": version["size"], "volume_id": volume["id"], "volume_size_gb": volume["size_in_gbs"],
        "availability_domain": volume["ad"], "vpus_per_gb": finished["vpus_per_gb"],
        "backup_policy_id": finished["backup_policy_id"], "qemu_img": qemu_version,
        "bytes_written": written["virtual_size"], "fetched_bytes": written["fetched_bytes"],
        "transfer_seconds": written["seconds"], "write_phases": written["phases"],
        "verified_bytes": written["verified_bytes"], "write_slices": written["slices"],
        "ready_at": ready_at.isoformat(), "transfer_retries": written["retries"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "steps": timer.seconds, "filesystems": checks, "reused": False,
    }
    _publish(summary)
    return summary


def _provision(credentials_block: str, worker_block: str, settings: ImportSettings, ads: list[str],
               resumable: list[dict[str, Any]], size_gb: int, name: str, tags: dict[str, str],
               client_key: SshKeyPair, host_key: SshKeyPair) -> tuple[dict[str, Any], dict[str, Any]]:
    """Create (or reuse) the volume while the worker boots; move to the next AD when one is full."""
    logger = get_run_logger()
    user_data = cloud_init_host_keys(host_key)
    worker_tags = dict(tags)
    volume_tags = {**tags, naming.TAG_STATE: naming.STATE_WRITING}
    last_error: Exception | None = None
    candidates = [v["ad"] for v in resumable] + [ad for ad in ads if ad not in {v["ad"] for v in resumable}]
    for ad in candidates:
        reuse = next((v for v in resumable if v["ad"] == ad), None)
        launch = launch_worker.submit(credentials_block, worker_block, ad, client_key.public_openssh, user_data,
                                      worker_tags, f"import-worker-{tags[naming.TAG_IMPORT_ID][:12]}")
        created = None if reuse else create_volume.submit(credentials_block, settings.compartment_id, ad, size_gb,
                                                          settings.vpus_during_import, name, volume_tags)
        try:
            worker = launch.result()
        except cloud.OutOfCapacity as exc:
            logger.warning("%s is out of capacity for the worker shape; trying the next availability domain", ad)
            last_error = exc
            if created is not None:
                _discard_quietly(credentials_block, settings.compartment_id, created)
            continue
        except BaseException:
            if created is not None:
                _discard_quietly(credentials_block, settings.compartment_id, created)
            raise
        try:
            volume = dict(reuse, fresh=False) if reuse else dict(created.result(), fresh=True)
        except BaseException:
            terminate_worker(credentials_block, worker["id"])
            raise
        return worker, volume
    raise cloud.OutOfCapacity(f"no availability domain had capacity for the worker ({', '.join(ads)}): {last_error}")


def _discard_quietly(credentials_block: str, compartment_id: str, created: Any) -> None:
    try:
        volume = created.result()
    except Exception:
        return
    discard_volume(credentials_block, compartment_id, volume["id"], keep=False)


def _publish(summary: dict[str, Any]) -> None:
    rows = [{"step": step, "seconds": seconds} for step, seconds in summary["steps"].items()]
    checks = summary["filesystems"]
    create_table_artifact(rows, key="import-steps", description=f"Time per step of {summary['object']}")
    lines = [
        f"# Imported `{summary['object']}`",
        "",
        "| | |", "|---|---|",
        f"| object | `{summary['namespace']}/{summary['bucket']}/{summary['object']}` @ `{summary['etag']}` |",
        f"| format | {summary['format']} |",
        f"| virtual size | {summary['virtual_size']:,} bytes |",
        f"| volume | `{summary['volume_id']}` ({summary['volume_size_gb']} GB, {summary['availability_domain']}, "
        f"{summary['vpus_per_gb']} VPUs/GB) |",
        f"| bytes written | {summary['bytes_written']:,} |",
        f"| total time | {sum(summary['steps'].values()):.1f} s |",
        "",
        "## Filesystems",
        "",
        "| partition | filesystem | result | detail |", "|---|---|---|---|",
        *[f"| {c['partition']} | {c['filesystem'] or '-'} | {c['status']} | "
          f"{(c['detail'].splitlines() or [''])[-1][:120]} |" for c in checks],
    ]
    create_markdown_artifact("\n".join(lines), key="import-summary", description="Import summary")
