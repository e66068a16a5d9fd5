"""The importer's side of delta uploads and manifests: apply an overlay onto its volume, check the
result against the client's manifest, and record the manifest of what a volume now holds.

Applying (on the worker VM, the overlay fully staged and checked by ``qemu-img check`` with its
backing cut off): ``qemu-img map`` lists the clusters the overlay holds (data, or zeros); the
overlay's backing is then pointed at the attached device (``rebase -u``: the header only) and
``qemu-img commit`` writes those clusters, and nothing else, onto it.

Checking: every block the overlay touched is read back from the device and hashed on the
worker (``agent manifest`` with the block list); every other block must have the same digest in
the client's manifest as in the manifest of the version the volume held (so the client's disk
and the volume agree there without reading it). A volume that was not left whole by an import
(a failed or dead sync's) is read back whole instead. Any difference refuses the result
(``delta-manifest-mismatch``) and names the first block that differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

from .. import cloud, contract
from ..agent import manifest
from ..contract import InvalidRequest
from ..worker_vm.commands import CommandFailed, CommandRunner
from ..worker_vm.qemu_img import image_opts
from . import MANIFESTS, UPLOADS, manifest_object, upload_object, uploads_of

MAX_MAP_ENTRIES = 4_000_000


@dataclass(frozen=True)
class Manifest:
    sha256: str
    virtual_size: int
    digests: bytes

    @property
    def blocks(self) -> int:
        return len(self.digests) // manifest.DIGEST_BYTES


def read_manifest(clients: cloud.Clients, namespace: str, bucket: str, name: str, sha256: str, max_size: int,
                  what: str, code: str) -> Manifest:
    """A manifest object whose SHA-256 must be ``sha256``, of a disk of at most ``max_size`` bytes; refused
    with ``code`` otherwise. The bucket is not trusted: the object's length is bounded before it is read,
    its digest checked before it is parsed, and its digests inflated no further than its header says."""
    import oci

    try:
        reply = clients.object_storage.get_object(namespace, bucket, name)
    except oci.exceptions.ServiceError as exc:
        if exc.status == 404:
            raise InvalidRequest(code, f"{what} ({name}) is not in bucket {bucket}") from None
        raise
    length, limit = int(reply.headers.get("content-length", 0)), manifest.max_file_bytes(max_size)
    if length > limit:
        reply.data.close()
        raise InvalidRequest(code, f"{what} ({name}) is {length} bytes long, more than a manifest of a disk of "
                             f"{max_size} bytes can be")
    data = reply.data.content
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise InvalidRequest(code, f"{what} ({name}) has SHA-256 {found}, not {sha256}")
    try:
        header, digests = manifest.decode(data, manifest.block_count(max_size))
    except manifest.ManifestError as exc:
        raise InvalidRequest(code, f"{what} ({name}) cannot be used: {exc}") from None
    return Manifest(found, header["virtual_size"], digests)


def names_manifest(metadata: dict[str, str]) -> bool:
    """Whether an upload names a client's manifest (``opc-meta-delta-manifest``)."""
    return bool(_named_manifest(metadata))


def _named_manifest(metadata: dict[str, str]) -> str:
    return (metadata.get("delta-manifest") or metadata.get("delta_manifest") or "").strip().lower()


def client_manifest(clients: cloud.Clients, namespace: str, bucket: str, object_name: str,
                    metadata: dict[str, str], virtual_size: int) -> Manifest:
    """The manifest the client computed of the new disk, named by the upload's ``opc-meta-delta-manifest``."""
    sha = _named_manifest(metadata)
    try:
        name = upload_object(contract.source_id(namespace, bucket, object_name), sha)
    except ValueError:
        raise InvalidRequest("delta-manifest-missing", "a delta upload names its manifest's SHA-256 in "
                             f"opc-meta-delta-manifest; this one has {sha or 'none'!r}") from None
    found = read_manifest(clients, namespace, bucket, name, sha, virtual_size, "the delta's manifest",
                          "delta-manifest-missing")
    if found.virtual_size != virtual_size:
        raise InvalidRequest("delta-manifest-missing", f"the delta's manifest describes a disk of "
                             f"{found.virtual_size} bytes, the image {virtual_size}")
    return found


def overlay_node(path: str) -> str:
    """The staged overlay with its backing cut off: what ``check`` and ``map`` read."""
    return "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": path}, "backing": None})


