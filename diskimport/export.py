"""Exports: a block or boot volume, or every volume of a volume group, to image objects in a bucket.

OCI exports custom images only; no API turns a volume into a file. So, as for imports, a
worker VM does it. For each volume the worker:

1. attaches it **read-only** (the source is never written; a volume attached elsewhere is
   refused, a live disk does not export consistently);
2. reads it once with ``qemu-img convert`` into the image format on its own disk (qcow2,
   optionally compressed; vmdk streamOptimized; vhdx; vhd fixed, as Azure wants it): the
   sparse formats store no zeros, so zeros are neither kept nor uploaded. A raw export is
   the device itself: nothing is staged;
3. uploads that file as the parts of a multipart upload, in parallel, through a write-only
   pre-authenticated request for that one object (:mod:`diskimport.uploader`; no credentials
   on the worker), **while qemu-img writes it**: a part goes once the file has grown
   :data:`HOLD_BACK_BYTES` past it, and a part that qemu-img changed after it went (a qcow2's
   header, L2 tables and refcounts; a vhdx's block table) is sent again once the file is
   final. The final file is hashed (SHA-256) beside the upload.

The orchestrator creates the upload (its metadata says what a re-import needs: ``format``,
``virtual-size``, ``display-name``, the source volume, and for a boot disk its firmware) and
registers its abort before the first part exists; it commits the parts, then inspects the
written object again with the import's own inspection (format, virtual size, every hostile
image check) and records its SHA-256 beside it (``<object>.sha256``, ``sha256sum -c``'s
format). A failed export leaves no part and no half object: the upload is aborted, the PAR
deleted, the worker VM terminated (the ledger of :mod:`diskimport.ledger`, as for imports).

A volume group's volumes (a machine) are exported at once from one worker VM, in disk order
(the ``import-disk`` tag an import set, else the group's order), and a machine manifest
``<machine>.machine.json`` is written beside them, so the machine re-imports with
``import-machine``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import oci

from . import cloud, contract, upload
from .commands import CommandFailed, read_range
from .errors import ImageRejected, InvalidRequest
from .importer import Importer, _phase
from .records import ObjectVersion, WorkerVM
from .transfer import make_staging_dir, remove_staging

UPLOAD_PAR_LIFETIME = dt.timedelta(hours=24)
# Parts of a converted image are sent while qemu-img writes it, each once the file is
# HOLD_BACK_BYTES past its end (qemu-img updates a qcow2's L2 tables and refcounts, or a
# vhdx's block table, for a while after writing them); a part sent and changed afterwards is
# sent again, so small parts keep that cheap.
MIN_PART_BYTES = 32 * 1024 * 1024
HOLD_BACK_BYTES = 512 * 1024 * 1024
MAX_PARTS = 10000
# qemu's vpc driver writes no VHD above this (2040 GiB).
VHD_MAX_BYTES = 0xFF000000 * 512
META_EXPORTED_FROM = "exported-from"
META_EXPORT_ID = "export-id"
META_FIRMWARE = "firmware"
META_MACHINE = "machine"
META_DISK = "disk"


@dataclass(frozen=True)
class ExportFormat:
    """One image format an export writes: its qemu-img name and creation options, its suffix."""

    name: str
    qemu_format: str
    options: tuple[str, ...]
    suffix: str
    staged: bool = True   # converted to a file on the worker first (raw is uploaded from the device)
    appends: bool = True  # qemu-img writes it growing at its end (a fixed VHD is made full size first)


FORMATS = {
    "qcow2": ExportFormat("qcow2", "qcow2", ("compat=1.1",), ".qcow2"),
    "vmdk": ExportFormat("vmdk", "vmdk", ("subformat=streamOptimized",), ".vmdk"),
    "vhdx": ExportFormat("vhdx", "vhdx", ("subformat=dynamic",), ".vhdx"),
    "vhd": ExportFormat("vhd", "vpc", ("subformat=fixed", "force_size=on"), ".vhd", appends=False),
    "raw": ExportFormat("raw", "raw", (), ".raw", staged=False),
}


def export_format(name: str, compress: bool = False) -> ExportFormat:
    fmt = FORMATS.get(str(name).lower())
    if fmt is None:
        raise InvalidRequest("invalid-export-format", f"format must be one of {', '.join(FORMATS)}, not {name!r}")
    if compress and fmt.name != "qcow2":
        raise InvalidRequest("invalid-export-format", f"compress applies to qcow2 only (a vmdk streamOptimized is "
                             f"compressed by its format), not to {fmt.name}")
    return fmt


@dataclass(frozen=True)
class SourceVolume:
    """A volume to export, as OCI described it."""

    id: str
    display_name: str
    size_bytes: int
    availability_domain: str
    compartment_id: str
    boot: bool
    firmware: str | None = None
    position: int = 0


@dataclass(frozen=True)
class ExportJob:
    """One export run's identity. Reads like an :class:`ObjectVersion` to the import's worker
    VM code (``import_id``, ``name``, ``etag``), so its worker VM is tagged, swept and cleaned
    up after a crash as an import's is."""

    namespace: str
    bucket: str
    name: str            # the first object's name (a machine: its manifest's)
    export_id: str
    format: str
    compress: bool
    machine: str | None = None
    sources: tuple[SourceVolume, ...] = ()
    objects: tuple[str, ...] = ()   # one per source, in order

    @property
    def import_id(self) -> str:
        return self.export_id

    @property
    def etag(self) -> str:
        return "export"

    @property
    def key(self) -> str:
        return f"export/{self.export_id}"


