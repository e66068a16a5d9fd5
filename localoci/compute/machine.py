"""An instance that boots its own disk: its boot volume run under qemu, its serial port the
console history.

An instance launched from a boot volume that no longer holds the worker image (it was
attached to another instance as a data volume, and written) is a machine of its own: the
local OCI boots that disk with ``qemu-system-x86_64``, BIOS (SeaBIOS) or UEFI_64 (OVMF, with
a variable store of the instance's own) as its launch options say, the boot volume on the
interface ``bootVolumeType`` names and the data volumes attached when it starts on virtio.
Its network card (virtio-net, or an E1000 where ``networkType`` says ``E1000``) is on qemu's
user-mode network with ``restrict=on`` (169.254.0.0/16): the guest gets an address by DHCP and reaches nothing
outside the machine, except the instance metadata service at 169.254.169.254:80
(:mod:`localoci.compute.imds`, serving the launch's ``metadata`` as OCI does). Its port 22 is
reachable on the instance's private IP (a loopback address of its own) at the local OCI's SSH
port, as a machine's SSH is on OCI's private IP.

The accelerator is TCG unless ``LOCALOCI_QEMU_ACCEL=kvm`` asks for KVM (nested KVM, as some
sandboxes offer it, fails on real-mode code; TCG boots a small Linux in seconds).
``LOCALOCI_MACHINE_MEMORY_MB`` (default 256) sets the memory of every such machine,
whatever its shape says, so tests can run several.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")
CONSOLE_LOG = "console.log"
FIRMWARES = ("BIOS", "UEFI_64")
BOOT_VOLUME_TYPES = ("ISCSI", "SCSI", "IDE", "VFIO", "PARAVIRTUALIZED")
NETWORK_TYPES = ("E1000", "VFIO", "PARAVIRTUALIZED")


def _first(paths: tuple[str, ...], what: str) -> str:
    for path in paths:
        if os.path.exists(path):
            return path
    raise RuntimeError(f"{what} is not installed (Debian package ovmf)")


def qemu_binary() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise RuntimeError("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    return path


def boot_drive(path: str, volume_type: str) -> list[str]:
    """qemu arguments that put the boot volume ``path`` on the interface ``volume_type``."""
    if volume_type == "IDE":
        return ["-drive", f"file={path},format=raw,if=ide,index=0,media=disk"]
    if volume_type == "SCSI":
        return ["-device", "virtio-scsi-pci,id=scsi0", "-drive", f"file={path},format=raw,if=none,id=boot",
                "-device", "scsi-hd,drive=boot,bootindex=0"]
    # PARAVIRTUALIZED, and locally ISCSI and VFIO too: a virtio disk.
    return ["-drive", f"file={path},format=raw,if=none,id=boot", "-device", "virtio-blk-pci,drive=boot,bootindex=0"]


class MachineHost:
    """The qemu process of one instance, its files in ``directory``."""

    def __init__(self, directory: Path, boot_file: Callable[[], Path], launch_options: dict[str, Any],
                 data_files: Callable[[], list[tuple[Path, bool]]], address: str | None = None,
                 ssh_port: int | None = None, document: Callable[[], dict[str, Any]] | None = None) -> None:
        self.directory = Path(directory)
        self.boot_file = boot_file
        self.launch_options = launch_options
        self.data_files = data_files
        self.address, self.ssh_port = address, ssh_port
        self.document = document  # the instance metadata service's document for this instance
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def metadata_file(self) -> Path:
        return self.directory / "imds.json"

    def network(self) -> list[str]:
        """qemu arguments for the machine's network card (or none, without an address)."""
        if self.address is None or self.ssh_port is None:
            return ["-nic", "none"]
        card = "e1000" if self.launch_options.get("networkType") == "E1000" else "virtio-net-pci"
        imds = f"{sys.executable} -m localoci.compute.imds {self.metadata_file}"
        if "," in imds:
            raise RuntimeError(f"a path with a comma cannot be passed to qemu: {imds}")
        # The guest's network is link-local (169.254.0.0/16, its address by DHCP): qemu forwards
        # only addresses inside it to the host, and the metadata service is at 169.254.169.254.
        return ["-netdev", f"user,id=net0,restrict=on,net=169.254.0.0/16,"
                           f"hostfwd=tcp:{self.address}:{self.ssh_port}-:22,"
                           f"guestfwd=tcp:169.254.169.254:80-cmd:{imds}",
                "-device", f"{card},netdev=net0,mac=02:00:17:00:00:01"]

    @property
    def console_log(self) -> Path:
        return self.directory / CONSOLE_LOG

    def prepare(self, *_: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        accel = os.environ.get("LOCALOCI_QEMU_ACCEL", "tcg")
        memory = int(os.environ.get("LOCALOCI_MACHINE_MEMORY_MB", "256"))
        argv = [qemu_binary(), "-name", self.directory.name, "-accel", accel, "-m", str(memory), "-smp", "1",
                "-nodefaults", "-display", "none", "-monitor", "none", *self.network(), "-no-reboot",
                "-chardev", f"file,id=console,path={self.console_log},append=on", "-serial", "chardev:console"]
        if self.launch_options.get("firmware") == "UEFI_64":
            variables = self.directory / "OVMF_VARS.fd"
            if not variables.exists():
                shutil.copyfile(_first(OVMF_VARS, "OVMF"), variables)
            argv += ["-machine", "q35,graphics=off",
                     "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_first(OVMF_CODE, 'OVMF')}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]
        else:
            argv += ["-machine", "pc,graphics=off"]  # SeaBIOS writes to the serial console too
        argv += boot_drive(str(self.boot_file()), self.launch_options.get("bootVolumeType") or "PARAVIRTUALIZED")
        for index, (path, read_only) in enumerate(self.data_files()):
            argv += ["-drive", f"file={path},format=raw,if=none,id=data{index}{',readonly=on' if read_only else ''}",
                     "-device", f"virtio-blk-pci,drive=data{index}"]
        return argv

    def start(self) -> None:
        self.prepare()
        if self.process is not None and self.process.poll() is None:
            return
        if self.document is not None:
            self.metadata_file.write_text(json.dumps(self.document()))
        with open(self.directory / "qemu.log", "ab") as log:
            self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def crash(self) -> None:
        self.stop()

    def console(self, limit: int) -> bytes:
        """The last ``limit`` bytes the machine wrote to its serial console."""
        try:
            with open(self.console_log, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - limit))
                return f.read()
        except FileNotFoundError:
            return b""
