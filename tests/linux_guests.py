"""Linux guests' boot disks shaped the way machines leave VMware, Hyper-V or VirtualBox, for the
guest inspection.

Each guest's root is made of real parts: Debian's cloud kernel and its modules, unpacked from
the package (:func:`tests.boot_disks.kernel`), the module index written by ``depmod`` over the
modules the guest has, and an initramfs made with ``cpio`` the way initramfs-tools and dracut
lay theirs out (a plain archive with the CPU microcode first, then the rest compressed), holding
the storage drivers the guest's shape says. The configuration files are the ones each
distribution writes. Filesystems are made from the trees with ``mke2fs -d`` at their offsets;
an LVM root is made by the lvm2 tools (:func:`tests.guest_disks.make_volume_group`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests import boot_disks
from tests.guest_disks import GPT_EFI, GPT_LINUX, make_volume_group, partition_layout, run_tool

COMPRESSORS = {"zstd": ["zstd", "-q", "-19", "-c"], "xz": ["xz", "--check=crc32", "-c"], "gzip": ["gzip", "-9", "-c"]}
VIRTIO = ("drivers/block/virtio_blk.ko", "drivers/scsi/virtio_scsi.ko", "drivers/virtio/virtio_pci.ko",
          "drivers/scsi/sd_mod.ko")
VMWARE = ("drivers/scsi/vmw_pvscsi.ko", "drivers/scsi/sd_mod.ko", "drivers/ata/ata_piix.ko")
NETWORK = ("drivers/net/virtio_net.ko",)


def tools_missing() -> list[str]:
    return [t for t in ("cpio", "depmod", "mke2fs", "sfdisk", "zstd", "xz", "unshare", "mount", "lvm")
            if shutil.which(t) is None] + boot_disks.tools_missing()


@dataclass(frozen=True)
class Guest:
    disk: Path
    root_uuid: str
    boot_uuid: str | None
    kernel: str


def kernel_version() -> str:
    return boot_disks.kernel().name[len("vmlinuz-"):]


def _package_root() -> Path:
    return boot_disks.kernel().parent.parent


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> Path:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)
    return target


def _link(root: Path, path: str, target: str) -> None:
    where = root / path.lstrip("/")
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target)


def kernel_tree(root: Path, boot: Path, modules: tuple[str, ...]) -> str:
    """The kernel in ``boot`` (``/boot``), and ``modules`` under ``root``'s ``/lib/modules``,
    indexed by ``depmod``; returns the kernel version."""
    version, package = kernel_version(), _package_root()
    boot.mkdir(parents=True, exist_ok=True)
    for name in (f"vmlinuz-{version}", f"config-{version}"):
        shutil.copy(package / "boot" / name, boot / name)
    source = package / "lib" / "modules" / version
    target = root / "lib" / "modules" / version
    target.mkdir(parents=True)
    for name in ("modules.builtin", "modules.order", "modules.builtin.modinfo"):
        shutil.copy(source / name, target / name)
    for module in set(modules) | set(NETWORK):
        (target / "kernel" / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "kernel" / module, target / "kernel" / module)
    run_tool("depmod", "-b", str(root), version)
    return version


def initramfs(path: Path, version: str, modules: tuple[str, ...], compression: str, work: Path) -> Path:
    """An initramfs as the guest's tool makes one: a plain cpio with the microcode, then the
    rest (``/init``, busybox, the modules under ``usr/lib/modules``) compressed."""
    early, main = work / "early", work / "main"
    _write(early, "kernel/x86/microcode/GenuineIntel.bin", "microcode")
    _write(main, "init", "#!/bin/sh\nexec /bin/sh\n", 0o755)
    (main / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy(boot_disks.BUSYBOX, main / "bin" / "busybox")
    source = _package_root() / "lib" / "modules" / version / "kernel"
    for module in modules:
        target = main / "usr" / "lib" / "modules" / version / "kernel" / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / module, target)
    _link(main, "lib", "usr/lib")

    def archive(tree: Path) -> bytes:
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=tree, capture_output=True, check=True).stdout
        return subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=tree, input=names, capture_output=True,
                              check=True).stdout

    packed = subprocess.run(COMPRESSORS[compression], input=archive(main), capture_output=True, check=True).stdout
    path.write_bytes(archive(early) + packed)
    return path


def _ext4(disk: Path, offset: int, size: int, tree: Path, fs_uuid: str, label: str) -> None:
    run_tool("mke2fs", "-q", "-F", "-t", "ext4", "-U", fs_uuid, "-L", label, "-d", str(tree), "-E",
             f"offset={offset}", str(disk), f"{size // 1024}k")


def _common(root: Path, os_release: str) -> None:
    _write(root, "/usr/lib/os-release", os_release)
    _link(root, "/etc/os-release", "../usr/lib/os-release")
    for directory in ("tmp", "dev", "proc", "sys"):
        (root / directory).mkdir(exist_ok=True)


DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n'
ORACLE = 'NAME="Oracle Linux Server"\nVERSION="9.4"\nID="ol"\nID_LIKE="fedora"\nVERSION_ID="9.4"\n' \
         'PRETTY_NAME="Oracle Linux Server 9.4"\n'


def vmware_debian(path: Path, work: Path) -> Guest:
    """A Debian guest as it leaves VMware: initramfs-tools with ``MODULES=dep`` (pvscsi, no
    virtio), ``root=/dev/sda2`` and a device-named fstab, a static address on ``ens192`` and a
    MAC pinned by udev, the console on tty0 only, open-vm-tools started at boot."""
    root, boot = work / "root", work / "boot"
    version = kernel_tree(root, boot, VMWARE)
    initramfs(boot / f"initrd.img-{version}", version, VMWARE, "zstd", work / "initramfs")
    _common(root, DEBIAN)
    _write(root, "/etc/debian_version", "12.7\n")
    _write(root, "/usr/sbin/update-initramfs", "#!/bin/sh\n", 0o755)
    _write(root, "/etc/initramfs-tools/initramfs.conf", "MODULES=most\nCOMPRESS=zstd\n")
    _write(root, "/etc/initramfs-tools/conf.d/driver-policy", "# Driver inclusion policy selected during installation\n"
           "MODULES=dep\n")
    _write(boot, "grub/grub.cfg", "set default=0\nmenuentry 'Debian GNU/Linux' {\n"
           f"\tlinux\t/vmlinuz-{version} root=/dev/sda2 ro quiet\n\tinitrd\t/initrd.img-{version}\n}}\n")
    _write(root, "/etc/default/grub", 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\n')
    _write(root, "/etc/fstab", "# <file system> <mount point> <type> <options> <dump> <pass>\n"
           "/dev/sda2 / ext4 errors=remount-ro 0 1\n/dev/sda1 /boot ext4 defaults 0 2\n"
           "/dev/sdb1 /data ext4 defaults 0 2\n")
    _write(root, "/etc/network/interfaces", "auto lo\niface lo inet loopback\n\nauto ens192\n"
           "iface ens192 inet static\n    address 10.20.30.40/24\n    gateway 10.20.30.1\n")
    _write(root, "/etc/udev/rules.d/70-persistent-net.rules",
           'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{address}=="00:50:56:8a:12:34", NAME="ens192"\n')
    _write(root, "/usr/bin/vmtoolsd", "", 0o755)
    _write(root, "/lib/systemd/system/open-vm-tools.service", "[Unit]\nDescription=open-vm-tools\n")
    _link(root, "/etc/systemd/system/multi-user.target.wants/open-vm-tools.service",
          "/lib/systemd/system/open-vm-tools.service")
    boot_uuid, root_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    [(boot_at, boot_size), (root_at, root_size)] = partition_layout(path, "dos", [(40, "83"), (40, "83")])
    _ext4(path, boot_at, boot_size, boot, boot_uuid, "boot")
    _ext4(path, root_at, root_size, root, root_uuid, "root")
    return Guest(path, root_uuid, boot_uuid, version)


def cloud_ready_debian(path: Path, work: Path) -> Guest:
    """A Debian guest that boots on virtio: ``MODULES=most`` (virtio inside), UUIDs everywhere,
    netplan DHCP on any ``en*`` card, ``console=ttyS0``, cloud-init installed; a GPT disk with
    an EFI System Partition and one root filesystem holding ``/boot``."""
    root = work / "root"
    version = kernel_tree(root, root / "boot", VIRTIO + VMWARE)
    initramfs(root / "boot" / f"initrd.img-{version}", version, VIRTIO + VMWARE, "gzip", work / "initramfs")
    _common(root, DEBIAN)
    _write(root, "/usr/sbin/update-initramfs", "#!/bin/sh\n", 0o755)
    _write(root, "/etc/initramfs-tools/initramfs.conf", "MODULES=most\n")
    root_uuid = str(uuid.uuid4())
    _write(root, "/boot/grub/grub.cfg", "menuentry 'Debian GNU/Linux' {\n"
           f"\tlinux\t/boot/vmlinuz-{version} root=UUID={root_uuid} ro console=tty0 console=ttyS0,115200\n}}\n")
    _write(root, "/etc/fstab", f"UUID={root_uuid} / ext4 errors=remount-ro 0 1\nLABEL=EFI /boot/efi vfat umask=0077 0 1\n")
    _write(root, "/etc/netplan/50-cloud-init.yaml", "network:\n  version: 2\n  ethernets:\n    all-en:\n"
           "      match:\n        name: \"en*\"\n      dhcp4: true\n")
    _write(root, "/etc/cloud/cloud.cfg", "datasource_list: [ Oracle, None ]\n")
    _write(root, "/usr/bin/cloud-init", "", 0o755)
    [(_, _), (root_at, root_size)] = partition_layout(path, "gpt", [(8, GPT_EFI), (60, GPT_LINUX)])
    _ext4(path, root_at, root_size, root, root_uuid, "root")
    return Guest(path, root_uuid, None, version)


def dracut_lvm_oracle(path: Path, work: Path) -> Guest:
    """An Oracle Linux guest from Hyper-V: dracut in host-only mode (hv_storvsc, no virtio, xz),
    the root on LVM (``/dev/mapper/ol-root``), ``/boot`` on its own partition named by UUID,
    an ifcfg file pinned to the old MAC, SELinux enforcing, BLS boot entries."""
    root, boot = work / "root", work / "boot"
    modules = ("drivers/scsi/sd_mod.ko", "drivers/ata/ata_piix.ko")
    version = kernel_tree(root, boot, modules)
    initramfs(boot / f"initramfs-{version}.img", version, modules, "xz", work / "initramfs")
    _common(root, ORACLE)
    _write(root, "/etc/redhat-release", "Oracle Linux Server release 9.4\n")
    _write(root, "/usr/bin/dracut", "#!/bin/sh\n", 0o755)
    _write(root, "/etc/dracut.conf.d/hostonly.conf", 'hostonly="yes"\n')
    _write(boot, f"loader/entries/ol-{version}.conf", f"title Oracle Linux Server\nversion {version}\n"
           f"linux /vmlinuz-{version}\ninitrd /initramfs-{version}.img\noptions $kernelopts\n")
    _write(boot, "grub2/grubenv", "# GRUB Environment Block\nkernelopts=root=/dev/mapper/ol-root ro "
           "rd.lvm.lv=ol/root crashkernel=auto rhgb quiet\n")
    _write(boot, "grub2/grub.cfg", "blscfg\n")
    boot_uuid = str(uuid.uuid4())
    _write(root, "/etc/fstab", f"/dev/mapper/ol-root / ext4 defaults 0 0\nUUID={boot_uuid} /boot ext4 defaults 1 2\n"
           "/dev/mapper/ol-swap none swap defaults 0 0\n")
    _write(root, "/etc/sysconfig/network-scripts/ifcfg-eth0", 'DEVICE=eth0\nHWADDR="00:15:5D:01:02:03"\n'
           "BOOTPROTO=dhcp\nONBOOT=yes\n")
    _write(root, "/etc/selinux/config", "SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    _write(root, "/usr/sbin/hv_kvp_daemon", "", 0o755)
    [(boot_at, boot_size), (pv_at, pv_size)] = partition_layout(path, "dos", [(40, "83"), (72, "8e")])
    _ext4(path, boot_at, boot_size, boot, boot_uuid, "boot")
    layout = make_volume_group([(path, pv_at, pv_size)], "ol", [["-n", "root", "-L", "60m"], ["-n", "swap", "-L", "4m"]])
    root_at, root_size = layout.lv_range("root", "pv0")
    root_uuid = str(uuid.uuid4())
    _ext4(path, pv_at + root_at, root_size, root, root_uuid, "root")
    return Guest(path, root_uuid, boot_uuid, version)
