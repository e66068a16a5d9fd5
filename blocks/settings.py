"""Settings of an import: where volumes go, how they perform, what is kept on failure."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from diskimport.contract import VPU_LEVELS


def _vpus(value: int) -> int:
    if value not in VPU_LEVELS:
        raise ValueError(f"vpus_per_gb must be 0, 10, 20 or 30 to 120 in steps of 10, not {value}")
    return value


class ImportSettings(Block):
    """How imported volumes are made: compartment, performance, backup policy, naming,
    limits, tags and what happens to a failed import's volume.

    Example:
        ```python
        from blocks import ImportSettings

        settings = ImportSettings.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "OCI Disk Import Settings"
    _block_type_slug = "oci-disk-import-settings"
    _description = "Target compartment, performance levels, backup policy and limits of imported volumes."

    compartment_id: str = Field(description="Compartment the imported volumes are created in.")
    vpus_during_import: int = Field(default=20, description="Volume performance units per GB while writing "
                                    "(20: higher performance, about 680 MB/s).")
    vpus_after_import: int = Field(default=10, description="Volume performance units per GB once imported "
                                   "(0 lower cost, 10 balanced, 20 higher, 30-120 ultra high).")
    backup_policy: str | None = Field(default=None, description="Backup policy to assign (gold, silver, bronze "
                                      "or a policy OCID); None assigns none.")
    volume_name_template: str = Field(default="{stem}", description="Display name of new volumes; fields: "
                                      "{stem} (object name without suffix), {object}, {etag}.")
    max_virtual_size_bytes: int = Field(default=32 * 1024**4, description="Largest virtual disk size accepted "
                                        "(32 TiB, the block volume maximum).")
    extra_tags: dict[str, str] = Field(default_factory=dict, description="Freeform tags added to every volume "
                                       "and worker.")
    sync_volumes: bool = Field(default=False, description="A new version of an object imported before updates "
                               "that import's volume in place, writing only the blocks that differ (a sync); "
                               "off: each version gets a new volume. The flow's sync parameter and the "
                               "upload's opc-meta-sync win.")
    keep_failed_volume: bool = Field(default=False, description="Keep (detached) the volume of a failed import "
                                     "for inspection instead of deleting it.")
    crash_retries: int = Field(default=2, ge=0, le=10, description="How many times a run whose process dies "
                               "(killed, out of memory) is started again after its cleanup; it resumes from "
                               "the steps that finished.")
    worker_lost_retries: int = Field(default=1, ge=0, le=5, description="How many times an import whose worker "
                                     "VM is lost mid-import (SSH refused or cut off) starts again on a new worker VM, "
                                     "after removing what the lost attempt made.")
    worker_concurrency_limit: int = Field(default=4, description="How many worker VMs may run at once; further "
                                          "imports queue.")
    transfer_connections: int = Field(default=4, ge=1, le=64, description="Parallel ranged GETs the worker "
                                      "reads the object with (Object Storage serves about 100 MB/s per "
                                      "connection; a worker's network about 125 MB/s per OCPU).")
    transfer_chunk_mib: int = Field(default=8, ge=1, le=1024, description="Size of each ranged GET, and the "
                                    "unit a failed read is retried and resumed in.")

    unchecked_filesystems: Literal["allow", "fail"] = Field(
        default="allow", description="What an import does when the disk holds something the read-only checks "
        "cannot check (an encrypted volume, an unknown filesystem, an LVM volume that needs device-mapper): "
        "'allow' reports it in the summary, 'fail' fails the import naming it.")

    _check_during = field_validator("vpus_during_import")(classmethod(lambda cls, v: _vpus(v)))
    _check_after = field_validator("vpus_after_import")(classmethod(lambda cls, v: _vpus(v)))
