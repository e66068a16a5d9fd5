"""Bootable raw disks built from Debian packages, for the boot tests.

Each disk boots Debian's cloud kernel (``linux-image-*-cloud-amd64``, unpacked from its
package) with an initramfs whose ``/init`` is a shell script run by ``busybox-static``: it
prints an issue line and a login prompt on the serial console, then waits. Nothing is
mounted and nothing is faked: the firmware loads the bootloader from the disk, the
bootloader the kernel, and the prompt appears only if all of it worked.

- :func:`bios_disk`: an MBR disk, its one FAT partition active, SYSLINUX's ``mbr.bin`` in the
  boot sector and ``syslinux`` installed in the partition (``syslinux-common``, ``syslinux``).
- :func:`uefi_disk`: a GPT disk with an EFI System Partition holding ``/EFI/BOOT/BOOTX64.EFI``,
  a unified kernel image made from systemd's EFI stub (``systemd-boot-efi``) with the kernel,
  the initramfs and the command line in its sections.
- :func:`unbootable_disk`: an MBR disk with a FAT partition and no boot code at all.

Filesystems are made and filled on the disk file itself (``mkfs.vfat --offset``, mtools'
``image@@offset``), so no loop device or mount is needed.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.guest_disks import GPT_EFI, SECTOR, partition_layout, run_tool, write_at

ROOT = Path(__file__).resolve().parent.parent
# What the tests build once and reuse between runs (Debian's kernel, the Debian guests' root), kept
# outside the checkout so that a fresh clone on the same machine reuses it too:
# $OCI_IMPORT_TEST_CACHE, else ~/.cache/oci-disk-import-tests. Each file is named by what went
# into it; removing the directory only costs the next run the time to build it again.
TEST_CACHE = Path(os.environ.get("OCI_IMPORT_TEST_CACHE") or Path.home() / ".cache" / "oci-disk-import-tests")
CACHE = TEST_CACHE / "boot-disks"
LOGIN_PROMPT = "bootdisk login: "
ISSUE_LINE = "Debian GNU/Linux 12 bootdisk ttyS0"
MBR_BOOT_CODE = "/usr/lib/syslinux/mbr/mbr.bin"
EFI_STUB = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub"
BUSYBOX = "/bin/busybox"
# no_timer_check: under software emulation on a busy host the kernel's check of the timer
# interrupt can miss its window and panic ("timer doesn't work"); cloud images skip it too.
KERNEL_COMMAND_LINE = "console=ttyS0,115200 panic=-1 quiet no_timer_check"
MBR_FAT16 = "e"

# The network, before the prompt (anything printed after it would end the prompt's line): the
# virtio-net driver and what it needs, an address by DHCP (udhcpc, with the script below), the
# launch's SSH key read from the instance metadata service as cloud-init would (printed, so the
# test sees it arrived), and an SSH banner on port 22 for the reachability check.
NETWORK_MODULES = ("drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko",
                   "drivers/virtio/virtio_pci_modern_dev.ko", "drivers/virtio/virtio_pci_legacy_dev.ko",
                   "drivers/virtio/virtio_pci.ko", "net/core/failover.ko", "drivers/net/net_failover.ko",
                   "drivers/net/virtio_net.ko")
SSH_BANNER = "SSH-2.0-bootdisk"
IMDS_LINE = "instance metadata key: "
INIT = f"""#!/bin/sh
/bin/busybox mkdir -p /proc /sys /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
for m in /modules/*.ko; do /bin/busybox insmod "$m" 2>/dev/null; done
if /bin/busybox ip link set eth0 up 2>/dev/null && /bin/busybox udhcpc -i eth0 -n -q -t 3 -T 2 -s /bin/dhcp >/dev/null 2>&1
then
    key=$(/bin/busybox wget -q -O - --header "Authorization: Bearer Oracle" \
          http://169.254.169.254/opc/v2/instance/metadata/ssh_authorized_keys 2>/dev/null)
    echo "{IMDS_LINE}$key"
    /bin/busybox nc -ll -p 22 -e /bin/banner &
fi
echo
echo "{ISSUE_LINE}"
echo
echo -n "{LOGIN_PROMPT}"
exec /bin/busybox sleep 2147483647
"""
DHCP_SCRIPT = """#!/bin/sh
[ "$1" = bound ] || [ "$1" = renew ] || exit 0
/bin/busybox ifconfig "$interface" "$ip" netmask "$subnet" up
[ -n "$router" ] && /bin/busybox route add default gw "$router" dev "$interface"
exit 0
"""


def tools_missing() -> list[str]:
    missing = [t for t in ("sfdisk", "mkfs.vfat", "mcopy", "mmd", "syslinux", "objcopy", "dpkg-deb", "apt-get")
               if shutil.which(t) is None]
    return missing + [f for f in (MBR_BOOT_CODE, EFI_STUB, BUSYBOX) if not os.path.exists(f)]


def kernel() -> Path:
    """Debian's cloud kernel, unpacked from its package (downloaded once into the cache, by one
    test process at a time: the guest inspection's and the boot tests' may ask at once)."""
    found = sorted(glob.glob(str(CACHE / "kernel" / "boot" / "vmlinuz-*")))
    if found:
        return Path(found[-1])
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "kernel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(glob.glob(str(CACHE / "kernel" / "boot" / "vmlinuz-*")))
        return Path(found[-1]) if found else _download_kernel()


def _download_kernel() -> Path:
    try:
        depends = run_tool("apt-cache", "depends", "linux-image-cloud-amd64")
    except RuntimeError:  # no package lists yet on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        depends = run_tool("apt-cache", "depends", "linux-image-cloud-amd64")
    package = next(line.split(":", 1)[1].strip() for line in depends.splitlines()
                   if line.strip().startswith("Depends:") and "linux-image-" in line)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        os.chmod(work, 0o755)  # apt's download user writes here
        subprocess.run(["apt-get", "download", "-qq", package], cwd=work, check=True, capture_output=True)
        deb = next(Path(work).glob("*.deb"))
        unpacked = Path(work) / "kernel"
        run_tool("dpkg-deb", "-x", str(deb), str(unpacked))
        shutil.rmtree(CACHE / "kernel", ignore_errors=True)
        os.replace(unpacked, CACHE / "kernel")
    return Path(sorted(glob.glob(str(CACHE / "kernel" / "boot" / "vmlinuz-*")))[-1])


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's ``newc`` format: (name, mode, data) entries."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs() -> Path:
    """The initramfs (cached under a name that changes with what it holds)."""
    recipe = hashlib.sha256("\0".join((INIT, DHCP_SCRIPT, SSH_BANNER, *NETWORK_MODULES)).encode()).hexdigest()[:12]
    path = CACHE / f"initrd-{recipe}.img"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        directory, executable = 0o040755, 0o100755
        modules = kernel().parent.parent / "lib" / "modules" / kernel().name[len("vmlinuz-"):] / "kernel"
        archive = _newc([("bin", directory, b""), ("dev", directory, b""), ("proc", directory, b""),
                         ("modules", directory, b""),
                         *[(f"modules/{n}-{Path(m).name}", 0o100644, (modules / m).read_bytes())
                           for n, m in enumerate(NETWORK_MODULES)],
                         ("bin/busybox", executable, Path(BUSYBOX).read_bytes()),
                         ("bin/sh", 0o120777, b"busybox"), ("bin/dhcp", executable, DHCP_SCRIPT.encode()),
                         ("bin/banner", executable, f"#!/bin/sh\necho {SSH_BANNER}\n".encode()),
                         ("init", executable, INIT.encode())])
        path.with_suffix(".tmp").write_bytes(archive)
        os.replace(path.with_suffix(".tmp"), path)
    return path


def fat_filesystem(disk: Path, offset: int, size: int, label: str) -> str:
    """Make a FAT filesystem in the partition at ``offset``; return its mtools image name."""
    run_tool("mkfs.vfat", "-n", label, "--offset", str(offset // SECTOR), str(disk), str(size // 1024))
    return f"{disk}@@{offset}"


def _copy(image: str, source: Path, target: str) -> None:
    run_tool("mcopy", "-o", "-i", image, str(source), target)


def bios_disk(path: Path, size_mib: int = 48) -> Path:
    """An MBR disk that boots by BIOS: SYSLINUX from the active FAT partition."""
    [(offset, size)] = partition_layout(path, "dos", [(size_mib - 2, MBR_FAT16)])
    run_tool("sfdisk", "--quiet", "--activate", str(path), "1")
    image = fat_filesystem(path, offset, size, "BOOT")
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "syslinux.cfg"
        config.write_text(f"SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n"
                          f"  KERNEL vmlinuz\n  APPEND initrd=initrd.img {KERNEL_COMMAND_LINE}\n")
        _copy(image, config, "::/syslinux.cfg")
    _copy(image, kernel(), "::/vmlinuz")
    _copy(image, initramfs(), "::/initrd.img")
    run_tool("syslinux", "--offset", str(offset), "--install", str(path))
    write_at(path, 0, Path(MBR_BOOT_CODE).read_bytes()[:440])
    return path


def unified_kernel_image(target: Path) -> Path:
    """``BOOTX64.EFI``: systemd's EFI stub with the kernel, initramfs and command line in it."""
    with tempfile.TemporaryDirectory() as work:
        cmdline, osrel = Path(work) / "cmdline", Path(work) / "os-release"
        cmdline.write_text(KERNEL_COMMAND_LINE + "\0")
        osrel.write_text('ID=bootdisk\nPRETTY_NAME="boot test disk"\n')
        run_tool("objcopy",
             "--add-section", f".osrel={osrel}", "--change-section-vma", ".osrel=0x20000",
             "--add-section", f".cmdline={cmdline}", "--change-section-vma", ".cmdline=0x30000",
             "--add-section", f".linux={kernel()}", "--change-section-vma", ".linux=0x2000000",
             "--add-section", f".initrd={initramfs()}", "--change-section-vma", ".initrd=0x3000000",
             EFI_STUB, str(target))
    return target


def uefi_disk(path: Path, size_mib: int = 64) -> Path:
    """A GPT disk that boots by UEFI: the removable-media loader on its EFI System Partition."""
    [(offset, size)] = partition_layout(path, "gpt", [(size_mib - 3, GPT_EFI)])
    image = fat_filesystem(path, offset, size, "ESP")
    run_tool("mmd", "-i", image, "::/EFI", "::/EFI/BOOT")
    with tempfile.TemporaryDirectory() as work:
        _copy(image, unified_kernel_image(Path(work) / "BOOTX64.EFI"), "::/EFI/BOOT/BOOTX64.EFI")
    return path


def unbootable_disk(path: Path, size_mib: int = 16) -> Path:
    """An MBR disk with a FAT partition and no boot code: no firmware can start it."""
    [(offset, size)] = partition_layout(path, "dos", [(size_mib - 2, MBR_FAT16)])
    fat_filesystem(path, offset, size, "DATA")
    return path


def build_all(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return {"bios": bios_disk(directory / "bios.raw"), "uefi": uefi_disk(directory / "uefi.raw"),
            "unbootable": unbootable_disk(directory / "unbootable.raw")}


if __name__ == "__main__":
    import sys

    for name, built in build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "boot-disks")).items():
        print(name, built, built.stat().st_size)
