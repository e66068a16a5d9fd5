"""Writing one object onto one volume on one worker VM: attach, stream, write and verify, check, detach.

A :class:`VolumeWrite` is the unit an import repeats: one for a disk, one per disk for a
machine, several at once on one worker VM and its session. Its steps are methods so an
orchestrator can run (and retry) each; :meth:`VolumeWrite.run` does all of them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, Sequence

from . import cloud, contract, delta, sync_backups
from .agent import manifest
from .contract import InvalidRequest
from .delta import apply
from .guest import adaptation, boot, filesystems, report as guest_report
from .images import nested
from .worker_vm import iscsi, slices, transfer
from .worker_vm.commands import CommandFailed, read_range
from .worker_vm.qemu_img import QemuImg, image_opts
from .worker_vm.sync_target import SyncTarget
from .records import Attachment, InspectedImage, ObjectVersion, Volume, WorkerVM, WriteResult
from .run import Run, phase, step
from .ledger import Undo
from .worker_vm.session import WorkerSession

PAR_LIFETIME = dt.timedelta(hours=2)


class TransferProgress(Protocol):
    """Where a write reports progress: transfer events, percent written, the end."""

    def event(self, event: dict[str, Any]) -> None: ...

    def written(self, percent: float) -> None: ...

    def done(self) -> None: ...


class VolumeWrite:
    """Write one object onto one volume on one worker VM: attach, write and verify, check, detach.

    The steps are methods so an orchestrator can run (and retry) each; :meth:`complete` does all
    of them. Several writes may share a worker VM and its session at once.
    """

    keeps_own_steps = True  # a machine's disks run side by side: each counts its own steps too

    def __init__(self, run: Run, session: WorkerSession, worker: WorkerVM, volume: Volume,
                 version: ObjectVersion, image: InspectedImage) -> None:
        self.run = run
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
        self.checks: list[filesystems.FilesystemCheck] = []
        self.inspects_guest = False  # a bootable machine's boot disk: its guest is inspected before the detach
        self.adapt_guest = "off"     # "auto": an inspected Linux guest is adapted to OCI, then inspected again
        self.guest: guest_report.GuestReport | None = None
        self.steps: dict[str, float] = {}  # this disk's steps (the run's count every disk's)
        self.records_manifest = False  # a sync-mode import: the manifest of what the volume holds is stored
        self._undos: list[Undo] = []  # the attachment's, then the iSCSI session's

    @property
    def clients(self) -> cloud.Clients:
        return self.run.clients

    @property
    def _part(self) -> str:
        """Which part of the object this write reads: an OVA's disk is a byte range of it."""
        return f"@{self.image.inner_offset}" if self.image.container == "tar" else ""

    def attach(self) -> str:
        """Attach the volume (registering its detach) and return its device on the worker VM."""
        ledger = self.run.ledger
        ready, attached = self.run.attach(self.worker, self.volume.id)
        self._undos.append(attached)
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
        reads it over NBD as it arrives, or, for a streamOptimized VMDK, the agent decodes
        it onto the device itself. The volume is attached while the first bytes arrive. The
        worker's copy of the image (``staging``) stays for :meth:`check`.
        """
        run, version, session = self.run, self.version, self.session
        settings = run.settings
        qemu = QemuImg(session)
        phases: dict[str, float] = {}
        stream: transfer.ObjectStream | None = None
        image = self.image
        inner = (transfer.Inner(image.container, image.inner_offset, image.inner_size)
                 if image.container and image.inner_size is not None else None)
        image_bytes = inner.size if inner is not None else version.size
        pieces = run.objects.header_pieces(version)
        # a sync writes through the sync target, which only qemu-img's slices reach
        decode = None if self.volume.synced_from is not None else self._decode(pieces, inner)
        window = None if decode is not None or image.delta_base else self._window(pieces, inner, image_bytes)
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
                                                 PAR_LIFETIME, run.par_name(version.subject, self._part))
        par = run.ledger.register("PAR", par_id, lambda: cloud.delete_par(
            self.clients, version.namespace, version.bucket, par_id))
        kept = False
        try:
            url = self.clients.object_storage.base_client.endpoint.rstrip("/") + access_uri
            with phase(phases, "start-transfer"):
                stream = transfer.start_stream(
                    session, session, url, version.etag, version.size, staging, pieces,
                    transfer.TransferSettings(connections=settings.transfer_connections,
                                              chunk_bytes=settings.transfer_chunk_mib * 1024 * 1024),
                    on_event=progress.event if progress else None, inner=inner, digest=image.digest,
                    window=window, decode=decode)
            try:
                if image.delta_base is not None:
                    device, virtual_size, fetched, verified = self._write_delta(stream, qemu, phases)
                elif stream.decoding:
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
            if self.records_manifest:
                with phase(phases, "record-manifest"):
                    self._record_manifest(stream, device, virtual_size, verified.pop("client_manifest", None))
            unit, how = (("runs", ", decoded as it arrived") if stream.decoding else
                         ("slices", f", through a window ({fetched['refetched_bytes']} bytes fetched again)")
                         if stream.windowed else ("slices", ""))
            stream = None
            run.ledger.undo(par)
            if progress:
                progress.done()
            run.log.info("wrote and verified %s (%s, %d bytes virtual, %d %s); fetched %d bytes in %.1fs "
                              "with %d retries%s", version.name, self.image.format, virtual_size, verified["slices"],
                              unit, fetched["fetched_bytes"], fetched["seconds"], fetched["retries"], how)
            synced = verified.get("synced")
            if synced is not None:
                run.log.info("synced from version %s: %d bytes written and %d zeroed of %d compared; %d unchanged",
                             self.volume.synced_from, synced["written"], synced["zeroed"], synced["compared"],
                             synced["unchanged"])
                cloud.tag_volume(self.clients, self.volume.id, {contract.TAG_VIRTUAL_SIZE: str(virtual_size)})
            self.staging = staging
            kept = True
            self.result = WriteResult(device, virtual_size, version.size, fetched["fetched_bytes"],
                                      fetched["seconds"], fetched["retries"], verified["verified_bytes"],
                                      verified["slices"], phases, synced)
            return self.result
        finally:
            if stream is not None:
                stream.abort()
            if not par.done:
                run.ledger.undo(par)
            if not kept:
                transfer.remove_staging(session, staging)

    def _write_slices(self, stream: transfer.ObjectStream, qemu: QemuImg, phases: dict[str, float],
                      progress: TransferProgress | None,
                      image_bytes: int) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
        """qemu-img writes the image from the stream (NBD) slice by slice, comparing each behind the write."""
        with phase(phases, "second-opinion"):
            info = transfer.second_opinion(qemu, stream.nbd_url, self.image.format, self.image.virtual_size,
                                           self.image.driver)
        with phase(phases, "attach"):
            device = self.attach()
        sync = None
        if self.volume.synced_from is not None:
            self._await_backup(phases)
            sync = SyncTarget(self.session, self.session, stream.script, stream.directory, device).start()
        writer = slices.SliceWriter(self.session, qemu, self.image.qemu_driver, info.virtual_size, stream.socket,
                                    stream.path, device, target_is_zero=self.volume.fresh,
                                    on_progress=progress.written if progress else None,
                                    direct_io=not slices.compressed_grains(self.image.format, info),
                                    image_bytes=image_bytes, windowed=stream.windowed,
                                    sync_socket=sync.socket if sync else None)
        with phase(phases, "write-and-verify"):
            try:
                fetched = writer.write(stream.finish)
                if sync is not None:
                    self._zero_tail(qemu, sync, info.virtual_size)
            except BaseException:
                if sync is not None:
                    with contextlib.suppress(Exception):  # the write's failure is the news
                        sync.stop(timeout=60)
                raise
            account = sync.stop() if sync is not None else None
        summary = writer.summary()
        return device, info.virtual_size, fetched, {**summary, "synced": account} if account else summary

    def _write_delta(self, stream: transfer.ObjectStream, qemu: QemuImg,
                     phases: dict[str, float]) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
        """A delta upload (:mod:`diskimport.delta.apply`): the overlay staged whole and checked, its
        clusters committed onto the volume, the result checked against the client's manifest."""
        version, image, clients = self.version, self.image, self.clients
        assert image.delta_base is not None
        if image.virtual_size < (self.volume.previous_virtual_size or 0):
            raise InvalidRequest("delta-base-mismatch", f"the delta's disk ({image.virtual_size} bytes) is smaller "
                                 f"than the version the volume holds ({self.volume.previous_virtual_size}): a "
                                 "disk that shrank is pushed whole (--full)")
        expected = apply.client_manifest(clients, version.namespace, version.bucket, version.name,
                                         version.metadata, image.virtual_size)
        base = None
        if self.volume.manifest is not None:  # an import left the volume whole: only what the delta holds is read
            base = apply.read_manifest(clients, version.namespace, version.bucket,
                                       delta.manifest_object(image.delta_base), self.volume.manifest,
                                       image.virtual_size, f"the manifest of import {image.delta_base} (the one "
                                       f"volume {self.volume.id} was tagged with)", "delta-base-mismatch")
        with phase(phases, "fetch-delta"):
            fetched = stream.finish()
        with phase(phases, "second-opinion"):
            transfer.delta_opinion(qemu, stream.path, image.virtual_size, delta.backing_name(image.delta_base),
                                   apply.overlay_node(stream.path))
        with phase(phases, "attach"):
            device = self.attach()
        extents = apply.touched_extents(self.session, stream.path, image.virtual_size)
        self._await_backup(phases)
        with phase(phases, "write-and-verify"):
            apply.commit_onto(self.session, stream.path, device)
            read = None if base is None else apply.blocks_of(extents)
            digests = apply.device_digests(self.session, stream.script, stream.directory, device,
                                           image.virtual_size, read)
        apply.check_result(expected, base, digests, read)
        written = sum(length for _, length, zero in extents if not zero)
        zeroed = sum(length for _, length, zero in extents if zero)
        account = {"compared": image.virtual_size, "written": written, "zeroed": zeroed,
                   "unchanged": image.virtual_size - written - zeroed, "delta_bytes": version.size}
        read_bytes = image.virtual_size if read is None else sum(n for _, n in read) * manifest.BLOCK
        return device, image.virtual_size, fetched, {"verified_bytes": read_bytes, "slices": len(read or [0]),
                                                     "synced": account, "client_manifest": expected}

    def _await_backup(self, phases: dict[str, float]) -> None:
        """A sync writes nothing before its backup of the volume is AVAILABLE (it was asked for at provision)."""
        if self.volume.backup_id is not None:
            with phase(phases, "await-backup"):
                sync_backups.wait_backup(self.clients, self.volume.backup_id, self.volume.id)

    def _record_manifest(self, stream: transfer.ObjectStream, device: str, virtual_size: int,
                         verified: apply.Manifest | None) -> None:
        """Store the manifest of what the volume now holds (the client's, checked, or hashed here) and tag
        the volume with its SHA-256: the next delta upload of the object starts from it."""
        version = self.version
        digests = verified.digests if verified is not None else apply.device_digests(
            self.session, stream.script, stream.directory, device, virtual_size, None)
        if verified is None and apply.names_manifest(version.metadata):  # the client's first (whole) push
            verified = apply.client_manifest(self.clients, version.namespace, version.bucket, version.name,
                                             version.metadata, virtual_size)
            apply.check_result(verified, None, digests, None)
        sha = apply.store_manifest(self.clients, version.namespace, version.bucket, version.import_id, virtual_size,
                                   digests)
        cloud.tag_volume(self.clients, self.volume.id, {contract.TAG_MANIFEST: sha})
        if verified is not None:
            apply.remove_uploads(self.clients, version.namespace, version.bucket, version.name, delta.upload_object(
                contract.source_id(version.namespace, version.bucket, version.name), verified.sha256))
        self.run.log.info("the block manifest of %s is %s%s (SHA-256 %s)", self.volume.id,
                          delta.manifest_object(version.import_id), "" if verified else ", hashed on the worker",
                          sha[:16])

    def _zero_tail(self, qemu: QemuImg, sync: SyncTarget, virtual_size: int) -> None:
        """A sync to a smaller disk: what the earlier version held past the new one's end reads as zeros
        again, as on a fresh volume (only where it does not already)."""
        end = self.volume.previous_virtual_size or 0
        if end > virtual_size:
            length = end - virtual_size
            qemu.convert_nodes(image_opts(driver="null-co", size=str(length), **{"read-zeroes": "on"}),
                               slices.format_node("raw", virtual_size, length, **slices.nbd_protocol(sync.socket)),
                               target_is_zero=False)

    def _write_decoded(self, stream: transfer.ObjectStream,
                       phases: dict[str, float]) -> tuple[str, int, dict[str, Any], dict[str, Any]]:
        """The agent decodes the VMDK onto the device as it arrives, reading back every run it writes."""
        with phase(phases, "attach"):
            device = self.attach()
        stream.use_device(device)
        with phase(phases, "write-and-verify"):
            fetched = stream.finish()
        decoded = fetched["decoded"]
        return device, self.image.virtual_size, fetched, {
            "slices": decoded["batches"], "verified_bytes": decoded["verified"] + decoded["gaps_checked"]}

    def _decode(self, pieces: Sequence[tuple[int, bytes]], inner: transfer.Inner | None) -> transfer.Decode | None:
        """A streamOptimized VMDK (alone, or a tar's member) is decoded by the agent as it arrives.

        Its grains come in order, each with a marker that says where it goes: the agent inflates
        each once and writes it onto the device (:class:`diskimport.agent.vmdk.VmdkStream`), with
        no staging copy, no NBD and no qemu-img, which on a busy worker read each grain two or
        three times.
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
        staging file need only hold a few slices: the agent punches out what the readers have
        passed (:class:`diskimport.agent.window.Window`), and the image does not grow the worker's
        memory (or disk) by its whole size, which on a busy worker costs more than the write itself.
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
        filesystems.refuse(results, self.run.settings.unchecked_filesystems)
        self.checks = results
        self.run.log.info("checked %s: %s", self.version.name, "; ".join(
            f"{c.location} {c.filesystem or 'no filesystem'} {c.status}" for c in results) or "no filesystem found")
        if cloud.is_boot_volume(self.volume.id):
            self.firmware = boot.detect_firmware(lambda start, length: read_range(self.session, device, start, length))
            if self.firmware.firmware:
                cloud.tag_volume(self.clients, self.volume.id, {contract.TAG_FIRMWARE: self.firmware.firmware})
        return results

    @step("inspect-guest")
    def inspect_guest(self) -> guest_report.GuestReport:
        """Read the operating system on the written disk (read-only, on the worker) and say for each
        launch mode whether it boots and can be reached (:mod:`diskimport.guest.report`). An
        inspection that cannot run is reported, not fatal: the import is written and checked."""
        assert self.result is not None, "inspect_guest() follows write()"
        try:
            found = guest_report.inspect_guest(self.session, self.result.device, self.checks)
        except (CommandFailed, ValueError) as exc:
            found = guest_report.report_from({"os": {"type": None, "reason": f"the guest inspection failed: {exc}"}})
        self.guest = found
        self.run.log.info("guest: %s; %s", found.name or "no operating system found",
                          "; ".join(v.describe() for v in found.verdicts))
        return found

    @step("adapt-guest")
    def adapt(self) -> guest_report.GuestReport:
        """Adapt the inspected Linux guest to OCI on the worker (:mod:`diskimport.guest.adaptation`)
        and inspect it again, so the launch follows what the guest now holds. A failed adaptation
        has put back what it changed; it fails the run and keeps the volumes as written."""
        assert self.guest is not None and self.result is not None, "adapt() follows inspect_guest()"
        before = self.guest
        try:
            done = adaptation.adapt_guest(self.session, self.result.device, self.checks, before)
        except adaptation.AdaptationFailed:
            self.run.keeps_volumes = True
            raise
        after = guest_report.inspect_guest(self.session, self.result.device, self.checks)
        after.adaptation = done
        self.guest = after
        self.run.log.info("guest adapted in %s s: %d changes; now %s", done.seconds, len(done.changes),
                          "; ".join(v.describe() for v in after.verdicts))
        return after

    @step("detach")
    def detach(self) -> None:
        """Log out of an iSCSI target, then detach the volume from the worker VM."""
        while self._undos:
            undo = self._undos.pop()
            if not undo.done:
                self.run.ledger.undo(undo)

    def complete(self, progress: TransferProgress | None = None
                 ) -> tuple[WriteResult, list[filesystems.FilesystemCheck]]:
        """Every step: written and verified, checked, detached."""
        result = self.write(progress)
        checks = self.check()
        if self.inspects_guest:
            found = self.inspect_guest()
            if found.os_type == "linux":
                if self.adapt_guest == "auto":
                    self.adapt()
                else:
                    found.adaptation = guest_report.Adaptation(self.adapt_guest)
        self.detach()
        return result, checks
