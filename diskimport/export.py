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
   pre-authenticated request for that one object (the agent's ``upload``,
   :mod:`diskimport.agent.upload`; no credentials on the worker), **while qemu-img writes
   it**: a part goes once the file has grown :data:`HOLD_BACK_BYTES` past it, and a part that qemu-img changed after it went (a qcow2's
   header, L2 tables and refcounts; a vhdx's block table) is sent again once the file is
   final. The final file is hashed (SHA-256) beside the upload.

The orchestrator creates the upload (its metadata says what a re-import needs: ``format``,
``virtual-size``, ``display-name``, the source volume, and for a boot disk its firmware) and
registers its abort before the first part exists; it commits the parts, then inspects the
written object again with the import's own inspection (format, virtual size, every hostile
image check) and records its SHA-256 beside it (``<object>.sha256``, ``sha256sum -c``'s
format). A failed export leaves no part and no half object: the upload is aborted, the PAR
deleted, the worker VM terminated (the ledger of its :class:`~diskimport.run.Run`, as for
imports).

What cannot be exported is refused by name before anything is created: every OCID is checked
for its kind before OCI is asked about it (OCI answers a volume's OCID given as a group's with
a bare 404), then the bucket, the volumes (found, available, attached nowhere) and the group
are looked up, and the objects named.

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
from typing import Any, Callable, Mapping, Sequence

import oci

from . import cloud, contract, naming
from .images import packed
from .worker_vm import upload
from .worker_vm.commands import CommandFailed, read_range
from .errors import ImageRejected, InvalidRequest
from .records import Subject, WorkerVM
from .ocids import GROUP_KINDS, VOLUME_KINDS, check_ocid
from .run import Run, phase, step
from .summaries import ExportedDiskRow, ExportSummary
from .worker_vm.transfer import make_staging_dir, remove_staging
from .worker_vm.session import WorkerSession

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
# The names of every export's PARs start with this (naming.par_prefix of an export's subject).
EXPORT_PAR_PREFIX = naming.PAR_PREFIX + "export-"


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
    """One export: the volumes it reads, the objects it writes, in disk order, and its id (the
    ``export-id`` metadata of the objects, in the tags of its worker VM and the names of its PARs)."""

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
    def subject(self) -> Subject:
        """What the export's worker VM is tagged for and its PARs named for: the export id stands
        where an import's id does (``import-id``) and ``export`` where its ETag does, so a sweep
        and the crash hook find the worker VM as they find an import's."""
        return Subject("export", self.export_id, self.name, "export")

    @property
    def availability_domain(self) -> str:
        """Where the worker VM goes: beside the volumes (all in one availability domain)."""
        return self.sources[0].availability_domain

    def missing(self, done: Mapping[int, str]) -> list[int]:
        """The positions whose object is still to be written, ``done`` being those written already."""
        return [position for position in range(len(self.objects)) if position not in done]


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
    finished_at: str = ""  # ISO 8601: when the object was checked and its checksum written

    def row(self) -> ExportedDiskRow:
        """The object's line of the export summary."""
        return ExportedDiskRow(self.volume_id, self.object_name, self.format, False, self.etag, self.virtual_size,
                               self.object_bytes, self.sha256, self.parts, self.seconds, self.finished_at)


def _clean_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).strip("-.")[:100]
    return cleaned or "volume"


def _check_object_name(name: str, what: str) -> str:
    if not name or len(name) > 1024 or re.search(r"[\x00-\x1f]", name) or name.startswith("/") or \
            any(part in ("", ".", "..") for part in name.split("/")):
        raise InvalidRequest("invalid-object-name", f"{what} {name!r} is not an object name (1 to 1024 printable "
                             "characters, no empty, '.' or '..' parts)")
    return name


def remove_run_uploads(clients: cloud.Clients, namespace: str | None, bucket: str, run_id: str) -> list[str]:
    """A dead export run's leftovers in ``bucket`` (its crash hook): the write PARs named for the
    run, and the multipart uploads on their objects, which that run alone was writing."""
    namespace = namespace or cloud.with_backoff(clients.object_storage.get_namespace).data
    aborted = []
    pars = oci.pagination.list_call_get_all_results(clients.object_storage.list_preauthenticated_requests,
                                                    namespace, bucket).data
    mine = [p for p in pars if p.name.startswith(EXPORT_PAR_PREFIX) and f"-{run_id}-" in p.name]
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
            raise InvalidRequest("volume-not-found", f"volume {volume_id} not found (or not visible to these "
                                 "credentials in this region)") from None
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


def source_group(clients: cloud.Clients, group_id: str) -> Any:
    """A volume group to export or copy (a machine's)."""
    try:
        return cloud.get_volume_group(clients, group_id)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            raise InvalidRequest("volume-group-not-found", f"volume group {group_id} not found (or not visible to "
                                 "these credentials in this region)") from None
        raise