@dataclass
class ExportedImage:
    """One volume's exported object, as committed and inspected again."""

    volume_id: str
    object_name: str
    format: str
    virtual_size: int
    object_bytes: int
    etag: str
    sha256: str
    parts: int
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"volume_id": self.volume_id, "object": self.object_name, "format": self.format,
                "virtual_size": self.virtual_size, "object_bytes": self.object_bytes, "etag": self.etag,
                "sha256": self.sha256, "parts": self.parts, "seconds": self.seconds}


def _clean_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.")[:100]
    return cleaned or "volume"


def _check_object_name(name: str, what: str) -> str:
    if not name or len(name) > 1024 or re.search(r"[\x00-\x1f]", name) or name.startswith("/") or \
            any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidRequest("invalid-object-name", f"{what} {name!r} is not an object name (1 to 1024 printable "
                             "characters, no empty, '.' or '..' parts)")
    return name


def remove_run_uploads(clients: cloud.Clients, namespace: str, bucket: str, run_id: str) -> list[str]:
    """A dead export run's leftovers in ``bucket`` (its crash hook): the write PARs named for the
    run, and the multipart uploads on their objects, which that run alone was writing."""
    aborted = []
    pars = oci.pagination.list_call_get_all_results(clients.object_storage.list_preauthenticated_requests,
                                                    namespace, bucket).data
    mine = [p for p in pars if p.name.startswith("oci-disk-export-") and f"-{run_id}-" in p.name]
    objects = {p.object_name for p in mine}
    if objects:
        uploads = oci.pagination.list_call_get_all_results(clients.object_storage.list_multipart_uploads,
                                                           namespace, bucket).data
        for item in uploads:
            if item.object in objects:
                cloud.abort_upload(clients, namespace, bucket, item.object, item.upload_id)
                aborted.append(item.upload_id)
    for par in mine:
        cloud.delete_par(clients, namespace, bucket, par.id)
    return aborted


