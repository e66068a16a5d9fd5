"""The import of one object version, step by step, with no orchestrator in sight.

:class:`Importer` holds what one import needs across its steps (SDK clients, the
settings, the run's identity, its SSH keys and the :class:`~diskimport.ledger.Ledger` of
undos) and offers each step as a method; a flow calls them in order, and a test calls
them directly. :class:`VolumeWrite` is the unit a machine import repeats: write one object
onto one volume on one worker VM (attach, stream, write, verify, check, detach); several
may run at once on one worker.

Used as a context manager, an importer unwinds its ledger when the block fails: the
attachment is detached, the worker VM terminated and the volume deleted (or kept,
tagged failed, with ``keep_failed_volume``), newest first.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import functools
import hashlib
import logging
import resource
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeVar

import oci

from . import boot, cloud, contract, filesystems, inspection, iscsi, machine, naming, nested, packed, slices, transfer
from .commands import read_range
from .contract import ImportOptions
from .errors import BootFailed, ImageRejected, InvalidRequest, OutOfCapacity
from .keys import SshKeyPair, cloud_init_host_keys
from .ledger import Ledger, Undo
from .qemu_img import QemuImg
from .records import (Attachment, FinishedVolume, FoundVolume, InspectedImage, ObjectVersion, Volume, WorkerVM,
                      WriteResult)
from .worker import WorkerSession

log = logging.getLogger(__name__)
T = TypeVar("T")

PAR_LIFETIME = dt.timedelta(hours=2)
COMPETING_POLL_SECONDS = 2.0
COMPETING_WAIT_SECONDS = 24 * 3600.0  # how long a run waits for another run of the same version


class ImportSettingsLike(Protocol):
    """The settings an import reads (the ``ImportSettings`` block has them)."""

    compartment_id: str
    vpus_during_import: int
    vpus_after_import: int
    backup_policy: str | None
    volume_name_template: str
    max_virtual_size_bytes: int
    extra_tags: dict[str, str]
    keep_failed_volume: bool
    transfer_connections: int
    transfer_chunk_mib: int
    unchecked_filesystems: str  # "allow" or "fail"


class WorkerShapeLike(Protocol):
    """Where and how worker VMs are launched (the ``WorkerShape`` block has it)."""

    compartment_id: str
    subnet_id: str
    image_id: str
    shape: str
    ocpus: float | None
    memory_in_gbs: float | None
    boot_volume_size_gb: int | None
    availability_domains: list[str]
    assign_public_ip: bool
    ssh_user: str
    ssh_port: int
    use_sudo: bool
    attachment_type: str
    boot_timeout_seconds: float


class TargetMachineLike(Protocol):
    """Where a bootable machine import starts the machine (the ``TargetMachine`` block has it)."""

    compartment_id: str
    subnet_id: str
    image_id: str
    shape: str
    ocpus: float | None
    memory_in_gbs: float | None
    firmware: str
    boot_volume_type: str
    network_type: str
    boot_check: str
    boot_pattern: str
    boot_timeout_seconds: float
    console_poll_seconds: float


class TransferProgress(Protocol):
    """Where a write reports progress: transfer events, percent written, the end."""

    def event(self, event: dict[str, Any]) -> None: ...

    def written(self, percent: float) -> None: ...

    def done(self) -> None: ...


class CompetingImport(Exception):
    """Another live run is writing the same object version; this run yields to it."""

    def __init__(self, flow_run: str, volume_id: str) -> None:
        super().__init__(f"flow run {flow_run} is importing this object version (volume {volume_id})")
        self.flow_run = flow_run
        self.volume_id = volume_id


@dataclass(frozen=True)
class PreviousImports:
    """What earlier or concurrent runs of the import left: an imported volume, or ones to resume."""

    imported: FoundVolume | None
    resumable: tuple[FoundVolume, ...]
    force: bool = False  # a new volume is wanted even if one was imported


# The head and tail the inspection read, kept for the transfer of the same process so no
# byte is fetched twice (a resumed run in a new process reads them again).
_HEADERS: collections.OrderedDict[str, list[tuple[int, bytes]]] = collections.OrderedDict()
_HEADERS_KEPT = 8
_HEADERS_LOCK = threading.Lock()


def _keep_header(key: str, pieces: list[tuple[int, bytes]]) -> None:
    with _HEADERS_LOCK:
        _HEADERS[key] = pieces
        _HEADERS.move_to_end(key)
        while len(_HEADERS) > _HEADERS_KEPT:
            _HEADERS.popitem(last=False)


def _position(tag: str | None) -> int | None:
    return int(tag) if tag is not None and tag.isdigit() else None


def _digest_of(disk: machine.MachineDisk) -> tuple[str, str, str] | None:
    return (disk.digest[0], disk.digest[1], repr(disk.file.rsplit("/", 1)[-1])) if disk.digest else None


def _kept_header(key: str) -> list[tuple[int, bytes]] | None:
    with _HEADERS_LOCK:
        return _HEADERS.get(key)


def step(name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Count the seconds an importer's step takes into ``importer.steps[name]``, and a
    :class:`VolumeWrite`'s also into its own ``steps`` (a machine's disks run theirs side by side)."""
    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def timed(self: Any, *args: Any, **kwargs: Any) -> T:
            importer = self if isinstance(self, Importer) else self.importer
            start = time.monotonic()
            try:
                return method(self, *args, **kwargs)
            finally:
                seconds = time.monotonic() - start
                with importer._steps_lock:
                    importer.steps[name] = round(importer.steps.get(name, 0.0) + seconds, 3)
                    if self is not importer:
                        self.steps[name] = round(self.steps.get(name, 0.0) + seconds, 3)
        return timed
    return decorate


