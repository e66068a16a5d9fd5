"""The worker VM that writes an image onto a volume: its shape, network and SSH access."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, field_validator

from diskimport import contract, pool


class WorkerShape(Block):
    """Where and how import workers are launched, and how to reach them over SSH.

    Example:
        ```python
        from blocks import WorkerShape

        shape = WorkerShape.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "OCI Import Worker Shape"
    _block_type_slug = "oci-import-worker-shape"
    _description = "Shape, image, network and SSH settings of the short-lived VMs that write images onto volumes."

    compartment_id: str = Field(description="Compartment the worker VMs are launched in.")
    subnet_id: str = Field(description="Subnet of the workers' VNIC; it must reach Object Storage.")
    image_id: str = Field(description="Image OCID of the workers (Linux with qemu-img, or a package manager to "
                          "install it).")
    shape: str = Field(default="VM.Standard.E4.Flex", description="Compute shape.")
    ocpus: float | None = Field(default=2, description="OCPUs of a flexible shape (None for fixed shapes). "
                                "Network bandwidth grows with OCPUs (about 1 Gbps each).")
    memory_in_gbs: float | None = Field(default=16, description="Memory of a flexible shape, in GB.")
    boot_volume_size_gb: int | None = Field(default=None, description="Boot volume size in GB (None: the image's).")
    availability_domains: list[str] = Field(default_factory=list, description="Availability domains to try, in "
                                            "order, when one is out of capacity (empty: all of the region's).")
    assign_public_ip: bool = Field(default=False, description="Give workers a public IP and connect to it "
                                   "(otherwise the private IP is used).")
    ssh_user: str = Field(default="opc", description="User to log in as on the worker.")
    ssh_port: int = Field(default=22, description="SSH port of the worker.")
    use_sudo: bool = Field(default=True, description="Run commands on the worker with sudo (not needed as root).")
    attachment_type: Literal["paravirtualized", "iscsi"] = Field(
        default="paravirtualized", description="How the volume is attached to the worker; iscsi logs in with "
        "iscsiadm on the worker.")
    boot_timeout_seconds: float = Field(default=600, description="How long a worker may take to accept SSH.")
    pool_size: int = Field(default=0, ge=0, le=64, description="Worker VMs kept launched ahead, idle, in the first "
                           "availability domain imports try: an import takes one and starts at once instead of "
                           "waiting minutes for a launch (each used by one import, then terminated; the pool "
                           "refills behind it). 0: no pool, every import launches its own.")
    pool_idle_minutes: float = Field(default=30, gt=0, description="How long a pooled VM waits for an import before "
                                     "the sweeper terminates it (from its launch).")
    pool_hours: str = Field(default="00-24", description="UTC hours the pool is kept, as spans HH-HH separated by "
                            "commas (e.g. 07-19); outside them it holds no VM.")
    pool_max_ocpu_hours: float | None = Field(default=None, gt=0, description="The most the idle pool may cost, in "
                                              "OCPU-hours per hour (an idle VM costs its OCPUs each hour): caps "
                                              "pool_size at this divided by ocpus. None: no cap.")

    @field_validator("pool_hours")
    @classmethod
    def _check_hours(cls, value: str) -> str:
        try:
            pool.parse_hours(value)
        except contract.InvalidRequest as exc:
            raise ValueError(str(exc)) from None
        return value