def qcow2_metadata(read: Callable[[int, int], bytes]) -> list[tuple[int, int]]:
    """The byte ranges of a qcow2 (as qemu-img convert writes one) that qemu-img may write more
    than once: the header cluster, the L1 table, the refcount table, every refcount block and
    every L2 table. Data clusters (compressed ones too) are written once, at the file's end."""
    header = read(0, 72)
    if len(header) < 72 or header[:4] != b"QFI\xfb":
        raise ImageRejected("export-convert-failed", "the converted file is not a qcow2")
    cluster_bits, = struct.unpack(">I", header[20:24])
    l1_size, l1_offset = struct.unpack(">IQ", header[36:48])
    refcount_offset, refcount_clusters = struct.unpack(">QI", header[48:60])
    if not 9 <= cluster_bits <= 21 or l1_size > 1 << 26 or refcount_clusters > 1 << 16:
        raise ImageRejected("export-convert-failed", "the converted qcow2's header is not one qemu-img writes")
    cluster = 1 << cluster_bits
    ranges = [(0, cluster), (l1_offset, l1_offset + 8 * l1_size),
              (refcount_offset, refcount_offset + refcount_clusters * cluster)]
    mask = 0x00FFFFFFFFFFFE00
    for table, length in ((l1_offset, 8 * l1_size), (refcount_offset, refcount_clusters * cluster)):
        data = read(table, length) if length else b""
        for (entry,) in struct.iter_unpack(">Q", data[:len(data) // 8 * 8]):
            if entry & mask:
                ranges.append((entry & mask, (entry & mask) + cluster))
    return sorted(ranges)


def source_volume(clients: cloud.Clients, volume_id: str, position: int, refuse_attached: bool) -> SourceVolume:
    """A volume (or boot volume) to export or copy, which must be AVAILABLE (and, to be read by a
    worker VM, attached nowhere)."""
    try:
        volume = cloud.get_volume(clients, volume_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            raise InvalidRequest("volume-not-found", f"volume {volume_id} not found") from None
        raise
    if volume.lifecycle_state != "AVAILABLE":
        raise InvalidRequest("volume-not-available", f"volume {volume_id} is {volume.lifecycle_state}, not AVAILABLE")
    if refuse_attached:
        attached = cloud.live_attachments(clients, volume.compartment_id, volume_id, volume.availability_domain)
        if attached:
            raise InvalidRequest("volume-attached", f"volume {volume_id} is attached to {attached[0].instance_id}: "
                                 "detach it (or stop the instance and detach it) so that it exports consistently")
    tags = volume.freeform_tags or {}
    disk = tags.get(contract.TAG_DISK)
    return SourceVolume(volume.id, volume.display_name or volume.id, int(volume.size_in_gbs) * 1024 ** 3,
                        volume.availability_domain, volume.compartment_id, cloud.is_boot_volume(volume.id),
                        tags.get(contract.TAG_FIRMWARE), int(disk) if disk and disk.isdigit() else position)


def resolve_sources(clients: cloud.Clients, volume_id: str | None, volume_group_id: str | None,
                    refuse_attached: bool) -> tuple[str | None, list[SourceVolume]]:
    """``(machine name, volumes in disk order)`` of one volume or of a volume group (a machine:
    boot volume first, then the ``import-disk`` positions an import tagged, else the group's order)."""
    if bool(volume_id) == bool(volume_group_id):
        raise InvalidRequest("invalid-source", "give either volume_id or volume_group_id")
    if volume_id:
        return None, [source_volume(clients, volume_id, 0, refuse_attached)]
    group = cloud.get_volume_group(clients, volume_group_id)
    members = [source_volume(clients, vid, i, refuse_attached) for i, vid in enumerate(group.volume_ids or [])]
    if not members:
        raise InvalidRequest("invalid-source", f"volume group {volume_group_id} has no volumes")
    ordered = sorted(members, key=lambda s: (not s.boot, s.position))
    return (_clean_name(group.display_name or "machine"),
            [SourceVolume(**{**s.__dict__, "position": i}) for i, s in enumerate(ordered)])


class Exporter:
    """One export run's steps, on top of an :class:`Importer` (clients, settings, worker VM,
    ledger and retry tokens are the import's)."""

    def __init__(self, core: Importer) -> None:
        self.core = core
        self.clients = core.clients
        self.log = core.log

    # -- what to export, and where ----------------------------------------------------------

    def plan(self, bucket: str, namespace: str | None, format: str, compress: bool = False,
             volume_id: str | None = None, volume_group_id: str | None = None, object_name: str | None = None,
             prefix: str = "") -> ExportJob:
        """Resolve the volumes and name their objects; refuse what cannot be exported, before
        anything is created."""
        fmt = export_format(format, compress)
        if self.core.shape.attachment_type == "iscsi":
            raise InvalidRequest("iscsi-export-unsupported", "exports attach volumes paravirtualized; use a worker "
                                 "shape with attachment_type paravirtualized")
        ns = namespace or cloud.with_backoff(self.clients.object_storage.get_namespace).data
        prefix = prefix or ""
        if prefix:
            _check_object_name(prefix.rstrip("/") + "/x", "prefix")
        machine, sources = resolve_sources(self.clients, volume_id, volume_group_id, refuse_attached=True)
        if volume_id:
            name = object_name or f"{prefix}{_clean_name(sources[0].display_name)}{fmt.suffix}"
            objects = [_check_object_name(name, "object_name")]
            if not name.lower().endswith(contract.IMAGE_SUFFIXES):
                raise InvalidRequest("invalid-object-name", f"object_name {name!r} must end in an image suffix "
                                     f"such as {fmt.suffix}, so that it re-imports")
            first = objects[0]
        else:
            objects = [_check_object_name(f"{prefix}{machine}-disk{s.position}{fmt.suffix}", "object name")
                       for s in sources]
            first = _check_object_name(f"{prefix}{machine}.machine.json", "manifest name")
        if fmt.name == "vhd":
            for s in sources:
                if s.size_bytes > VHD_MAX_BYTES:
                    raise InvalidRequest("vhd-too-large", f"volume {s.id} ({s.size_bytes} bytes) is over the "
                                         f"{VHD_MAX_BYTES} bytes a VHD holds")
        if len({s.availability_domain for s in sources}) > 1:
            raise InvalidRequest("invalid-source", "the volumes are in different availability domains")
        key = "|".join([ns, bucket, *objects, fmt.name, str(compress), *(s.id for s in sources)])
        export_id = hashlib.sha256(key.encode()).hexdigest()[:32]
        return ExportJob(ns, bucket, first, export_id, fmt.name, compress, machine, tuple(sources), tuple(objects))

    def finished_objects(self, job: ExportJob, overwrite: bool = False) -> dict[int, str]:
        """Positions whose object this export already wrote (its ``export-id`` metadata) and
        checked (its ``.sha256`` beside it): a retry or a repeat does not write them again. An object of the same name that is not this
        export's is refused unless ``overwrite``."""
        done: dict[int, str] = {}
        for position, name in enumerate(job.objects):
            head = self._head(job, name)
            if head is None:
                continue
            if head.get(f"opc-meta-{META_EXPORT_ID}") == job.export_id:
                # finished once inspected and its checksum written beside it; else written again
                if self._head(job, f"{name}.sha256") is not None:
                    done[position] = head["etag"]
            elif not overwrite:
                raise InvalidRequest("object-exists", f"object {name!r} exists in bucket {job.bucket!r} and is not "
                                     "this export's; choose another name or pass overwrite")
        return done

    def _head(self, job: ExportJob, name: str) -> dict[str, str] | None:
        return cloud.head_object_or_none(self.clients, job.namespace, job.bucket, name)

    def remove_stale_uploads(self, job: ExportJob) -> list[str]:
        """Abort the multipart uploads a dead attempt of this export left on its objects."""
        aborted = []
        storage = self.clients.object_storage
        uploads = oci.pagination.list_call_get_all_results(storage.list_multipart_uploads, job.namespace,
                                                           job.bucket).data
        for item in uploads:
            if item.object in job.objects:
                cloud.abort_upload(self.clients, job.namespace, job.bucket, item.object, item.upload_id)
                aborted.append(item.upload_id)
        for name in job.objects:
            for par in cloud.pars_of(self.clients, job.namespace, job.bucket, name):
                if par.name.startswith(self._par_prefix(job)):
                    cloud.delete_par(self.clients, job.namespace, job.bucket, par.id)
        return aborted

    @staticmethod
    def _par_prefix(job: ExportJob) -> str:
        return f"oci-disk-export-{job.export_id[:24]}-"

    # -- the worker VM ------------------------------------------------------------------------

    def launch_worker(self, job: ExportJob) -> WorkerVM:
        return self.core.launch_worker(job, job.sources[0].availability_domain)  # type: ignore[arg-type]

    # -- one volume -----------------------------------------------------------------------------

    def export_volume(self, session: Any, worker: WorkerVM, job: ExportJob, position: int,
                      on_event: Callable[[dict[str, Any]], None] | None = None) -> ExportedImage:
        """Attach read-only, convert, upload, commit, inspect again; everything undone on failure."""
        source, name = job.sources[position], job.objects[position]
        fmt = export_format(job.format, job.compress)
        core, ledger = self.core, self.core.ledger
        seconds: dict[str, float] = {}

        def clock(name: str) -> _phase:
            return _phase(seconds, name)
        with clock("attach"):
            with core._attach_lock:
                made = cloud.existing_attachment(self.clients, worker.id, source.id) or cloud.attach_volume(
                    self.clients, worker.id, source.id, core.shape.attachment_type,
                    core.retry_token(f"attach/{source.id}"), read_only=True)
            attached = ledger.register("attachment", made.id, lambda: cloud.detach_volume(self.clients, made.id))
            ready = cloud.wait_attached(self.clients, made.id)
            device = ready.device
        staging = None
        metadata = self._metadata(job, source, fmt)
        try:
            if not fmt.staged:  # raw: the device itself
                with clock("upload"):
                    size = self._size(session, device)
                    result, etag = self._upload(session, job, name, device, size, metadata, on_event)
            else:
                estimate = self._measure(session, device)
                staging = make_staging_dir(session, job.export_id, estimate)
                path = f"{staging}/image{fmt.suffix}"
                if fmt.appends:  # uploaded while qemu-img writes it
                    with clock("convert-and-upload"):
                        result, etag = self._upload(
                            session, job, name, path, 2 * estimate, metadata, on_event,
                            follow=(f"{staging}/converted", lambda: self._convert(session, device, path, fmt,
                                                                                   job.compress)))
                else:
                    with clock("convert"):
                        self._convert(session, device, path, fmt, job.compress)
                    with clock("upload"):
                        result, etag = self._upload(session, job, name, path, self._size(session, path), metadata,
                                                    on_event)
                size = int(result["bytes"])
            cloud.detach_volume(self.clients, made.id)
            ledger.release(attached)
        finally:
            if staging is not None:
                remove_staging(session, staging)
        written = ledger.register("object", name, lambda: self._delete(job, name))
        with clock("inspect"):
            self.inspect_written(job, name, source, fmt)
            self._put(job, f"{name}.sha256", f"{result['sha256']}  {name.rsplit('/', 1)[-1]}\n".encode())
        ledger.release(written)
        self.log.info("exported %s to %s (%s, %d bytes, %d parts) in %s", source.id, name, fmt.name, size,
                      len(result["parts"]), seconds)
        return ExportedImage(source.id, name, fmt.name, source.size_bytes, size, etag, result["sha256"],
                             len(result["parts"]), seconds)

    def _measure(self, session: Any, device: str) -> int:
        """About what the converted image needs on the worker (its data, as qemu-img measures it for
        qcow2; the other formats' drivers do not measure), for where to keep it."""
        result = session.run(["qemu-img", "measure", "-f", "raw", "-O", "qcow2", "--output=json", device],
                             timeout=3600)
        if result.returncode != 0:
            raise CommandFailed(result, "qemu-img measure")
        return int(json.loads(result.stdout)["required"])

    @staticmethod
    def _convert(session: Any, device: str, path: str, fmt: ExportFormat, compress: bool) -> None:
        argv = ["qemu-img", "convert", "-f", "raw", "-O", fmt.qemu_format]
        if fmt.options:
            argv += ["-o", ",".join(fmt.options)]
        if compress:
            argv.append("-c")
        # The volume is read once, around the page cache (O_DIRECT): a third of the CPU, and the
        # worker's memory is left to the staged image. Where the source refuses O_DIRECT, cached.
        result = session.run([*argv, "-T", "none", device, path], timeout=24 * 3600)
        if result.returncode != 0 and "Invalid argument" in result.stderr:
            result = session.run([*argv, device, path], timeout=24 * 3600)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip()[-2000:]
            code = "worker-disk-full" if "No space left" in detail else "export-convert-failed"
            raise ImageRejected(code, f"qemu-img convert of {device} to {fmt.name} failed: {detail}")

    @staticmethod
    def _size(session: Any, path: str) -> int:
        result = session.run(["sh", "-c", 'if [ -b "$1" ]; then blockdev --getsize64 "$1"; else stat -L -c %s "$1"; fi',
                              "sh", path])
        if result.returncode != 0:
            raise CommandFailed(result, f"reading the size of {path}")
        return int(result.stdout.strip())

    @staticmethod
    def _metadata(job: ExportJob, source: SourceVolume, fmt: ExportFormat) -> dict[str, str]:
        metadata = {"format": fmt.name, "virtual-size": str(source.size_bytes),
                    "display-name": source.display_name[:255], META_EXPORTED_FROM: source.id,
                    META_EXPORT_ID: job.export_id}
        if source.boot or source.firmware:
            metadata[META_FIRMWARE] = source.firmware or "unknown"
        if job.machine:
            metadata[META_MACHINE] = job.machine
            metadata[META_DISK] = str(source.position)
        return metadata

    def _upload(self, session: Any, job: ExportJob, name: str, path: str, size: int, metadata: dict[str, str],
                on_event: Callable[[dict[str, Any]], None] | None,
                follow: tuple[str, Callable[[], None]] | None = None) -> tuple[dict[str, Any], str]:
        """The file (at most ``size`` bytes) into a multipart upload through a write-only PAR;
        committed, or aborted. ``follow``: ``(done file, writer)``: the writer writes the file
        meanwhile, and the done file tells the uploader when it has finished, or failed."""
        core, ledger = self.core, self.core.ledger
        par_name = f"{self._par_prefix(job)}{core.run_id}-{core.retry_token('par/' + name)[:12]}"
        par_id, access_uri = cloud.object_par(self.clients, job.namespace, job.bucket, name, UPLOAD_PAR_LIFETIME,
                                              par_name, access_type="ObjectWrite")
        par = ledger.register("PAR", par_id, lambda: cloud.delete_par(self.clients, job.namespace, job.bucket,
                                                                       par_id))
        endpoint = self.clients.object_storage.base_client.endpoint.rstrip("/")
        try:
            created = upload.create_par_upload(endpoint + access_uri, metadata)
            upload_id = created["uploadId"]
            aborted = ledger.register("multipart upload", upload_id, lambda: cloud.abort_upload(
                self.clients, job.namespace, job.bucket, name, upload_id))
            part_bytes = max(MIN_PART_BYTES, -(-size // MAX_PARTS))

            def send(follow_config: dict[str, Any] | None = None) -> dict[str, Any]:
                return upload.run_upload(session, endpoint, created["accessUri"], path, part_bytes=part_bytes,
                                         connections=core.settings.transfer_connections, follow=follow_config,
                                         on_event=on_event)
            result = send() if follow is None else self._while_written(session, path, *follow, send)
            parts = [oci.object_storage.models.CommitMultipartUploadPartDetails(part_num=int(n), etag=etag)
                     for n, etag in sorted(result["parts"].items(), key=lambda item: int(item[0]))]
            committed = cloud.with_backoff(
                self.clients.object_storage.commit_multipart_upload, job.namespace, job.bucket, name, upload_id,
                oci.object_storage.models.CommitMultipartUploadDetails(parts_to_commit=parts))
            ledger.release(aborted)
            etag = committed.headers.get("etag", "")
        finally:
            ledger.undo(par)
        return result, etag

    @staticmethod
    def _while_written(session: Any, path: str, done_file: str, writer: Callable[[], None],
                       send: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """``send`` following the file ``writer`` writes; the writer's failure (which also stops
        the uploader, through the done file) is the one raised. For a qcow2 the done file names
        the ranges qemu-img rewrites (:func:`qcow2_metadata`): only parts sent early that overlap
        them are read again; for other formats every part sent early is."""
        def rewritable(session: Any, path: str) -> list[list[int]] | None:
            if not path.endswith(".qcow2"):
                return None
            return [list(r) for r in qcow2_metadata(lambda start, length: read_range(session, path, start, length))]

        def write() -> None:
            status = "ok"
            try:
                writer()
                ranges = rewritable(session, path)
                if ranges is not None:
                    status = json.dumps({"status": "ok", "recheck": ranges})
            except BaseException as exc:
                status = f"failed: {exc}"[:2000]
                raise
            finally:  # whole or not at all: the uploader reads it as soon as it exists
                session.put_private_file(status, done_file + ".part")
                session.run(["mv", "-f", done_file + ".part", done_file])

        # the file exists, empty, before either starts: the uploader opens it at once, and qemu-img
        # truncates it in place (a retry's half file is never followed)
        session.run(["truncate", "-s", "0", path])
        with ThreadPoolExecutor(1, thread_name_prefix="export-convert") as pool:
            written = pool.submit(write)
            try:
                result = send({"done_file": done_file, "hold_back": HOLD_BACK_BYTES})
            except BaseException:
                if written.exception() is not None:  # waits: the writer's error is the cause
                    raise written.exception() from None  # type: ignore[misc]
                raise
            written.result()
        return result

    def inspect_written(self, job: ExportJob, name: str, source: SourceVolume, fmt: ExportFormat) -> None:
        """The committed object read again as an import reads it: the format and virtual size
        it must have, and every hostile-image check."""
        version = self.core.read_object(job.namespace, job.bucket, name, None)
        image = self.core.inspect(version, contract.ImportOptions())
        if image.format != fmt.qemu_format or image.virtual_size != source.size_bytes:
            raise ImageRejected("export-inspection-mismatch", f"the exported {name!r} reads as {image.format} of "
                                f"{image.virtual_size} bytes, not {fmt.qemu_format} of {source.size_bytes}")

    def _put(self, job: ExportJob, name: str, data: bytes, content_type: str = "text/plain") -> str:
        reply = cloud.with_backoff(self.clients.object_storage.put_object, job.namespace, job.bucket, name, data,
                                   content_type=content_type)
        return reply.headers.get("etag", "")

    def _delete(self, job: ExportJob, name: str) -> None:
        try:
            cloud.with_backoff(self.clients.object_storage.delete_object, job.namespace, job.bucket, name)
        except oci.exceptions.ServiceError as exc:
            if exc.status != 404:
                raise

    def write_manifest(self, job: ExportJob) -> str | None:
        """A machine's ``<machine>.machine.json`` beside its disks, boot disk first."""
        if job.machine is None:
            return None
        doc: dict[str, Any] = {"name": job.machine, "disks": list(job.objects)}
        firmware = job.sources[0].firmware
        if firmware in ("BIOS", "UEFI_64"):
            doc["firmware"] = firmware
        self._put(job, job.name, json.dumps(doc, indent=2).encode() + b"\n", "application/json")
        return job.name

    def summary(self, job: ExportJob, exported: Sequence[ExportedImage], reused: dict[int, str],
                manifest: str | None) -> dict[str, Any]:
        disks = []
        for position, (source, name) in enumerate(zip(job.sources, job.objects)):
            item = next((e.summary() for e in exported if e.object_name == name), None)
            disks.append(item or {"volume_id": source.id, "object": name, "format": job.format, "reused": True,
                                  "etag": reused.get(position)})
        return {"export_id": job.export_id, "namespace": job.namespace, "bucket": job.bucket, "format": job.format,
                "compressed": job.compress, "machine": job.machine, "manifest": manifest, "disks": disks,
                "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()}

    def export_all(self, session: Any, worker: WorkerVM, job: ExportJob, positions: Sequence[int],
                   on_event: Callable[[int, dict[str, Any]], None] | None = None) -> list[ExportedImage]:
        """Several volumes at once on one worker VM (a machine's)."""
        if len(positions) == 1:
            return [self.export_volume(session, worker, job, positions[0],
                                       (lambda e: on_event(positions[0], e)) if on_event else None)]
        with ThreadPoolExecutor(len(positions), thread_name_prefix="export") as pool:
            futures = [pool.submit(self.export_volume, session, worker, job, p,
                                   (lambda e, p=p: on_event(p, e)) if on_event else None) for p in positions]
            return [f.result() for f in futures]


__all__ = ["FORMATS", "ExportFormat", "ExportJob", "ExportedImage", "Exporter", "SourceVolume", "export_format",
           "ObjectVersion"]