class Importer:
    """One import run's steps. ``run_id`` names the run in tags; ``attempt`` counts its tries."""

    def __init__(self, clients: cloud.Clients, settings: ImportSettingsLike, shape: WorkerShapeLike, *,
                 run_id: str, attempt: int = 1, run_is_active: Callable[[str], bool] = lambda run: False,
                 logger: logging.Logger | logging.LoggerAdapter | None = None,
                 competing_poll_seconds: float = COMPETING_POLL_SECONDS,
                 competing_wait_seconds: float = COMPETING_WAIT_SECONDS) -> None:
        self.clients = clients
        self.settings = settings
        self.shape = shape
        self.run_id = run_id
        self.attempt = attempt
        self.run_is_active = run_is_active
        self.log = logger or log
        self.ledger = Ledger(self.log)
        self.client_key = SshKeyPair.generate()
        self.host_key = SshKeyPair.generate()
        self.competing_poll_seconds = competing_poll_seconds
        self.competing_wait_seconds = competing_wait_seconds
        self._generations: collections.Counter[str] = collections.Counter()
        self._unwound = 0  # after an unwind, creates are new creates (new retry tokens)
        self._attach_lock = threading.Lock()
        self.steps: dict[str, float] = {}
        self._yielding = False
        self._steps_lock = threading.Lock()
        self.target: TargetMachineLike | None = None  # where a bootable machine import starts the machine

    # -- identity -------------------------------------------------------------------

    def retry_token(self, step: str) -> str:
        """The ``opc-retry-token`` of one create: the same for retries of that create, new after its undo."""
        scope = f"{self.run_id}/{self.attempt}/{self._unwound}/{step}/{self._generations[step]}"
        return hashlib.sha256(scope.encode()).hexdigest()

    def _undone(self, step: str) -> None:
        self._generations[step] += 1

    def tags(self, version: ObjectVersion) -> dict[str, str]:
        return naming.import_tags(version.import_id, version.name, version.etag, self.run_id,
                                  self.settings.extra_tags)

    def __enter__(self) -> "Importer":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, CompetingImport):
            self.log.info("%s; this run yields and removes what it created", exc)
            self._yielding = True  # not a failed import: nothing is kept for inspection
            self.ledger.unwind()
            self._yielding = False
            self._unwound += 1
        elif exc is not None:
            self.log.warning("import failed (%s); removing what it created", exc)
            self.ledger.unwind()
            self._unwound += 1

    # -- before anything is created ------------------------------------------------------

    @step("read-metadata")
    def read_object(self, namespace: str | None, bucket: str, object_name: str, etag: str | None) -> ObjectVersion:
        """HEAD the object; refuse a missing one, or one whose ETag is not the one asked for."""
        storage = self.clients.object_storage
        ns = namespace or cloud.with_backoff(storage.get_namespace).data
        try:
            head = cloud.with_backoff(storage.head_object, ns, bucket, object_name)
        except oci.exceptions.ServiceError as exc:
            if exc.status == 404:  # HEAD 404s carry no error code
                raise InvalidRequest("object-not-found", f"object {object_name!r} not found in bucket {bucket!r} "
                                     f"of namespace {ns!r}") from None
            raise
        headers = head.headers
        version = ObjectVersion(
            namespace=ns, bucket=bucket, name=object_name, etag=headers["etag"],
            size=int(headers["content-length"]),
            md5=headers.get("content-md5") or headers.get("opc-multipart-md5"),
            metadata={k.lower()[len("opc-meta-"):]: v for k, v in headers.items()
                      if k.lower().startswith("opc-meta-")})
        if etag and version.etag != etag:
            raise InvalidRequest("object-changed", f"object {object_name!r} changed: its current ETag is "
                                 f"{version.etag}, not {etag} that this import was asked for")
        return version

    @staticmethod
    def options(version: ObjectVersion, parameters: ImportOptions) -> ImportOptions:
        """The import's options: the run's parameters win over the object's ``opc-meta-*`` metadata."""
        return contract.merge(parameters, contract.parse_options(version.metadata))

    @step("inspect-header")
    def inspect(self, version: ObjectVersion, options: ImportOptions) -> InspectedImage:
        """Learn format and virtual size from the object's head and tail; refuse dangerous images."""
        pieces: list[tuple[int, bytes]] = []

        def read_range(start: int, end: int) -> bytes:
            reply = cloud.with_backoff(self.clients.object_storage.get_object, version.namespace, version.bucket,
                                       version.name, range=f"bytes={start}-{end}", if_match=version.etag)
            pieces.append((start, reply.data.content))
            return pieces[-1][1]

        found, inner = packed.inspect_object(read_range, version.size, version.name, options.format,
                                             options.virtual_size, self.settings.max_virtual_size_bytes)
        _keep_header(version.key, pieces)
        if inner is None:
            return InspectedImage(found.format, found.virtual_size, found.detected_as, found.driver)
        return InspectedImage(found.format, found.virtual_size, found.detected_as, found.driver, inner.container,
                              inner.inner_offset, inner.inner_size)

    @step("inspect-machine")
    def inspect_machine(self, version: ObjectVersion
                        ) -> tuple[machine.Machine, list[tuple[ObjectVersion, InspectedImage]]]:
        """The machine an OVA, an OVF or a ``*.machine.json`` describes, and each disk's object
        version and inspection (every hostile-image check, the descriptor's capacity, the
        manifest's digest for the transfer to check), in boot order. Reads headers and small
        ranges only; the pieces read are kept for the transfers."""
        kind = machine.kind_of(version.name)
        if kind == "ova":
            pieces: list[tuple[int, bytes]] = []
            get = self._range_reader(version, pieces)
            described = machine.describe_ova(get, version.size, version.name)
            disks = []
            for disk, found, packed_as in machine.inspect_ova_disks(described, get,
                                                                    self.settings.max_virtual_size_bytes):
                disks.append((version, InspectedImage(found.format, found.virtual_size, found.detected_as,
                                                      found.driver, packed_as.container, packed_as.inner_offset,
                                                      packed_as.inner_size, _digest_of(disk))))
            _keep_header(version.key, sorted(pieces))
            return described, disks
        text = self._whole_object(version, machine.MAX_DESCRIPTOR, "machine-manifest-invalid" if kind == "manifest"
                                  else "ovf-invalid")
        if kind == "manifest":
            described = machine.parse_machine_manifest(text, version.name)
        elif kind == "ovf":
            prefix, manifest_name = machine.ovf_companions(version.name)
            manifest = self._object_or_none(version, manifest_name)
            files = [d.file for d in machine.parse_ovf(text).disks]
            sizes = {prefix + f: self._size_or_none(version, prefix + f) for f in files}
            described = machine.describe_ovf(text, version.name, manifest, sizes)
        else:
            raise InvalidRequest("not-a-machine", f"{version.name!r} is not an .ova, .ovf or .machine.json object")
        disks = []
        for disk in described.disks:
            disk_version = machine.naming_disk(disk, lambda disk=disk: self.read_object(
                version.namespace, version.bucket, disk.file, None))
            image = machine.about_disk(disk, lambda disk_version=disk_version: self.inspect(
                disk_version, self.options(disk_version, ImportOptions())))
            disks.append((disk_version, dataclasses.replace(image, digest=_digest_of(disk))))
        return described, disks

    def _range_reader(self, version: ObjectVersion, pieces: list[tuple[int, bytes]]
                      ) -> Callable[[int, int], bytes]:
        """``get(start, end)``: bytes [start, end) of the object version, each piece kept in ``pieces``."""
        def get(start: int, end: int) -> bytes:
            if end <= start:
                return b""
            reply = cloud.with_backoff(self.clients.object_storage.get_object, version.namespace, version.bucket,
                                       version.name, range=f"bytes={start}-{end - 1}", if_match=version.etag)
            pieces.append((start, reply.data.content))
            return pieces[-1][1]
        return get

    def _whole_object(self, version: ObjectVersion, limit: int, code: str) -> bytes:
        if version.size > limit:
            raise ImageRejected(code, f"{version.name!r} is {version.size} bytes; at most {limit} are read")
        return self._range_reader(version, [])(0, version.size)

    def _object_or_none(self, beside: ObjectVersion, name: str) -> bytes | None:
        size = self._size_or_none(beside, name)
        if size is None:
            return None
        reply = cloud.with_backoff(self.clients.object_storage.get_object, beside.namespace, beside.bucket, name)
        return reply.data.content[:machine.MAX_MANIFEST + 1]

    def _size_or_none(self, beside: ObjectVersion, name: str) -> int | None:
        head = cloud.head_object_or_none(self.clients, beside.namespace, beside.bucket, name)
        return int(head["content-length"]) if head is not None else None

    def imported_disks(self, version: ObjectVersion) -> dict[int, FoundVolume]:
        """A machine import's disks another run (or an earlier attempt) finished, by position."""
        return {v.disk: v for v in self.found_volumes(version)
                if v.state == contract.STATE_IMPORTED and v.disk is not None}

    @step("provision")
    def provision_machine(self, version: ObjectVersion, disks: Sequence[tuple[int, InspectedImage]],
                          machine_name: str, availability_domain: str | None = None,
                          bootable: bool = False) -> tuple[WorkerVM, list[Volume]]:
        """One worker VM and a volume per disk (``(position, image)``), all made at once, in the
        first availability domain with capacity for the worker (or in ``availability_domain``,
        where volumes of the machine already are); each volume tagged with its disk's position.
        With ``bootable``, the boot disk (position 0) gets a boot volume instead."""
        last_error: Exception | None = None
        ads = [availability_domain] if availability_domain else self.availability_domains(None)
        for ad in ads:
            with ThreadPoolExecutor(max(1, len(disks)), thread_name_prefix="provision") as pool:
                creates = [pool.submit(self.obtain_boot_volume if bootable and position == 0 else self.create_volume,
                                       version, ad, cloud.volume_size_gb(image.virtual_size),
                                       f"{machine_name}-disk{position + 1}",
                                       {contract.TAG_DISK: str(position), contract.TAG_MACHINE: machine_name[:255]})
                           for position, image in disks]
                worker, last_error = self._worker_beside(version, ad, creates)
                if worker is not None:
                    return worker, [create.result() for create in creates]
        raise OutOfCapacity(f"no availability domain had capacity for the worker ({', '.join(ads)}): {last_error}")

    @step("group-volumes")
    def group_volumes(self, version: ObjectVersion, machine_name: str, volumes: Sequence[Volume]) -> str:
        """The machine's volumes in one volume group named after it (the one they are in already,
        after a repeat); until it is available its undo deletes the group only."""
        groups = {cloud.get_volume(self.clients, v.id).volume_group_id
                  for v in volumes}
        if len(groups) == 1 and None not in groups:
            return groups.pop()  # type: ignore[return-value]
        step_name = f"volume-group/{version.import_id}"
        group = cloud.create_volume_group(self.clients, self.settings.compartment_id, volumes[0].availability_domain,
                                          machine_name, [v.id for v in volumes],
                                          {**self.tags(version), contract.TAG_MACHINE: machine_name[:255]},
                                          self.retry_token(step_name))
        undo = self.ledger.register("volume group", group.id, lambda: cloud.delete_volume_group(self.clients, group.id))
        cloud.wait_volume_group_available(self.clients, group.id)
        self.ledger.release(undo)  # the machine's finished volumes stay together from here on
        return group.id

    def header_pieces(self, version: ObjectVersion) -> list[tuple[int, bytes]]:
        """The bytes the inspection read, or (in a new process) the same ranges read again."""
        kept = _kept_header(version.key)
        if kept is not None:
            return kept
        pieces = []
        head_end = min(version.size, inspection.HEAD_BYTES) - 1
        tail_start = max(head_end + 1, version.size - inspection.TAIL_BYTES)
        for start, end in ((0, head_end), (tail_start, version.size - 1)):
            if start <= end:
                reply = cloud.with_backoff(self.clients.object_storage.get_object, version.namespace,
                                           version.bucket, version.name, range=f"bytes={start}-{end}",
                                           if_match=version.etag)
                pieces.append((start, reply.data.content))
        return pieces

    def found_volumes(self, version: ObjectVersion) -> list[FoundVolume]:
        volumes = cloud.find_volumes(self.clients, self.settings.compartment_id,
                                     {contract.TAG_IMPORT_ID: version.import_id})
        return [FoundVolume(v.id, (v.freeform_tags or {}).get(contract.TAG_STATE), v.availability_domain,
                            v.size_in_gbs, v.display_name, (v.freeform_tags or {}).get(contract.TAG_FLOW_RUN),
                            v.time_created.isoformat() if v.time_created else "",
                            _position((v.freeform_tags or {}).get(contract.TAG_DISK)))
                for v in volumes]

    def _competitor(self, found: Sequence[FoundVolume], own: FoundVolume | None = None) -> FoundVolume | None:
        """A volume of this import that another live run is writing: the run this one yields to.

        When two runs have created volumes, the one whose volume the service created first
        goes on; both runs see the same creation times, so exactly one yields.
        """
        rivals = [v for v in found if v.state == contract.STATE_WRITING and v.flow_run and v.flow_run != self.run_id
                  and (own is None or (v.created, v.id) < (own.created, own.id)) and self.run_is_active(v.flow_run)]
        return rivals[0] if rivals else None

    @step("find-previous-import")
    def previous_imports(self, version: ObjectVersion, force: bool = False) -> PreviousImports:
        """What other runs of this import did. Waits while another live run writes the same version.

        Returns the imported volume to reuse (none with ``force``) and volumes left half
        written by runs that are gone, which this run resumes.
        """
        deadline = time.monotonic() + self.competing_wait_seconds
        while True:
            found = self.found_volumes(version)
            imported = next((v for v in found if v.state == contract.STATE_IMPORTED), None)
            competitor = self._competitor(found)
            if competitor is None or (imported is not None and not force):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {competitor.flow_run} has been importing this object version "
                                   f"(volume {competitor.id}) for longer than {self.competing_wait_seconds:.0f}s "
                                   "that this run waits; retry this run once it has ended")
            self.log.info("flow run %s is importing this object version (volume %s); waiting for it",
                          competitor.flow_run, competitor.id)
            time.sleep(self.competing_poll_seconds)
        resumable = () if force else tuple(
            v for v in found if v.state == contract.STATE_WRITING
            and (v.flow_run == self.run_id or not self.run_is_active(v.flow_run or "")))
        return PreviousImports(None if force else imported, resumable, force)

    def availability_domains(self, ad_number: int | None) -> list[str]:
        identity = self.clients.identity
        names = [ad.name for ad in cloud.with_backoff(identity.list_availability_domains,
                                                      self.shape.compartment_id).data]
        if ad_number is not None:
            if ad_number > len(names):
                raise InvalidRequest("invalid-ad-number", f"ad_number {ad_number} is out of range: the region has "
                                     f"{len(names)} availability domains")
            return [names[ad_number - 1]]
        preferred = [ad for ad in self.shape.availability_domains if ad in names]
        return preferred or names

    # -- resources -------------------------------------------------------------------

    @step("remove-stale-workers")
    def remove_stale_workers(self, version: ObjectVersion) -> list[str]:
        """Terminate worker VMs this import's dead runs (or this run's killed attempt) left,
        and delete the PARs they left on the object.

        Their SSH keys died with the process that made them, so they cannot be used.
        """
        removed = []
        for stale in cloud.find_instances(self.clients, self.shape.compartment_id,
                                          {contract.TAG_IMPORT_ID: version.import_id}):
            owner = (stale.freeform_tags or {}).get(contract.TAG_FLOW_RUN) or ""
            if owner == self.run_id or not self.run_is_active(owner):
                cloud.terminate_worker(self.clients, stale.id)
                removed.append(stale.id)
        self.remove_stale_pars(version)
        return removed

    @step("remove-unfinished-volumes")
    def remove_unfinished_volumes(self, version: ObjectVersion) -> list[str]:
        """Delete the volumes a machine import's dead runs (or this run's killed attempt) left
        half written; those disks are written again. Finished ones are kept and reused."""
        removed = []
        for found in self.found_volumes(version):
            if found.state == contract.STATE_WRITING and (found.flow_run == self.run_id
                                                          or not self.run_is_active(found.flow_run or "")):
                cloud.discard_volume(self.clients, self.settings.compartment_id, found.id, keep=False)
                removed.append(found.id)
        return removed

    def volume_name(self, version: ObjectVersion, options: ImportOptions) -> str:
        if options.display_name:
            return options.display_name
        try:
            return naming.volume_display_name(self.settings.volume_name_template, version.name, version.etag)
        except ValueError as exc:
            raise InvalidRequest("invalid-setting", str(exc)) from None

    def create_volume(self, version: ObjectVersion, availability_domain: str, size_gb: int, name: str,
                      extra_tags: dict[str, str] | None = None) -> Volume:
        """Create the volume (tagged ``writing``) and wait until it is available.

        Its undo is registered as soon as the create returns; a volume whose wait fails is
        deleted at once (the next try creates another, with a new retry token).
        """
        step = f"create-volume/{version.import_id}/{availability_domain}"
        if extra_tags and contract.TAG_DISK in extra_tags:  # a machine's disks: one create each
            step += f"/disk{extra_tags[contract.TAG_DISK]}"
        tags = {**self.tags(version), **(extra_tags or {}), contract.TAG_STATE: contract.STATE_WRITING}
        created = cloud.create_volume(self.clients, self.settings.compartment_id, availability_domain, size_gb,
                                      self.settings.vpus_during_import, name, tags, self.retry_token(step))
        self._register_volume(created.id)
        try:
            ready = cloud.wait_volume_available(self.clients, created.id)
        except BaseException:
            self._discard_now(created.id, step)
            raise
        return Volume(ready.id, ready.availability_domain, ready.size_in_gbs, ready.display_name, fresh=True)

    def target_machine(self) -> TargetMachineLike:
        if self.target is None:
            raise InvalidRequest("no-target-machine", "a bootable machine import needs a TargetMachine block "
                                 "(compartment, subnet, shape and a platform image of the machine's region)")
        return self.target

    def obtain_boot_volume(self, version: ObjectVersion, availability_domain: str, size_gb: int, name: str,
                           extra_tags: dict[str, str]) -> Volume:
        """A boot volume of at least ``size_gb`` for the boot disk, tagged ``writing``.

        OCI makes boot volumes only from images and other boot volumes: an instance is launched
        from the target's platform image with the size asked for, then terminated with its boot
        volume preserved. Each step's undo is registered the moment it exists. The volume holds
        the platform image, not zeros, so the write writes the disk's zeros too.
        """
        target = self.target_machine()
        step = f"boot-volume/{version.import_id}/{availability_domain}"
        maker = cloud.launch_for_boot_volume(
            self.clients, compartment_id=target.compartment_id, availability_domain=availability_domain,
            subnet_id=target.subnet_id, image_id=target.image_id, shape=target.shape, ocpus=target.ocpus,
            memory_in_gbs=target.memory_in_gbs, size_gb=max(cloud.MIN_VOLUME_GB, size_gb),
            display_name=f"boot-volume-for-{version.import_id[:12]}", tags=self.tags(version),
            retry_token=self.retry_token(step))
        undo = self.ledger.register("boot volume maker", maker.id, lambda: cloud.terminate_worker(self.clients, maker.id))
        try:
            running = cloud.wait_instance_running(self.clients, maker.id)
            boot_volume_id = cloud.boot_volume_of(self.clients, running)
            cloud.update_volume(self.clients, boot_volume_id, display_name=name, freeform_tags={
                **self.tags(version), **extra_tags, contract.TAG_STATE: contract.STATE_WRITING})
            cloud.terminate_keeping_boot_volume(self.clients, maker.id)
        except BaseException:
            self._undone(step)
            raise
        self._register_volume(boot_volume_id)
        self.ledger.release(undo)
        ready = cloud.wait_volume_available(self.clients, boot_volume_id)
        return Volume(ready.id, availability_domain, ready.size_in_gbs, ready.display_name, fresh=False)

    def _register_volume(self, volume_id: str) -> Any:
        return self.ledger.register("volume", volume_id, lambda: cloud.discard_volume(
            self.clients, self.settings.compartment_id, volume_id,
            keep=self.settings.keep_failed_volume and not self._yielding))

    def adopt_volume(self, found: FoundVolume) -> Volume:
        """Resume a half-written volume of a dead run: tag it as this run's, undo it like a new one."""
        cloud.tag_volume(self.clients, found.id, {contract.TAG_FLOW_RUN: self.run_id})
        self._register_volume(found.id)
        return found.as_volume()

    def launch_worker(self, version: ObjectVersion, availability_domain: str) -> WorkerVM:
        """Launch a worker VM whose host key is this run's, wait until it runs, learn its address."""
        step = f"launch-worker/{version.import_id}/{availability_domain}"
        shape = self.shape
        instance = cloud.launch_worker(
            self.clients, compartment_id=shape.compartment_id, availability_domain=availability_domain,
            subnet_id=shape.subnet_id, image_id=shape.image_id, shape=shape.shape, ocpus=shape.ocpus,
            memory_in_gbs=shape.memory_in_gbs, boot_volume_size_gb=shape.boot_volume_size_gb,
            assign_public_ip=shape.assign_public_ip, display_name=f"import-worker-{version.import_id[:12]}",
            ssh_public_key=self.client_key.public_openssh, user_data=cloud_init_host_keys(self.host_key),
            tags=self.tags(version), retry_token=self.retry_token(step))
        undo = self.ledger.register("worker VM", instance.id, lambda: cloud.terminate_worker(self.clients, instance.id))
        try:
            cloud.wait_instance_running(self.clients, instance.id)
            address = cloud.worker_address(self.clients, shape.compartment_id, instance.id, shape.assign_public_ip)
        except BaseException:
            self.ledger.release(undo)
            cloud.terminate_worker(self.clients, instance.id, wait=False)
            self._undone(step)
            raise
        return WorkerVM(instance.id, address, availability_domain)

    @step("provision")
    def provision(self, version: ObjectVersion, image: InspectedImage, options: ImportOptions,
                  previous: PreviousImports) -> tuple[WorkerVM, Volume]:
        """The worker VM and the volume, made side by side; the next AD when one is out of capacity.

        A volume left half written by a dead run is resumed in its own AD. Raises
        :class:`CompetingImport` when another live run created its volume at the same time
        and goes on instead of this one, or another run finished the import meanwhile (a run
        may wait long for a worker VM slot; not with ``previous.force``): the caller then looks
        for previous imports again, and returns that volume.
        """
        ads = self.availability_domains(options.ad_number)
        size_gb = cloud.volume_size_gb(image.virtual_size)
        name = self.volume_name(version, options)
        resumable = [v for v in previous.resumable if v.size_in_gbs >= size_gb]
        candidates = [v.availability_domain for v in resumable]
        candidates += [ad for ad in ads if ad not in candidates]
        last_error: Exception | None = None
        for ad in candidates:
            reuse = next((v for v in resumable if v.availability_domain == ad), None)
            with ThreadPoolExecutor(1, thread_name_prefix="provision") as pool:
                create = None if reuse else pool.submit(self.create_volume, version, ad, size_gb, name)
                worker, last_error = self._worker_beside(version, ad, [create] if create else [])
                if worker is None:
                    continue
                volume = self.adopt_volume(reuse) if reuse else create.result()  # type: ignore[union-attr]
            found = self.found_volumes(version)
            own = next((v for v in found if v.id == volume.id), None)
            rival = self._competitor(found, own) if own is not None else None
            # another run may have finished the import while this one waited for a worker VM slot
            rival = rival or (None if previous.force else next(
                (v for v in found if v.state == contract.STATE_IMPORTED and v.id != volume.id), None))
            if rival is not None:
                raise CompetingImport(rival.flow_run or "", rival.id)
            return worker, volume
        raise OutOfCapacity(f"no availability domain had capacity for the worker ({', '.join(candidates)}): "
                            f"{last_error}")

    def _worker_beside(self, version: ObjectVersion, ad: str, creates: Sequence[Future[Volume]]
                       ) -> tuple[WorkerVM | None, OutOfCapacity | None]:
        """Launch the worker VM in ``ad`` while its volumes are created (``creates``); when ``ad``
        has no capacity for the worker, None and why, the volumes made there given up."""
        try:
            return self.launch_worker(version, ad), None
        except OutOfCapacity as exc:
            self.log.warning("%s is out of capacity for the worker shape; trying the next availability domain", ad)
            for create in creates:
                if create.exception() is None:
                    self._discard_now(create.result().id, f"create-volume/{version.import_id}/{ad}")
            return None, exc

    def _discard_now(self, volume_id: str, step: str) -> None:
        """Delete a volume this run just created and is giving up (its next create is a new one)."""
        self.ledger.release(self.ledger.find("volume", volume_id))
        cloud.discard_volume(self.clients, self.settings.compartment_id, volume_id, keep=False)
        self._undone(step)

    def session(self, worker: WorkerVM) -> WorkerSession:
        """An SSH session to the worker VM that accepts only the host key this run gave it."""
        return WorkerSession(worker.address, self.shape.ssh_port, self.shape.ssh_user, self.client_key,
                             self.host_key, sudo=self.shape.use_sudo)

    @step("prepare-worker")
    def prepare_worker(self, session: WorkerSession) -> str:
        """Connect (retrying while the VM boots) and make sure its tools are there; qemu-img's version."""
        session.connect(timeout=self.shape.boot_timeout_seconds)
        return transfer.ensure_tools(session)

    def volume_write(self, session: WorkerSession, worker: WorkerVM, volume: Volume, version: ObjectVersion,
                     image: InspectedImage) -> "VolumeWrite":
        return VolumeWrite(self, session, worker, volume, version, image)

    @step("finish-volume")
    def finish_volume(self, volume: Volume, options: ImportOptions) -> FinishedVolume:
        """Set the volume's lasting performance and backup policy, tag it imported: it is ready.

        From here on the volume is the product, no longer this run's to remove.
        """
        return self._finish_volume(volume, options)

    @step("finish-volumes")
    def finish_volumes(self, volumes: Sequence[Volume], options: ImportOptions) -> list[FinishedVolume]:
        """A machine's volumes finished side by side (each as :meth:`finish_volume`); the step counts
        the time they took together."""
        with ThreadPoolExecutor(max(1, len(volumes)), thread_name_prefix="finish-volume") as pool:
            return list(pool.map(lambda volume: self._finish_volume(volume, options), volumes))

    def _finish_volume(self, volume: Volume, options: ImportOptions) -> FinishedVolume:
        vpus = options.vpus if options.vpus is not None else self.settings.vpus_after_import
        policy = options.backup_policy or self.settings.backup_policy
        cloud.set_volume_performance(self.clients, volume.id, vpus)
        policy_id = None
        if policy:
            policy_id = cloud.backup_policy_id(self.clients, policy)
            cloud.assign_backup_policy(self.clients, volume.id, policy_id)
        cloud.tag_volume(self.clients, volume.id, {contract.TAG_STATE: contract.STATE_IMPORTED})
        self.ledger.release(self.ledger.find("volume", volume.id))
        return FinishedVolume(vpus, policy_id)

    @step("terminate-worker")
    def terminate_worker(self, worker: WorkerVM) -> None:
        """Terminate the worker VM (and its boot volume) now that its work is done."""
        undo = self.ledger.find("worker VM", worker.id)
        if undo is not None:
            self.ledger.undo(undo)
        else:
            cloud.terminate_worker(self.clients, worker.id)

    def summary(self, version: ObjectVersion, image: InspectedImage, volume: Volume, finished: FinishedVolume,
                written: WriteResult, checks: Sequence[filesystems.FilesystemCheck], qemu_img: str,
                ready_at: dt.datetime) -> dict[str, Any]:
        """The finished import's account: the flow run's result, and what its summary shows."""
        return {
            "import_id": version.import_id, "object": version.name, "bucket": version.bucket,
            "namespace": version.namespace, "etag": version.etag, "format": image.format,
            "virtual_size": image.virtual_size, "object_bytes": version.size, "volume_id": volume.id,
            "volume_size_gb": volume.size_in_gbs, "availability_domain": volume.availability_domain,
            "resumed": not volume.fresh, "vpus_per_gb": finished.vpus_per_gb,
            "backup_policy_id": finished.backup_policy_id, "qemu_img": qemu_img,
            "bytes_written": written.virtual_size, "fetched_bytes": written.fetched_bytes,
            "transfer_seconds": written.seconds, "write_phases": written.phases,
            "verified_bytes": written.verified_bytes, "write_slices": written.slices,
            "transfer_retries": written.retries, "ready_at": ready_at.isoformat(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "steps": dict(self.steps), "filesystems": [dataclasses.asdict(c) for c in checks], "reused": False,
        }

    @step("write-disks")
    def write_disks(self, writes: dict[int, "VolumeWrite"],
                    start: Callable[["VolumeWrite"], Callable[[], T]]) -> dict[int, T]:
        """Every disk of a machine at once: ``start`` sets one off and returns what waits for it.

        The step counts the time the disks took side by side; each disk's own steps are in its
        ``steps`` (the importer's ``steps`` add them up across the disks)."""
        waits = {position: start(write) for position, write in writes.items()}
        return {position: wait() for position, wait in waits.items()}

    def machine_summary(self, version: ObjectVersion, described: machine.Machine,
                        disks: Sequence[tuple[ObjectVersion, InspectedImage]], volumes: Sequence[Volume],
                        written: dict[int, Any], group_id: str, qemu_img: str | None,
                        ready_at: dt.datetime) -> dict[str, Any]:
        """A machine import's account: the machine as described, and each disk with its volume."""
        rows = []
        for position, ((disk_version, image), volume) in enumerate(zip(disks, volumes)):
            done = written.get(position)
            steps = dict(done["steps"]) if done else {}
            rows.append({
                "position": position, "name": described.disks[position].name,
                "object": disk_version.name, "file": described.disks[position].file, "format": image.format,
                "virtual_size": image.virtual_size, "volume_id": volume.id, "volume_size_gb": volume.size_in_gbs,
                "digest_checked": image.digest is not None, "reused": done is None,
                "fetched_bytes": done["written"].fetched_bytes if done else 0,
                "transfer_seconds": round(done["written"].seconds, 3) if done else 0.0,
                "seconds": round(sum(steps.values()), 3), "steps": steps,
                "filesystems": [dataclasses.asdict(c) for c in done["checks"]] if done else []})
        disk_steps = {name for row in rows for name in row["steps"]}
        return {
            "import_id": version.import_id, "object": version.name, "bucket": version.bucket,
            "namespace": version.namespace, "etag": version.etag, "machine": described.summary(),
            "volume_group_id": group_id, "availability_domain": volumes[0].availability_domain,
            "disks": rows, "qemu_img": qemu_img, "ready_at": ready_at.isoformat(), "reused": not written,
            # the machine's own steps; its disks' (which ran side by side) are in their rows
            "steps": {name: seconds for name, seconds in self.steps.items() if name not in disk_steps},
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }

    @staticmethod
    def reused_summary(version: ObjectVersion, volume: FoundVolume) -> dict[str, Any]:
        """The result of a run that found the object version imported already (by itself or another run)."""
        return {"import_id": version.import_id, "object": version.name, "bucket": version.bucket,
                "namespace": version.namespace, "etag": version.etag, "volume_id": volume.id,
                "volume_size_gb": volume.size_in_gbs, "availability_domain": volume.availability_domain,
                "imported_by_run": volume.flow_run, "reused": True}

    # -- a bootable machine ------------------------------------------------------------

    def choose_firmware(self, described: machine.Machine, detected: boot.Firmware | None,
                        boot_volume: str) -> boot.Firmware:
        """The firmware to launch with: the target block's, the OVF's or manifest's, the disk's
        (as detected now, or by the run that wrote it, from the boot volume's tag), else BIOS."""
        target = self.target_machine()
        if target.firmware != "auto":
            return boot.Firmware(target.firmware, "target", "set in the TargetMachine block")
        if described.firmware:
            return boot.Firmware(described.firmware, "ovf" if described.source != "manifest" else "manifest",
                                 f"given by the {described.source}")
        if detected is None:
            tagged = (cloud.get_volume(self.clients, boot_volume).freeform_tags or {}).get(contract.TAG_FIRMWARE)
            if tagged:
                return boot.Firmware(tagged, "disk", "detected when the boot disk was written")
        if detected is not None and detected.firmware:
            return detected
        why = detected.reason if detected is not None else "the boot disk was not examined"
        return boot.Firmware(boot.BIOS, "default", f"not detected ({why}); BIOS assumed")

    @step("launch-machine")
    def launch_machine(self, version: ObjectVersion, described: machine.Machine, volumes: Sequence[Volume],
                       firmware: boot.Firmware) -> Any:
        """Start the machine from its boot volume, its data volumes attached in disk order at
        consistent device paths. A repeat finds the instance an earlier attempt started."""
        target = self.target_machine()
        # Not the run's tags: the machine is the product, which no cleanup or sweep may take for a worker VM.
        tags = {contract.TAG_MACHINE: described.name[:255], contract.TAG_MACHINE_OF: version.import_id}
        found = cloud.find_instances(self.clients, target.compartment_id, {contract.TAG_MACHINE_OF: version.import_id})
        if found:
            instance = found[0]
        else:
            step = f"launch-machine/{version.import_id}"
            ocpus = described.hints.get("ocpus", target.ocpus) if described.shape else target.ocpus
            memory = described.hints.get("memory_gbs", target.memory_in_gbs) if described.shape else target.memory_in_gbs
            instance = cloud.launch_machine(
                self.clients, compartment_id=target.compartment_id, availability_domain=volumes[0].availability_domain,
                subnet_id=target.subnet_id, boot_volume_id=volumes[0].id, shape=described.shape or target.shape,
                ocpus=ocpus, memory_in_gbs=memory, firmware=firmware.firmware or boot.BIOS,
                boot_volume_type=target.boot_volume_type, network_type=target.network_type,
                display_name=described.name, tags=tags, retry_token=self.retry_token(step))
        undo = self.ledger.register("machine instance", instance.id,
                                    lambda: cloud.terminate_keeping_boot_volume(self.clients, instance.id))
        cloud.wait_instance_running(self.clients, instance.id)
        for volume in volumes[1:]:
            if cloud.existing_attachment(self.clients, instance.id, volume.id) is None:
                made = cloud.attach_volume(self.clients, instance.id, volume.id, "paravirtualized",
                                           self.retry_token(f"attach-to-machine/{volume.id}"))
                cloud.wait_attached(self.clients, made.id)
        self.ledger.release(undo)  # the machine is the product now
        return cloud.with_backoff(self.clients.compute.get_instance, instance.id).data

    @step("boot-check")
    def check_boot(self, instance_id: str, volumes: Sequence[Volume]) -> boot.BootCheck:
        """Watch the machine's serial console (OCI's console history) for its boot milestone.
        With ``boot_check: require`` a machine that does not show it is stopped, its volumes
        kept and tagged, and the run fails (``machine-did-not-boot``)."""
        target = self.target_machine()
        checked = boot.watch_console(lambda: cloud.console_text(self.clients, instance_id), target.boot_pattern,
                                     target.boot_timeout_seconds, target.console_poll_seconds)
        result = "booted" if checked.booted else "not-booted"
        for volume in volumes:
            cloud.tag_volume(self.clients, volume.id, {contract.TAG_BOOT: result})
        if not checked.booted and target.boot_check == "require":
            cloud.stop_instance(self.clients, instance_id)
            raise BootFailed("machine-did-not-boot", f"instance {instance_id} {checked.describe()}; "
                             "it is stopped, its volumes are kept")
        return checked

    def par_name(self, version: ObjectVersion, part: str = "") -> str:
        """The name of this run's PAR for the object (``part``: which byte range, for a machine's
        disks in one OVA, whose transfers each have a PAR): a PAR lost by a failed create is
        found and deleted by its name, which must not be another live transfer's."""
        return f"{self._par_prefix(version)}{self.run_id}-{self.retry_token('par' + part)[:12]}"

    @staticmethod
    def _par_prefix(version: ObjectVersion) -> str:
        return f"oci-disk-import-{version.import_id[:24]}-"

    def remove_stale_pars(self, version: ObjectVersion) -> list[str]:
        """Delete the PARs this import's dead runs (or this run's killed attempt) left on the
        object: a bearer secret nobody will use again. The run is in each PAR's name."""
        removed = []
        prefix = self._par_prefix(version)
        for par in cloud.pars_of(self.clients, version.namespace, version.bucket, version.name):
            owner = par.name[len(prefix):-13] if par.name.startswith(prefix) else None
            if owner and (owner == self.run_id or not self.run_is_active(owner)):
                cloud.delete_par(self.clients, version.namespace, version.bucket, par.id)
                removed.append(par.id)
        return removed


class VolumeWrite:
    """Write one object onto one volume on one worker VM: attach, write and verify, check, detach.

    The steps are methods so an orchestrator can run (and retry) each; :meth:`run` does all
    of them. Several writes may share a worker VM and its session at once.
    """

    def __init__(self, importer: Importer, session: WorkerSession, worker: WorkerVM, volume: Volume,
                 version: ObjectVersion, image: InspectedImage) -> None:
        self.importer = importer
        self.session = session
        self.worker = worker
        self.volume = volume
        self.version = version
        self.image = image
        self.attachment: Attachment | None = None
        self.device: str | None = None
        self.staging: str | None = None
        self.result: WriteResult | None = None
        self.firmware: boot.Firmware | None = None  # a boot volume's disk: what it boots by
        self.steps: dict[str, float] = {}  # this disk's steps (the importer's count every disk's)
        self._undos: list[Undo] = []  # the attachment's, then the iSCSI session's

    @property
    def clients(self) -> cloud.Clients:
        return self.importer.clients

    @property
    def _part(self) -> str:
        """Which part of the object this write reads: an OVA's disk is a byte range of it."""
        return f"@{self.image.inner_offset}" if self.image.container == "tar" else ""

    def attach(self) -> str:
        """Attach the volume (registering its detach) and return its device on the worker VM."""
        importer, ledger = self.importer, self.importer.ledger
        with importer._attach_lock:  # one free device path per attachment
            found = cloud.existing_attachment(self.clients, self.worker.id, self.volume.id)
            made = found or cloud.attach_volume(self.clients, self.worker.id, self.volume.id,
                                                importer.shape.attachment_type,
                                                importer.retry_token(f"attach/{self.volume.id}"))
        self._undos.append(ledger.register("attachment", made.id, lambda: cloud.detach_volume(self.clients, made.id)))
        ready = cloud.wait_attached(self.clients, made.id)
        self.attachment = Attachment(ready.id, self.volume.id, self.worker.id, ready.attachment_type, ready.device,
                                     getattr(ready, "iqn", None), getattr(ready, "ipv4", None),
                                     getattr(ready, "port", None))
        if self.attachment.type == "iscsi":
            target = self._iscsi_target()
            self.device = iscsi.login(self.session, target)
            self._undos.append(ledger.register("iscsi session", target.iqn, lambda: iscsi.logout(self.session, target)))
        else:
            self.device = ready.device
        assert self.device is not None
        return self.device

    def _iscsi_target(self) -> iscsi.IscsiTarget:
        assert self.attachment is not None and self.attachment.iqn and self.attachment.ipv4
        return iscsi.IscsiTarget(self.attachment.iqn, self.attachment.ipv4, int(self.attachment.port or 3260))

    @step("write")
    def write(self, progress: TransferProgress | None = None) -> WriteResult:
        """Stream the object onto the worker VM while qemu-img writes it, verifying each slice.

        The worker fetches the object through a short-lived read-only PAR with parallel
        ranged GETs (minus the head and tail the inspection read, handed over); qemu-img
        reads it over NBD as it arrives, or, for a streamOptimized VMDK, the streamer decodes
        it onto the device itself. The volume is attached while the first bytes arrive. The
        worker's copy of the image (``staging``) stays for :meth:`check`.
        """
        importer, version, session = self.importer, self.version, self.session
        settings = importer.settings
        qemu = QemuImg(session)
        phases: dict[str, float] = {}
        stream: transfer.ObjectStream | None = None
        image = self.image
        inner = (transfer.Inner(image.container, image.inner_offset, image.inner_size)
                 if image.container and image.inner_size is not None else None)
        image_bytes = inner.size if inner is not None else version.size
        pieces = importer.header_pieces(version)
        decode = self._decode(pieces, inner)
        window = None if decode is not None else self._window(pieces, inner, image_bytes)
        # a compressed object is fetched into memory: beside the image only the pieces handed over are kept
        kept_bytes = image_bytes + (sum(len(data) for _, data in pieces)
                                    if inner is not None and inner.container != "tar" else 0)
        if decode is not None:  # decoded in memory onto the device: the staging file holds the pieces
            kept_bytes = sum(len(data) for _, data in pieces)
        elif window is not None:  # the staging file holds the window (punched out behind it), not the image
            kept_bytes = min(kept_bytes, sum(len(data) for _, data in pieces) + window.behind + window.ahead
                             + 128 * slices.MiB)
        staging = transfer.make_staging_dir(session, version.import_id, kept_bytes)
        par_id, access_uri = cloud.read_only_par(self.clients, version.namespace, version.bucket, version.name,
                                                 PAR_LIFETIME, importer.par_name(version, self._part))
        par = importer.ledger.register("PAR", par_id, lambda: cloud.delete_par(
            self.clients, version.namespace, version.bucket, par_id))
        kept = False
        try:
            url = self.clients.object_storage.base_client.endpoint.rstrip("/") + access_uri
            with _phase(phases, "start-transfer"):
                stream = transfer.start_stream(
                    session, session, url, version.etag, version.size, staging, pieces,
                    transfer.TransferSettings(connections=settings.transfer_connections,
                                              chunk_bytes=settings.transfer_chunk_mib * 1024 * 1024),
                    on_event=progress.event if progress else None, inner=inner, digest=image.digest,
                    window=window, decode=decode)
            try:
                if stream.decoding:
                    device, virtual_size, fetched, verified = self._write_decoded(stream, phases)
                else:
                    device, virtual_size, fetched, verified = self._write_slices(stream, qemu, phases, progress,
                                                                                 image_bytes)
            except Exception as exc:
                # qemu-img's read error may be the first sign of a refusal the transfer holds (a bomb,
                # a digest that does not match): the transfer may have ended before qemu-img connected
                stream.abort()
                refused = stream.refusal()
                if refused is None:
                    raise
                raise refused from exc
            unit, how = (("runs", ", decoded as it arrived") if stream.decoding else
                         ("slices", f", through a window ({fetched['refetched_bytes']} bytes fetched again)")
                         if stream.windowed else ("slices", ""))
            stream = None
            importer.ledger.undo(par)
            if progress:
                progress.done()
            importer.log.info("wrote and verified %s (%s, %d bytes virtual, %d %s); fetched %d bytes in %.1fs "
                              "with %d retries%s", version.name, self.image.format, virtual_size, verified["slices"],
                              unit, fetched["fetched_bytes"], fetched["seconds"], fetched["retries"], how)
            self.staging = staging
            kept = True
            self.result = WriteResult(device, virtual_size, version.size, fetched["fetched_bytes"],
                                      fetched["seconds"], fetched["retries"], verified["verified_bytes"],
                                      verified["slices"], phases)
            return self.result
        finally:
            if stream is not None:
                stream.abort()
            if not par.done:
                importer.ledger.undo(par)
            if not kept:
                transfer.remove_staging(session, staging)

    def _write_slices(self, stream: transfer.ObjectStream, qemu: QemuImg, phases: dict[str, float],
                      progress: TransferProgress | None,
                      image_bytes: int) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
        """qemu-img writes the image from the stream (NBD) slice by slice, comparing each behind the write."""
        with _phase(phases, "second-opinion"):
            info = transfer.second_opinion(qemu, stream.nbd_url, self.image.format, self.image.virtual_size,
                                           self.image.driver)
        with _phase(phases, "attach"):
            device = self.attach()
        writer = slices.SliceWriter(self.session, qemu, self.image.qemu_driver, info.virtual_size, stream.socket,
                                    stream.path, device, target_is_zero=self.volume.fresh,
                                    on_progress=progress.written if progress else None,
                                    direct_io=not slices.compressed_grains(self.image.format, info),
                                    image_bytes=image_bytes, windowed=stream.windowed)
        with _phase(phases, "write-and-verify"):
            fetched = writer.write(stream.finish)
        return device, info.virtual_size, fetched, writer.summary()

    def _write_decoded(self, stream: transfer.ObjectStream,
                       phases: dict[str, float]) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
        """The streamer decodes the VMDK onto the device as it arrives, reading back every run it writes."""
        with _phase(phases, "attach"):
            device = self.attach()
        stream.use_device(device)
        with _phase(phases, "write-and-verify"):
            fetched = stream.finish()
        decoded = fetched["decoded"]
        return device, self.image.virtual_size, fetched, {
            "slices": decoded["batches"], "verified_bytes": decoded["verified"] + decoded["gaps_checked"]}

    def _decode(self, pieces: Sequence[tuple[int, bytes]], inner: transfer.Inner | None) -> transfer.Decode | None:
        """A streamOptimized VMDK (alone, or a tar's member) is decoded by the streamer as it arrives.

        Its grains come in order, each with a marker that says where it goes: the streamer
        inflates each once and writes it onto the device (streamer.VmdkStream), with no staging
        copy, no NBD and no qemu-img, which on a busy worker read each grain two or three times.
        """
        if not transfer.stream_optimized_header(self._vmdk_header(pieces, inner)):
            return None
        return transfer.Decode(self.image.virtual_size, self.volume.fresh)

    def _vmdk_header(self, pieces: Sequence[tuple[int, bytes]], inner: transfer.Inner | None) -> bytes:
        """The first sector of a VMDK (alone, or a tar's member) from the pieces the inspection read; else b""."""
        if self.image.format != "vmdk" or (inner is not None and inner.container != "tar"):
            return b""
        start = inner.offset if inner is not None else 0
        return next((data[start - at:start - at + 512] for at, data in pieces if at <= start < at + len(data)), b"")

    def _window(self, pieces: Sequence[tuple[int, bytes]], inner: transfer.Inner | None,
                image_bytes: int) -> transfer.Window | None:
        """A streamOptimized VMDK (alone, or a tar's member) is staged through a window, not whole.

        Its slices' comparisons follow their writes closely and read the same bytes, so the
        staging file need only hold a few slices: the streamer punches out what the readers
        have passed (streamer.Window), and the image does not grow the worker's memory (or
        disk) by its whole size, which on a busy worker costs more than the write itself.
        """
        if not transfer.compressed_grains_header(self._vmdk_header(pieces, inner)):
            return None
        sizes = slices.window_for(self.image.virtual_size, image_bytes)
        return None if sizes is None else transfer.Window(*sizes)

    @step("check-volume")
    def check(self) -> list[filesystems.FilesystemCheck]:
        """The written disk must not be an image itself, and every filesystem must check clean.

        Both checks only read the device and run side by side; the worker's copy of the
        image is removed meanwhile.
        """
        assert self.result is not None, "check() follows write()"
        device, size = self.result.device, self.result.virtual_size
        with ThreadPoolExecutor(2, thread_name_prefix="check-volume") as pool:
            not_nested = pool.submit(nested.check_not_nested, self.session, device, size)
            checked = pool.submit(filesystems.check_device, self.session, device, size)
            try:
                if self.staging is not None:
                    transfer.remove_staging(self.session, self.staging)
                    self.staging = None
            finally:
                results = checked.result()
                not_nested.result()
        filesystems.refuse(results, self.importer.settings.unchecked_filesystems)
        if cloud.is_boot_volume(self.volume.id):
            self.firmware = boot.detect_firmware(lambda start, length: read_range(self.session, device, start, length))
            if self.firmware.firmware:
                cloud.tag_volume(self.clients, self.volume.id, {contract.TAG_FIRMWARE: self.firmware.firmware})
        return results

    @step("detach")
    def detach(self) -> None:
        """Log out of an iSCSI target, then detach the volume from the worker VM."""
        while self._undos:
            undo = self._undos.pop()
            if not undo.done:
                self.importer.ledger.undo(undo)

    def run(self, progress: TransferProgress | None = None) -> tuple[WriteResult, list[filesystems.FilesystemCheck]]:
        result = self.write(progress)
        checks = self.check()
        self.detach()
        return result, checks


class _phase:
    """Adds the seconds a block takes to ``phases[name]``."""

    def __init__(self, phases: dict[str, float], name: str) -> None:
        self.phases, self.name = phases, name

    def __enter__(self) -> None:
        self.start = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.phases[self.name] = round(self.phases.get(self.name, 0.0) + time.monotonic() - self.start, 3)