def touched_extents(runner: CommandRunner, path: str, virtual_size: int) -> list[tuple[int, int, bool]]:
    """``[(start, length, zero)]``: the clusters the overlay holds (``qemu-img map`` of it alone)."""
    result = runner.run(["qemu-img", "map", "--output=json", overlay_node(path)], timeout=3600)
    if result.returncode != 0:
        raise CommandFailed(result, "qemu-img map of the delta")
    entries = json.loads(result.stdout)
    if not isinstance(entries, list) or len(entries) > MAX_MAP_ENTRIES:
        raise InvalidRequest("delta-manifest-mismatch", "the delta's map cannot be read")
    extents = [(int(e["start"]), int(e["length"]), bool(e.get("zero"))) for e in entries
               if e.get("present") and e.get("depth") == 0]
    if any(start + length > virtual_size for start, length, _ in extents):
        raise InvalidRequest("delta-manifest-mismatch", "the delta holds clusters past its disk's end")
    return extents


def commit_onto(runner: CommandRunner, path: str, device: str) -> None:
    """Write the overlay's clusters onto ``device``: its backing pointed there, then ``qemu-img commit``."""
    for argv, what in ((["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", device, "-F", "raw", path], "rebase"),
                       (["qemu-img", "commit", "-f", "qcow2", "-t", "none", "-d", path], "commit")):
        result = runner.run(argv, timeout=24 * 3600)
        if result.returncode != 0:
            raise CommandFailed(result, f"qemu-img {what} of the delta onto {device}")


def blocks_of(extents: Sequence[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    """The manifest blocks ``extents`` cover, as merged ``[(first, count)]``."""
    runs: list[tuple[int, int]] = []
    for start, length, _ in sorted(extents):
        first, end = start // manifest.BLOCK, manifest.block_count(start + length)
        if runs and first <= runs[-1][0] + runs[-1][1]:
            last_first, last_count = runs[-1]
            runs[-1] = (last_first, max(last_count, end - last_first))
        else:
            runs.append((first, end - first))
    return runs


def device_digests(runner: Any, script: str, directory: str, device: str, size: int,
                   blocks: list[tuple[int, int]] | None) -> bytes:
    """The device's digests, hashed on the worker (all blocks, or ``blocks``; the rest ``ZERO``)."""
    config, out = f"{directory}/manifest.json", f"{directory}/device.manifest"
    runner.put_private_file(json.dumps({"device": device, "size": size, "out": out, "blocks": blocks}), config)
    result = runner.run(["python3", script, "manifest", config], timeout=24 * 3600)
    if result.returncode != 0:
        raise CommandFailed(result, f"hashing {device}")
    data = runner.read_bytes(["cat", out])
    runner.run(["rm", "-f", out, config])
    return manifest.decode(data, manifest.block_count(size))[1]


def check_result(expected: Manifest, base: Manifest | None, device: bytes, read: list[tuple[int, int]] | None) -> None:
    """The volume holds the client's disk: each block read back (``read``; all when None) has the
    client's digest, and each other block the same in the base manifest as in the client's."""
    read_blocks = (set(range(expected.blocks)) if read is None
                   else {b for first, count in read for b in range(first, first + count)})
    for i in range(expected.blocks):
        want = manifest.digest_at(expected.digests, i)
        if i in read_blocks:
            got, where = manifest.digest_at(device, i), "the volume reads"
        else:
            assert base is not None
            got, where = manifest.digest_at(base.digests, i), "the version the volume held has"
        if got != want:
            raise InvalidRequest("delta-manifest-mismatch", f"block {i} (bytes {i * manifest.BLOCK} to "
                                 f"{(i + 1) * manifest.BLOCK}): {where} digest {got.hex()}, the client's "
                                 f"manifest {want.hex()}")


def store_manifest(clients: cloud.Clients, namespace: str, bucket: str, import_id: str, virtual_size: int,
                   digests: bytes) -> str:
    """Store the manifest of what the import's volume holds; its SHA-256 (the volume's tag)."""
    data = manifest.encode({"virtual_size": virtual_size, "import_id": import_id}, digests)
    clients.object_storage.put_object(namespace, bucket, manifest_object(import_id), data)
    return hashlib.sha256(data).hexdigest()


def remove_uploads(clients: cloud.Clients, namespace: str, bucket: str, object_name: str, used: str) -> int:
    """Delete the client's manifests of the object up to the one a sync just used (``used``: its name):
    newer ones belong to pushes still on their way. Returns how many went."""
    import oci

    prefix = uploads_of(contract.source_id(namespace, bucket, object_name))
    listed = oci.pagination.list_call_get_all_results(
        clients.object_storage.list_objects, namespace, bucket, prefix=prefix, fields="name,timeCreated").data.objects
    cutoff = next((o.time_created for o in listed if o.name == used), None)
    gone = 0
    for found in listed:
        if not found.name.startswith(UPLOADS) or (cutoff is not None and found.time_created
                                                  and found.time_created > cutoff):
            continue
        try:
            clients.object_storage.delete_object(namespace, bucket, found.name)
            gone += 1
        except oci.exceptions.ServiceError as exc:
            if exc.status != 404:
                raise
    return gone
