"""What a finished run accounts for: typed summaries, one per job, and their rows.

A flow returns ``summary.as_dict()`` as its result (plain JSON for the API, the bench and
scripts) and publishes the summary itself as the run's artifacts (:mod:`flows.reporting`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .guest.filesystems import FilesystemCheck


@dataclass(frozen=True)
class Summary:
    """A summary as the flow run's result: its fields as plain JSON values."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DiskImportSummary(Summary):
    """One object version written onto one new (or resumed) volume, checked and handed over."""

    import_id: str
    object: str
    bucket: str
    namespace: str
    etag: str
    format: str
    virtual_size: int
    object_bytes: int
    volume_id: str
    volume_size_gb: int
    availability_domain: str
    resumed: bool
    vpus_per_gb: int
    backup_policy_id: str | None
    qemu_img: str
    bytes_written: int
    fetched_bytes: int
    transfer_seconds: float
    write_phases: dict[str, float]
    verified_bytes: int
    write_slices: int
    transfer_retries: int
    ready_at: str
    peak_rss_mb: float
    steps: dict[str, float]
    filesystems: list[FilesystemCheck]
    reused: bool = False
    synced_from: str | None = None  # a sync: the version (ETag) the volume held before
    synced: dict[str, int] | None = None  # and its account: bytes compared, written, zeroed, unchanged


@dataclass(frozen=True)
class ReusedImportSummary(Summary):
    """A run that found the object version imported already (by itself or by another run)."""

    import_id: str
    object: str
    bucket: str
    namespace: str
    etag: str
    volume_id: str
    volume_size_gb: int
    availability_domain: str
    imported_by_run: str | None
    reused: bool = True


@dataclass(frozen=True)
class MachineDiskRow:
    """One disk of an imported machine: where it came from, its volume, what writing it took."""

    position: int
    name: str
    object: str
    file: str
    format: str
    virtual_size: int
    volume_id: str
    volume_size_gb: int
    digest_checked: bool
    reused: bool
    fetched_bytes: int
    transfer_seconds: float
    seconds: float
    steps: dict[str, float]
    filesystems: list[FilesystemCheck]


@dataclass(frozen=True)
class BootCheckReport:
    booted: bool
    seconds: float
    pattern: str
    console_tail: list[str]
    result: str
    reachable: bool | None = None   # answered SSH on its private IP (None: not checked)
    reach_result: str | None = None


@dataclass
class BootReport:
    """A bootable import's boot volume, the firmware chosen and why, and the started machine."""

    boot_volume_id: str
    firmware: str | None
    firmware_source: str
    firmware_reason: str
    instance_id: str | None = None
    boot_check: BootCheckReport | None = None
    boot_volume_type: str | None = None   # the launch's: PARAVIRTUALIZED, IDE, ...
    network_type: str | None = None
    launch_reason: str | None = None      # why those (the guest report's verdict, or the TargetMachine block)
    guest: dict[str, Any] | None = None   # the guest report (diskimport.guest.report.GuestReport.as_dict())


@dataclass(frozen=True)
class MachineImportSummary(Summary):
    """A whole machine: as described, each disk with its volume, the group they are in."""

    import_id: str
    object: str
    bucket: str
    namespace: str
    etag: str
    machine: dict[str, Any]   # the descriptor's account (Machine.summary())
    volume_group_id: str | None
    availability_domain: str
    disks: list[MachineDiskRow]
    qemu_img: str | None
    ready_at: str
    reused: bool
    steps: dict[str, float]   # the machine's own; its disks' (side by side) are in their rows
    peak_rss_mb: float
    boot: BootReport | None = None


@dataclass(frozen=True)
class ExportedDiskRow:
    """One volume of an export: its object, written by this run or found written by an earlier one."""

    volume_id: str
    object: str
    format: str
    reused: bool
    etag: str | None
    virtual_size: int | None = None
    object_bytes: int | None = None
    sha256: str | None = None
    parts: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    finished_at: str | None = None


@dataclass(frozen=True)
class ExportSummary(Summary):
    export_id: str
    namespace: str
    bucket: str
    format: str
    compressed: bool
    machine: str | None
    manifest: str | None
    disks: list[ExportedDiskRow]
    steps: dict[str, float]
    ready_at: str
    finished_at: str


@dataclass(frozen=True)
class CopiedDisk:
    """One disk of a copy: its source, the volume restored from it, the seconds each stage took."""

    position: int
    source_volume_id: str
    volume_id: str
    boot: bool
    size_in_gbs: int
    seconds: dict[str, float] = field(default_factory=dict)
    reused: bool = False


@dataclass(frozen=True)
class CopySummary(Summary):
    copy_id: str
    source_region: str
    destination_region: str
    compartment_id: str
    availability_domain: str
    machine: str | None
    volume_group_id: str | None
    disks: list[CopiedDisk]
    steps: dict[str, float]