def check_sources(volume_id: str | None, volume_group_id: str | None) -> None:
    """Exactly one of a volume and a volume group, each named by an OCID of its kind (refused
    before OCI is asked about it)."""
    if bool(volume_id) == bool(volume_group_id):
        raise InvalidRequest("invalid-source", "give either volume_id or volume_group_id")
    if volume_id:
        check_ocid("volume_id", volume_id, VOLUME_KINDS, taken_by={"volumegroup": "volume_group_id"})
    else:
        check_ocid("volume_group_id", volume_group_id or "", GROUP_KINDS,
                   taken_by={"volume": "volume_id", "bootvolume": "volume_id"})


def resolve_sources(clients: cloud.Clients, volume_id: str | None, volume_group_id: str | None,
                    refuse_attached: bool) -> tuple[str | None, list[SourceVolume]]:
    """``(machine name, volumes in disk order)`` of one volume or of a volume group (a machine:
    boot volume first, then the ``import-disk`` positions an import tagged, else the group's order)."""
    check_sources(volume_id, volume_group_id)
    if volume_id:
        return None, [source_volume(clients, volume_id, 0, refuse_attached)]
    return source_machine(clients, volume_group_id or "", refuse_attached)


def source_machine(clients: cloud.Clients, volume_group_id: str, refuse_attached: bool
                   ) -> tuple[str, list[SourceVolume]]:
    """A volume group's name and volumes, in disk order."""
    group = source_group(clients, volume_group_id)
    members = [source_volume(clients, vid, i, refuse_attached) for i, vid in enumerate(group.volume_ids or [])]
    if not members:
        raise InvalidRequest("invalid-source", f"volume group {volume_group_id} has no volumes")
    ordered = sorted(members, key=lambda s: (not s.boot, s.position))
    return (_clean_name(group.display_name or "machine"),
            [SourceVolume(**{**s.__dict__, "position": i}) for i, s in enumerate(ordered)])


