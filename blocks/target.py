"""Where a bootable machine import puts the machine it starts: compartment, network, shape, and
how it proves that the machine boots."""

from __future__ import annotations

from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field


class TargetMachine(Block):
    """The instance an imported machine runs as, and the boot check.

    Example:
        ```python
        from blocks import TargetMachine

        target = TargetMachine.load("BLOCK_NAME")
        ```
    """

    _block_type_name = "OCI Import Target Machine"
    _block_type_slug = "oci-import-target-machine"
    _description = "Compartment, subnet and shape of imported machines, and how their boot is checked."

    compartment_id: str = Field(description="Compartment the imported machine's instance is launched in.")
    subnet_id: str = Field(description="Subnet of the machine's primary VNIC.")
    image_id: str = Field(description="A platform image in the machine's region. Its only use: a launch from it, "
                          "terminated at once with its boot volume preserved, is how a boot volume of the boot "
                          "disk's size is obtained (OCI makes boot volumes from images or other boot volumes only).")
    shape: str = Field(default="VM.Standard.E4.Flex", description="Compute shape (a manifest's shape hint wins).")
    ocpus: float | None = Field(default=1, description="OCPUs of a flexible shape (None for fixed shapes).")
    memory_in_gbs: float | None = Field(default=8, description="Memory of a flexible shape, in GB.")
    firmware: Literal["auto", "BIOS", "UEFI_64"] = Field(
        default="auto", description="auto: from the OVF or manifest, else detected from the boot disk.")
    boot_volume_type: Literal["auto", "PARAVIRTUALIZED", "SCSI", "IDE", "ISCSI"] = Field(
        default="auto", description="How the boot volume is presented. auto: as the guest report says the guest "
        "boots (PARAVIRTUALIZED, or emulated IDE for a guest without virtio drivers); a value set here wins.")
    network_type: Literal["auto", "PARAVIRTUALIZED", "E1000", "VFIO"] = Field(
        default="auto", description="How the VNIC is presented. auto: PARAVIRTUALIZED, or E1000 where the guest "
        "boots emulated only; a value set here wins.")
    adapt_guest: Literal["auto", "off"] = Field(
        default="auto", description="auto: a Linux guest is adapted to OCI on the worker before its launch (virtio "
        "drivers added to every initramfs by the guest's own tool, root and fstab devices by UUID, a serial "
        "console, DHCP on the first network card, hypervisor tools disabled; every original kept inside the "
        "guest, see docs/guest-adaptation.md); off: the guest is launched as it was written (emulated where it "
        "lacks virtio drivers). The flow's adapt_guest parameter and an upload's opc-meta-adapt_guest win.")
    boot_check: Literal["warn", "require", "off"] = Field(
        default="warn", description="warn: report whether the machine booted; require: a machine that does not "
        "boot fails the run (the instance is stopped, its volumes kept and tagged); off: no check.")
    boot_pattern: str = Field(default=r"login:\s*$", description="Regular expression (multiline) on the serial "
                              "console that means the machine booted.")
    boot_timeout_seconds: float = Field(default=600, gt=0, description="How long the machine has to show it.")
    console_poll_seconds: float = Field(default=10, gt=0, description="How often the console history is captured "
                                        "while waiting.")
    ssh_port: int = Field(default=22, gt=0, lt=65536, description="The port the machine's SSH answers on: once it "
                          "has booted, the boot check also proves it reachable there on its private IP (an SSH "
                          "banner); the summary says whether it was.")
    reach_timeout_seconds: float = Field(default=120, ge=0, description="How long after the boot the machine has "
                                         "to answer on ssh_port (0: no reachability check).")
    ssh_authorized_keys: str | None = Field(default=None, description="Public keys given to the machine at launch "
                                            "as the instance metadata's ssh_authorized_keys (cloud-init installs "
                                            "them for the image's default user).")
