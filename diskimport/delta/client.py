"""``oci-disk-delta push``: upload a disk to be synced onto its volume, only what changed since the last time.

Run it where the disk is (an LVM snapshot of the running source, or an image file)::

    oci-disk-delta push /dev/vg0/db01-snap --bucket disk-images --name app/db01.qcow2

1. It reads the object's current version (HEAD) and the manifest of that version's import
   (``.oci-import/manifests/<import id>``). None: the first push, or the last import was not a
   sync, or it has not finished; then the whole disk is uploaded (still only its non-zero blocks).
2. It hashes the disk in 16 KiB blocks (:mod:`diskimport.agent.manifest`; a sparse file's holes
   are skipped) and keeps the blocks whose digest differs from the manifest's. With
   ``--changed-areas`` (the source's change tracking, :mod:`.areas`) it hashes only those areas
   and takes every other block's digest from the manifest.
3. It writes them as a qcow2 (:mod:`diskimport.delta.qcow2`) whose backing file is named
   ``oci-import:<import id>``: the importer applies it onto that import's volume and nowhere else.
   A block that became zeros is a zero cluster (no data uploaded).
4. It uploads its manifest of the new disk, then the qcow2 under the object's name with
   ``opc-meta-sync: true`` and ``opc-meta-delta-manifest`` (the manifest's SHA-256): the upload
   event starts the sync, which writes the changed blocks and checks the volume against that
   manifest. The qcow2 goes up as a multipart upload with parallel parts, each made from the disk
   as it is sent (no copy of the image is written locally); an interrupted push run again with
   the same disk resumes the upload, sending only the parts not uploaded yet (the upload's id is
   kept in ``--work-dir``).

Progress goes to standard error; the last line on standard output is a JSON summary: bytes
read, changed, uploaded and saved. Exit status 0, or 2 with a one-line reason (and for a refusal
its stable code, ``push-...``).
"""

from __future__ import annotations

import argparse
import array
import base64
import concurrent.futures
import hashlib
import json
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from .. import contract
from ..agent import manifest
from . import areas, backing_name, manifest_object, qcow2, upload_object, METADATA_MANIFEST

MiB = 1024 * 1024
PART_SIZE = 64 * MiB
MAX_PARTS = 10_000  # Object Storage's limit on a multipart upload
assert qcow2.CLUSTER == manifest.BLOCK  # a changed block is one cluster of the delta


class PushRefused(Exception):
    """The push cannot go on: the reason, for the operator, and a stable code (``push-...``)."""

    def __init__(self, message: str, code: str = "push-refused") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeltaPlan:
    data: array.array[int]   # blocks uploaded with their bytes (8 bytes each: a large disk has millions)
    zeros: array.array[int]  # blocks that became zeros (zero clusters)
    base: str | None     # the import id the delta applies onto; None: a whole upload


PLAN_GROUP = 64  # blocks compared at once: an unchanged (or all-zero) 1 MiB of the disk is one comparison


