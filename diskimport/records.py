"""What the steps of an import hand each other: small typed records, nothing bulky.

Each record is what a flow persists between its steps to resume, so none holds bytes
of the image or a client: the head and tail the inspection read are kept where the
transfer finds them (:mod:`diskimport.images.inspection`), clients are rebuilt from the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import contract


@dataclass(frozen=True)
class Subject:
    """What one run works on, as the tags and names of what it creates say: an import's object
    version (its import id, object name and ETag), or an export or a copy (its id, its first
    object or volume, and ``kind``'s name where an import has an ETag)."""

    kind: str     # "import", "export" or "copy"
    id: str       # the import id (contract.import_id), the export's or the copy's id
    name: str     # the object's name, or what the export or copy writes first
    version: str  # the object's ETag; for an export or a copy, its kind


@dataclass(frozen=True)
class ObjectVersion:
    """One version (ETag) of an uploaded object, as its HEAD described it."""

    namespace: str
    bucket: str
    name: str
    etag: str
    size: int
    md5: str | None
    metadata: dict[str, str]
    modified: float | None = None  # when it was uploaded (Last-Modified, epoch seconds)

    @property
    def key(self) -> str:
        """``namespace/bucket/object@etag``: what identifies the import (and its flow runs)."""
        return contract.idempotency_key(self.namespace, self.bucket, self.name, self.etag)

    @property
    def import_id(self) -> str:
        return contract.import_id(self.namespace, self.bucket, self.name, self.etag)

    @property
    def subject(self) -> Subject:
        return Subject("import", self.import_id, self.name, self.etag)


@dataclass(frozen=True)
class InspectedImage:
    """What the header inspection learned: the qemu-img format and the virtual size.

    ``driver`` names the qemu driver that reads the disk when it is not ``format``'s own: a
    fixed VHD (``format`` vpc) is read as ``raw``, its disk being the object's first
    ``virtual_size`` bytes (:mod:`diskimport.images.inspection` says why).

    A compressed or packed upload (:mod:`diskimport.images.packed`) names its ``container``; the
    image inside is ``inner_size`` bytes starting at ``inner_offset`` (of the object for a
    tar, of the decompressed data for a tar.gz), and ``format``/``virtual_size`` are its own.
    """

    format: str          # qemu-img format name
    virtual_size: int    # bytes
    detected_as: str     # format_inspector's name (e.g. "gpt" for a raw disk with a GPT), or "vhd-fixed"
    driver: str | None = None
    container: str | None = None   # contract.CONTAINERS, or None for a plain image
    inner_offset: int = 0
    inner_size: int | None = None
    digest: tuple[str, str, str] | None = None  # (hashlib name, hex, what): a machine manifest's, for the bytes
    delta_base: str | None = None  # a delta upload (diskimport.delta): the import id it applies onto

    @property
    def qemu_driver(self) -> str:
        """The driver qemu-img writes the disk through."""
        return self.driver or self.format


@dataclass(frozen=True)
class WorkerVM:
    """A worker VM: the OCI instance that writes images onto volumes, reached over SSH."""

    id: str
    address: str
    availability_domain: str


@dataclass(frozen=True)
class Volume:
    """A block volume an import writes; ``fresh`` when it was just created (it reads as zeros)."""

    id: str
    availability_domain: str
    size_in_gbs: int
    display_name: str
    fresh: bool
    # A sync (the volume holds the object's earlier version ``synced_from``, whose disk was
    # ``previous_virtual_size`` bytes): only what differs from it is written.
    synced_from: str | None = None
    previous_virtual_size: int | None = None
    manifest: str | None = None  # the SHA-256 of the manifest of what it holds, when an import left it whole
    backup_id: str | None = None  # a sync's backup of it, which must be AVAILABLE before the first write


@dataclass(frozen=True)
class FoundVolume:
    """A volume an earlier (or concurrent) run of the same import left, found by its tags."""

    id: str
    state: str | None    # contract.STATE_*
    availability_domain: str
    size_in_gbs: int
    display_name: str
    flow_run: str | None
    created: str = ""    # the service's creation time (ISO 8601), which orders competing runs
    disk: int | None = None  # a machine import's volume: its disk's position
    tags: dict[str, str] = field(default_factory=dict)  # its freeform tags

    @property
    def synced_from(self) -> str | None:
        """The ETag the volume held before a sync to this import's version started, if it is one."""
        return self.tags.get(contract.TAG_SYNCED_FROM)

    @property
    def held_whole(self) -> str | None:
        """The ETag of the version the volume last held whole: a failed sync's volume, the one it started from."""
        unfinished = self.state in (contract.STATE_FAILED, contract.STATE_WRITING)  # a sync failed, or its run died
        return self.synced_from if unfinished else self.tags.get(contract.TAG_ETAG)

    def as_volume(self) -> Volume:
        size = self.tags.get(contract.TAG_VIRTUAL_SIZE, "")
        return Volume(self.id, self.availability_domain, self.size_in_gbs, self.display_name, fresh=False,
                      synced_from=self.synced_from, previous_virtual_size=int(size) if size.isdigit() else None)


@dataclass(frozen=True)
class Attachment:
    """A volume attached to a worker VM, and the device it appears as there."""

    id: str
    volume_id: str
    instance_id: str
    type: str            # "paravirtualized" or "iscsi"
    device: str | None   # the consistent device path (an iSCSI one is known after login)
    iqn: str | None = None
    ipv4: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class WriteResult:
    """The account of one object written onto one volume and verified."""

    device: str
    virtual_size: int
    image_bytes: int
    fetched_bytes: int
    seconds: float
    retries: int
    verified_bytes: int
    slices: int
    phases: dict[str, float] = field(default_factory=dict)
    synced: dict[str, int] | None = None  # a sync's account: bytes compared, written, zeroed, unchanged


@dataclass(frozen=True)
class FinishedVolume:
    """The volume's performance and backup policy once the import is done."""

    vpus_per_gb: int
    backup_policy_id: str | None