class Exporter:
    """One export's steps, on its :class:`~diskimport.run.Run` (clients, settings, worker VM,
    ledger, retry tokens and tags are the run's)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.clients = run.clients
        self.log = run.log

    # -- what to export, and where ----------------------------------------------------------

    @step("plan-export")
    def plan(self, bucket: str, namespace: str | None, format: str, compress: bool = False,
             volume_id: str | None = None, volume_group_id: str | None = None, object_name: str | None = None,
             prefix: str = "") -> ExportJob:
        """Resolve the volumes and name their objects; refuse what cannot be exported, before
        anything is created."""
        fmt = export_format(format, compress)
        if self.run.shape.attachment_type == "iscsi":
            raise InvalidRequest("iscsi-export-unsupported", "exports attach volumes paravirtualized; use a worker "
                                 "shape with attachment_type paravirtualized")
        check_sources(volume_id, volume_group_id)
        prefix = prefix or ""
        if prefix:
            _check_object_name(prefix.rstrip("/") + "/x", "prefix")
        ns = self.run.objects.namespace(namespace)
        self._check_bucket(ns, bucket)
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
        self.log.info("export %s: %s as %s%s to %s/%s: %s", export_id,
                      ", ".join(f"{s.id} ({s.size_bytes // 1024 ** 3} GB{', boot' if s.boot else ''})"
                                for s in sources),
                      fmt.name, " (compressed)" if compress else "", ns, bucket, ", ".join(objects))
        return ExportJob(ns, bucket, first, export_id, fmt.name, compress, machine, tuple(sources), tuple(objects))

    def _check_bucket(self, namespace: str, bucket: str) -> None:
        try:
            cloud.with_backoff(self.clients.object_storage.head_bucket, namespace, bucket)
        except oci.exceptions.ServiceError as exc:
            if exc.status == 404:
                raise InvalidRequest("bucket-not-found", f"bucket {bucket!r} not found in namespace {namespace!r} "
                                     "(or not visible to these credentials)") from None
            raise

    @step("find-finished-objects")
    def finished_objects(self, job: ExportJob, overwrite: bool = False) -> dict[int, str]:
        """Positions whose object this export already wrote (its ``export-id`` metadata) and
        checked (its ``.sha256`` beside it), with their ETags: a retry or a repeat does not write
        them again. An object of the same name that is not this export's is refused unless
        ``overwrite``."""
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
            else:
                self.log.info("%s exists and is not this export's; it is overwritten", name)
        if done:
            self.log.info("written and checked already, not written again: %s",
                          ", ".join(job.objects[p] for p in sorted(done)))
        missing = job.missing(done)
        self.log.info("%d of %d object(s) to write%s", len(missing), len(job.objects),
                      "" if missing else ": every object of this export is written already")
        return done

    def _head(self, job: ExportJob, name: str) -> dict[str, str] | None:
        return cloud.head_object_or_none(self.clients, job.namespace, job.bucket, name)

    @step("remove-stale-uploads")
    def remove_stale_uploads(self, job: ExportJob) -> list[str]:
        """Abort the multipart uploads a dead attempt of this export left on its objects, and
        delete its write PARs."""
        aborted = []
        storage = self.clients.object_storage
        uploads = oci.pagination.list_call_get_all_results(storage.list_multipart_uploads, job.namespace,
                                                           job.bucket).data
        for item in uploads:
            if item.object in job.objects:
                cloud.abort_upload(self.clients, job.namespace, job.bucket, item.object, item.upload_id)
                aborted.append(item.upload_id)
        deleted = 0
        prefix = naming.par_prefix(job.subject)
        for name in job.objects:
            for par in cloud.pars_of(self.clients, job.namespace, job.bucket, name):
                if par.name.startswith(prefix):
                    cloud.delete_par(self.clients, job.namespace, job.bucket, par.id)
                    deleted += 1
        if aborted or deleted:
            self.log.info("aborted %d multipart upload(s) and deleted %d write PAR(s) an earlier attempt left",
                          len(aborted), deleted)
        return aborted

    # -- one volume -----------------------------------------------------------------------------

    @step("export-disk")
    def export_volume(self, session: WorkerSession, worker: WorkerVM, job: ExportJob, position: int,
                      on_event: Callable[[dict[str, Any]], None] | None = None) -> ExportedImage:
        """Attach read-only, convert, upload, commit, inspect again; everything undone on failure."""
        source, name = job.sources[position], job.objects[position]
        fmt = export_format(job.format, job.compress)
        ledger = self.run.ledger
        seconds: dict[str, float] = {}
        with phase(seconds, "attach"):
            attachment, attached = self.run.attach(worker, source.id, read_only=True)
        device = attachment.device
        staging = None
        metadata = self._metadata(job, source, fmt)
        try:
            if not fmt.staged:  # raw: the device itself
                with phase(seconds, "upload"):
                    size = self._size(session, device)
                    result, etag = self._upload(session, job, name, device, size, metadata, on_event)
            else:
                estimate = self._measure(session, device)
                staging = make_staging_dir(session, job.export_id, estimate)
                path = f"{staging}/image{fmt.suffix}"
                if fmt.appends:  # uploaded while qemu-img writes it
                    with phase(seconds, "convert-and-upload"):
                        result, etag = self._upload(
                            session, job, name, path, 2 * estimate, metadata, on_event,
                            follow=(f"{staging}/converted", lambda: self._convert(session, device, path, fmt,
                                                                                   job.compress)))
                else:
                    with phase(seconds, "convert"):
                        self._convert(session, device, path, fmt, job.compress)
                    with phase(seconds, "upload"):
                        result, etag = self._upload(session, job, name, path, self._size(session, path), metadata,
                                                    on_event)
                size = int(result["bytes"])
            ledger.undo(attached)  # detached: the source is free again
        finally:
            if staging is not None:
                remove_staging(session, staging)
        written = ledger.register("object", name, lambda: self._delete(job, name))
        with phase(seconds, "inspect"):
            self.inspect_written(job, name, source, fmt)
            self._put(job, f"{name}.sha256", f"{result['sha256']}  {name.rsplit('/', 1)[-1]}\n".encode())
        ledger.release(written)
        took = sum(seconds.values())
        self.log.info("exported %s to %s: %s, %d bytes of a %d GB volume (%d parts), %.0f MiB/s of the volume "
                      "read; %s", source.id, name, fmt.name, size, source.size_bytes // 1024 ** 3,
                      len(result["parts"]), source.size_bytes / 1024 ** 2 / max(took, 0.001),
                      ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        return ExportedImage(source.id, name, fmt.name, source.size_bytes, size, etag, result["sha256"],
                             len(result["parts"]), seconds, dt.datetime.now(dt.timezone.utc).isoformat())

    def _measure(self, session: WorkerSession, device: str) -> int:
        """About what the converted image needs on the worker (its data, as qemu-img measures it for
        qcow2; the other formats' drivers do not measure), for where to keep it."""
        result = session.run(["qemu-img", "measure", "-f", "raw", "-O", "qcow2", "--output=json", device],
                             timeout=3600)
        if result.returncode != 0:
            raise CommandFailed(result, "qemu-img measure")
        return int(json.loads(result.stdout)["required"])

    @staticmethod
    def _convert(session: WorkerSession, device: str, path: str, fmt: ExportFormat, compress: bool) -> None:
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
    def _size(session: WorkerSession, path: str) -> int:
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

    def _upload(self, session: WorkerSession, job: ExportJob, name: str, path: str, size: int, metadata: dict[str, str],
                on_event: Callable[[dict[str, Any]], None] | None,
                follow: tuple[str, Callable[[], None]] | None = None) -> tuple[dict[str, Any], str]:
        """The file (at most ``size`` bytes) into a multipart upload through a write-only PAR;
        committed, or aborted. ``follow``: ``(done file, writer)``: the writer writes the file
        meanwhile, and the done file tells the uploader when it has finished, or failed."""
        ledger = self.run.ledger
        par_id, access_uri = cloud.object_par(self.clients, job.namespace, job.bucket, name, UPLOAD_PAR_LIFETIME,
                                              self.run.par_name(job.subject, "/" + name), access_type="ObjectWrite")
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
                                         connections=self.run.settings.transfer_connections, follow=follow_config,
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
    def _while_written(session: WorkerSession, path: str, done_file: str, writer: Callable[[], None],
                       send: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """``send`` following the file ``writer`` writes; the writer's failure (which also stops
        the uploader, through the done file) is the one raised. For a qcow2 the done file names
        the ranges qemu-img rewrites (:func:`qcow2_metadata`): only parts sent early that overlap
        them are read again; for other formats every part sent early is."""
        def rewritable(session: WorkerSession, path: str) -> list[list[int]] | None:
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
                failure = written.exception()  # waits: the writer's error is the cause
                if failure is not None:
                    raise failure from None
                raise
            written.result()
        return result

    def inspect_written(self, job: ExportJob, name: str, source: SourceVolume, fmt: ExportFormat) -> None:
        """The committed object read again as an import inspects it: the format and virtual size
        it must have, and every hostile-image check."""
        version = self.run.objects.version(job.namespace, job.bucket, name)
        image, _ = packed.inspect_object(lambda start, end: self.run.objects.read(version, start, end), version.size,
                                         name, None, None, self.run.settings.max_virtual_size_bytes)
        if image.format != fmt.qemu_format or image.virtual_size != source.size_bytes:
            raise ImageRejected("export-inspection-mismatch", f"the exported {name!r} reads as {image.format} of "
                                f"{image.virtual_size} bytes, not {fmt.qemu_format} of {source.size_bytes}")
        self.log.info("%s reads back as %s of %d bytes, as exported", name, image.format, image.virtual_size)

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

    @step("write-manifest")
    def write_manifest(self, job: ExportJob) -> str | None:
        """A machine's ``<machine>.machine.json`` beside its disks, boot disk first."""
        if job.machine is None:
            return None
        doc: dict[str, Any] = {"name": job.machine, "disks": list(job.objects)}
        firmware = job.sources[0].firmware
        if firmware in ("BIOS", "UEFI_64"):
            doc["firmware"] = firmware
        self._put(job, job.name, json.dumps(doc, indent=2).encode() + b"\n", "application/json")
        self.log.info("machine manifest %s written: %d disk(s)%s", job.name, len(job.objects),
                      f", firmware {firmware}" if "firmware" in doc else "")
        return job.name

    def summary(self, job: ExportJob, exported: Sequence[ExportedImage], reused: Mapping[int, str],
                manifest: str | None) -> ExportSummary:
        """The finished export's account: the flow run's result, and what its summary shows.
        ``ready_at``: when the last object was checked (now, when every one was written before)."""
        disks = []
        for position, (source, name) in enumerate(zip(job.sources, job.objects)):
            item = next((e.row() for e in exported if e.object_name == name), None)
            disks.append(item or ExportedDiskRow(source.id, name, job.format, True, reused.get(position)))
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        return ExportSummary(job.export_id, job.namespace, job.bucket, job.format, job.compress, job.machine,
                             manifest, disks, dict(self.run.steps),
                             max((e.finished_at for e in exported), default=now), now)

    def export_all(self, session: WorkerSession, worker: WorkerVM, job: ExportJob, positions: Sequence[int],
                   on_event: Callable[[int, dict[str, Any]], None] | None = None) -> list[ExportedImage]:
        """Several volumes at once on one worker VM (a machine's)."""
        if len(positions) == 1:
            return [self.export_volume(session, worker, job, positions[0],
                                       (lambda e: on_event(positions[0], e)) if on_event else None)]
        with ThreadPoolExecutor(len(positions), thread_name_prefix="export") as pool:
            futures = [pool.submit(self.export_volume, session, worker, job, p,
                                   (lambda e, p=p: on_event(p, e)) if on_event else None) for p in positions]
            return [f.result() for f in futures]


__all__ = ["FORMATS", "ExportFormat", "ExportJob", "ExportedImage", "Exporter", "SourceVolume",
           "check_sources", "export_format", "remove_run_uploads", "resolve_sources"]