def plan(digests: bytes, base: tuple[dict[str, Any], bytes] | None, base_import: str | None) -> DeltaPlan:
    """The blocks to upload: those that differ from ``base``'s manifest, or all non-zero ones without one."""
    size, width = len(digests), manifest.DIGEST_BYTES
    old = base[1] if base is not None else None
    if old is not None and len(old) < size:  # a disk that grew: its new blocks were zeros before
        old += bytes(size - len(old))
    zero_group = manifest.ZERO * PLAN_GROUP
    data, zeros = array.array("q"), array.array("q")
    for start in range(0, size, PLAN_GROUP * width):
        end = min(start + PLAN_GROUP * width, size)
        if digests[start:end] == (old[start:end] if old is not None else zero_group[:end - start]):
            continue
        for offset in range(start, end, width):
            new = digests[offset:offset + width]
            if old is not None:
                if new != old[offset:offset + width]:
                    (zeros if new == manifest.ZERO else data).append(offset // width)
            elif new != manifest.ZERO:
                data.append(offset // width)
    return DeltaPlan(data, zeros, base_import if old is not None else None)


def _disk_size(fd: int) -> int:
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.fstat(fd).st_size
    if stat.S_ISBLK(mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise PushRefused("the source is neither a regular file nor a block device", "push-not-a-disk")


def _refuse_image_file(fd: int, size: int, source: Path) -> None:
    """A push reads a raw disk: an image file (qcow2, VMDK, VHD...) pushed as one would upload its
    container's bytes as the disk's. Found by the importer's own header inspection."""
    from ..errors import ImageRejected
    from ..images import inspection

    try:
        found = inspection.inspect(lambda start, end: os.pread(fd, end - start, start), size, None, 1 << 62)
    except ImageRejected as exc:  # a header that looks like an image but does not pass: not a raw disk either
        raise PushRefused(f"{source} is not a raw disk ({exc})", "push-not-a-raw-disk") from None
    if found.format != "raw" or found.detected_as == "vhd-fixed":
        raise PushRefused(f"{source} is a {found.detected_as} image, not a raw disk: push the disk itself (a block "
                          f"device or a raw file; qemu-img convert -O raw makes one)", "push-not-a-raw-disk")


def _base(client: Any, namespace: str, bucket: str, name: str, size: int,
          say: Callable[[str], None]) -> tuple[tuple[dict[str, Any], bytes] | None, str | None, str | None]:
    """The manifest of the object's current version's import, that import's id and the version's ETag
    (each None when there is none to go by: the whole disk goes up)."""
    import oci

    try:
        head = client.head_object(namespace, bucket, name)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            say(f"{name} was never uploaded: the whole disk goes up")
            return None, None, None
        raise
    import_id = contract.import_id(namespace, bucket, name, head.headers["etag"])
    try:
        data = client.get_object(namespace, bucket, manifest_object(import_id)).data.content
    except oci.exceptions.ServiceError as exc:
        if exc.status != 404:
            raise
        say(f"no manifest of the import of {name}'s current version ({head.headers['etag']}): it was not synced, "
            "or its import has not finished; the whole disk goes up")
        return None, None, head.headers["etag"]
    try:
        header, _ = manifest.read_header(data)
        if isinstance(header.get("virtual_size"), int) and header["virtual_size"] > size:
            say(f"the disk shrank ({header['virtual_size']} to {size} bytes): the whole disk goes up")
            return None, None, head.headers["etag"]
        header, digests = manifest.decode(data, manifest.block_count(size))
    except manifest.ManifestError as exc:
        raise PushRefused(f"the manifest of import {import_id} cannot be used: {exc}", "push-base-manifest") from None
    return (header, digests), import_id, head.headers["etag"]


class _Progress:
    def __init__(self, out: TextIO, what: str, total: int) -> None:
        self.out, self.what, self.total, self.last = out, what, total, 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0 or done >= self.total:
            self.last = now
            self.out.write(f"{self.what}: {done / MiB:,.0f} of {self.total / MiB:,.0f} MiB\n")
            self.out.flush()


def _digests(fd: int, size: int, source: Path, base: tuple[dict[str, Any], bytes] | None,
             etag: str | None, spans: list[tuple[int, int]] | None, changes_since: str | None,
             say: Callable[[str], None], out: TextIO) -> tuple[bytes, int]:
    """The new disk's block digests and the bytes read for them: the whole disk's (its data, for a
    sparse file), or with change tracking only the changed areas' blocks (``spans``), every other
    block's digest taken from the last import's manifest."""
    read = [0]

    def progress(what: str, total: int) -> Callable[[int], None]:
        shown = _Progress(out, what, total)

        def seen(done: int) -> None:
            read[0] = done
            shown(done)
        return seen

    if spans is None or base is None:
        if spans is not None:
            say("no manifest of the last import to take the unchanged blocks from: the whole disk is read")
        return bytes(manifest.digest_file(fd, size, progress=progress(f"reading {source}", size))), read[0]
    if etag != changes_since:
        raise PushRefused(f"the changed areas were tracked since the push of version {changes_since}, but the "
                          f"object's current version is {etag}: give the areas changed since the push of {etag}, "
                          "or push without --changed-areas (the whole disk is read)", "push-changes-since-stale")
    width = manifest.DIGEST_BYTES
    total = sum(n for _, n in spans) * manifest.BLOCK
    digests = bytearray(base[1])
    digests += bytes(manifest.block_count(size) * width - len(digests))  # a disk that grew: zeros before
    fresh = manifest.digest_file(fd, size, blocks=spans,
                                 progress=progress(f"reading the changed areas of {source}", min(total, size)))
    for first, n in spans:
        digests[first * width:(first + n) * width] = fresh[first * width:(first + n) * width]
    return bytes(digests), read[0]


def push(client: Any, namespace: str, bucket: str, name: str, source: Path, work_dir: Path,
         full: bool = False, parallel: int = 4, part_size: int = PART_SIZE, out: TextIO = sys.stderr,
         changed_areas: Path | None = None, changes_since: str | None = None) -> dict[str, Any]:
    """Upload ``source`` as a delta over the object's last import (or whole); the summary.

    ``changed_areas``: a file of the areas written since the push of version ``changes_since`` (an
    ETag), from the source's change tracking (:mod:`.areas`): only those are read."""
    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    if not name.lower().endswith(".qcow2"):
        raise PushRefused(f"the object name {name!r} must end in .qcow2: a push uploads a qcow2", "push-object-name")
    if changed_areas is not None and (full or not changes_since):
        raise PushRefused("--changed-areas goes with --changes-since (the ETag of the push the areas were "
                          "tracked from) and not with --full", "push-changed-areas-arguments")
    fd = os.open(source, os.O_RDONLY)
    try:
        size = _disk_size(fd)
        if size == 0 or size % 512:
            raise PushRefused(f"the disk is {size} bytes, not a whole number of 512-byte sectors", "push-disk-size")
        _refuse_image_file(fd, size, source)
        spans = None  # the blocks the changed areas touch
        if changed_areas is not None:
            try:
                spans = areas.blocks(areas.read(changed_areas), size, manifest.BLOCK)
            except areas.AreasError as exc:
                raise PushRefused(str(exc), "push-changed-areas-invalid") from None
        base, base_import, base_etag = (None, None, None) if full else _base(client, namespace, bucket, name, size, say)
        digests, read_bytes = _digests(fd, size, source, base, base_etag, spans, changes_since, say, out)
        delta = plan(digests, base, base_import)
        changed_bytes = (len(delta.data) + len(delta.zeros)) * manifest.BLOCK
        say(f"{len(delta.data) + len(delta.zeros)} blocks of 16 KiB to upload ({changed_bytes / MiB:,.1f} MiB, "
            f"{len(delta.zeros)} of them now zeros)" + (f" over import {base_import}" if base_import else ", whole"))
        manifest_bytes = manifest.encode({"virtual_size": size, "base_import": base_import}, digests)
        sha = hashlib.sha256(manifest_bytes).hexdigest()
        layout = qcow2.Plan(size, delta.data, delta.zeros, backing_name(base_import) if base_import else None)
        work_dir.mkdir(parents=True, exist_ok=True)
        state = work_dir / f"delta-{sha[:16]}.upload"
        _forget_other_pushes(client, namespace, bucket, name, work_dir, state, say)
        client.put_object(namespace, bucket, upload_object(contract.source_id(namespace, bucket, name), sha),
                          manifest_bytes)
        etag = _upload(client, namespace, bucket, name, _Image(layout, fd), {"sync": "true", METADATA_MANIFEST: sha},
                       state, parallel, part_size, out)
    finally:
        os.close(fd)
    summary = {"object": name, "etag": etag, "base_import": base_import, "disk_bytes": size, "read_bytes": read_bytes,
               "changed_areas": spans is not None and base is not None, "changed_bytes": changed_bytes,
               "uploaded_bytes": layout.file_size + len(manifest_bytes),
               "image_bytes": layout.file_size, "manifest_bytes": len(manifest_bytes),
               "saved_bytes": max(0, size - layout.file_size - len(manifest_bytes)), "manifest_sha256": sha}
    say(f"uploaded {summary['uploaded_bytes'] / MiB:,.1f} MiB of a {size / MiB:,.0f} MiB disk "
        f"({summary['saved_bytes'] / MiB:,.0f} MiB saved); the sync starts from the upload event")
    return summary


class _Image:
    """The qcow2 a push uploads, made part by part from the disk as it is sent: nothing of it is
    written to the work directory, whose disk need not hold a copy of what goes up."""

    def __init__(self, layout: qcow2.Plan, fd: int) -> None:
        self.layout, self.fd, self.size = layout, fd, layout.file_size
        self.metadata = layout.metadata()

    def read(self, start: int, end: int) -> bytes:
        return qcow2.image_range(self.layout, self.metadata, start, end,
                                 lambda c: os.pread(self.fd, manifest.BLOCK, c * manifest.BLOCK))


def _forget_other_pushes(client: Any, namespace: str, bucket: str, name: str, work_dir: Path, state: Path,
                         say: Callable[[str], None]) -> None:
    """An upload of this object that a push of other contents (the disk changed since) left unfinished
    is aborted, so no multipart upload is left behind in the bucket; other objects' pushes are left alone."""
    import oci

    for other in work_dir.glob("delta-*.upload"):
        if other == state:
            continue
        try:
            kept = json.loads(other.read_text())
        except ValueError:
            other.unlink()
            continue
        if kept.get("object", name) != name:
            continue
        try:
            client.abort_multipart_upload(namespace, bucket, name, kept["upload_id"])
            say(f"aborted upload {kept['upload_id']}, left by a push of other contents")
        except (KeyError, oci.exceptions.ServiceError):
            pass  # already committed or aborted
        other.unlink()
    for old in (*work_dir.glob("delta-*.qcow2"), *work_dir.glob(".delta-*")):  # what earlier clients wrote first
        old.unlink()


def _part_size(image_bytes: int, wanted: int) -> int:
    """``wanted``, or more where the image would need more parts than a multipart upload takes."""
    size = max(wanted, -(-image_bytes // MAX_PARTS))
    return -(-size // qcow2.CLUSTER) * qcow2.CLUSTER


def _upload(client: Any, namespace: str, bucket: str, name: str, image: _Image, metadata: dict[str, str],
            state: Path, parallel: int, part_size: int, out: TextIO) -> str:
    """The image as a multipart upload, ``parallel`` parts at a time, each made from the disk as it
    goes (at most ``parallel`` parts in memory). A push cut short keeps the upload's id in ``state``:
    run again over the same disk (the same manifest), it sends only the parts not uploaded yet."""
    import oci
    from oci.object_storage import models

    part_size = _part_size(image.size, part_size)
    parts = [(n + 1, start, min(start + part_size, image.size))
             for n, start in enumerate(range(0, image.size, part_size))]
    progress = _Progress(out, "uploading", image.size)
    sent, lock = [0], threading.Lock()
    have: dict[int, tuple[int, str, str]] = {}  # part number: size, MD5 and ETag of what was uploaded
    upload_id = json.loads(state.read_text()).get("upload_id") if state.exists() else None
    if upload_id:
        try:
            listed = oci.pagination.list_call_get_all_results(client.list_multipart_upload_parts, namespace, bucket,
                                                              name, upload_id).data
            have = {p.part_number: (p.size, p.md5, p.etag) for p in listed}
            out.write(f"resuming upload {upload_id}: {len(have)} of {len(parts)} parts already uploaded\n")
        except oci.exceptions.ServiceError as exc:
            if exc.status != 404:
                raise
            out.write(f"upload {upload_id} is gone (aborted, or committed by the push that was cut short): "
                      "a new one\n")
            upload_id = None
    if not upload_id:
        details = models.CreateMultipartUploadDetails(
            object=name, metadata={f"opc-meta-{k}": v for k, v in metadata.items()})
        upload_id = client.create_multipart_upload(namespace, bucket, details).data.upload_id
        state.write_text(json.dumps({"object": name, "upload_id": upload_id}))

    def send(part: tuple[int, int, int]) -> models.CommitMultipartUploadPartDetails:
        number, start, end = part
        data = image.read(start, end)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        uploaded = have.get(number)
        if uploaded is not None and uploaded[:2] == (len(data), md5):
            etag = uploaded[2]
        else:
            etag = client.upload_part(namespace, bucket, name, upload_id, number, data,
                                      content_md5=md5).headers["etag"]
        with lock:
            sent[0] += len(data)
            progress(sent[0])
        return models.CommitMultipartUploadPartDetails(part_num=number, etag=etag)

    with concurrent.futures.ThreadPoolExecutor(max(1, parallel), thread_name_prefix="push-part") as pool:
        sending = [pool.submit(send, part) for part in parts]
        try:
            committed = [future.result() for future in sending]
        except BaseException:
            for future in sending:  # a part that failed ends the push: the parts not started stay unsent
                future.cancel()
            raise
    response = client.commit_multipart_upload(namespace, bucket, name, upload_id,
                                              models.CommitMultipartUploadDetails(parts_to_commit=committed))
    state.unlink()
    return response.headers["etag"]


def _client(args: argparse.Namespace) -> Any:
    import oci

    config = oci.config.from_file(args.config_file, args.profile)
    kwargs = {"service_endpoint": args.endpoint} if args.endpoint else {}
    return oci.object_storage.ObjectStorageClient(config, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oci-disk-delta", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("push", help="upload a disk, only what changed since its last import")
    p.add_argument("source", type=Path, help="the disk: a raw image file or a block device")
    p.add_argument("--bucket", required=True)
    p.add_argument("--name", required=True, help="the object's name (the same at every push of this disk)")
    p.add_argument("--namespace", help="default: the tenancy's")
    p.add_argument("--config-file", default=os.environ.get("OCI_CLI_CONFIG_FILE", "~/.oci/config"))
    p.add_argument("--profile", default=os.environ.get("OCI_CLI_PROFILE", "DEFAULT"))
    p.add_argument("--endpoint", default=os.environ.get("OCI_OBJECT_STORAGE_ENDPOINT"),
                   help="the Object Storage endpoint, when not the region's")
    p.add_argument("--work-dir", type=Path, default=Path(".oci-disk-delta"),
                   help="where an interrupted upload's id is kept (nothing of the image is written)")
    p.add_argument("--full", action="store_true", help="upload the whole disk, whatever was imported before")
    p.add_argument("--parallel", type=int, default=4,
                   help="parts uploaded at once (each part, 64 MiB, is held in memory while it goes up)")
    p.add_argument("--changed-areas", type=Path, metavar="FILE",
                   help="JSON areas written since the push of --changes-since, from the source's change tracking "
                        "(QEMU dirty bitmap, VMware CBT): only they are read; see docs/warm-migration.md")
    p.add_argument("--changes-since", metavar="ETAG",
                   help="the ETag (printed by that push) of the version the changed areas were tracked from")
    args = parser.parse_args(argv)
    try:
        client = _client(args)
        namespace = args.namespace or client.get_namespace().data
        summary = push(client, namespace, args.bucket, args.name, args.source, args.work_dir, args.full,
                       args.parallel, changed_areas=args.changed_areas, changes_since=args.changes_since)
    except PushRefused as exc:
        sys.stderr.write(f"oci-disk-delta: {exc.code}: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"oci-disk-delta: {exc}\n")
        return 2
    except Exception as exc:  # the SDK's errors (ServiceError, config errors), said in one line
        if type(exc).__module__.startswith("oci"):
            sys.stderr.write(f"oci-disk-delta: {type(exc).__name__}: {getattr(exc, 'message', exc)}\n")
            return 2
        raise
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
