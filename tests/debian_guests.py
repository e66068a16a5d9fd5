"""Debian machines built from Debian's own packages and shaped the way they leave VMware, for the
guest adaptation: they boot on OCI's paravirtualized devices only once adapted.

**One root** (:func:`root_tarball`), made once by ``mmdebstrap`` from Debian's packages and
cached in the tests' cache (``tests.boot_disks.TEST_CACHE``, named by what went into it): Debian's cloud kernel,
initramfs-tools, systemd, openssh-server, ifupdown with the ISC DHCP client, GRUB for BIOS and
UEFI, lvm2. Its initramfs is made by its own ``update-initramfs`` as on a VMware host with
``MODULES=dep``: that host's disk drivers (``vmw_pvscsi``, ``mptspi``, ``ata_piix``, ``sd_mod``),
no virtio. ``MODULES=dep`` is what its configuration then says, as the installer leaves it.

**Each machine** is a disk made from that root with a shape of its own
(:func:`bios_machine`, :func:`uefi_lvm_machine`): root and fstab named by device
(``/dev/sda1``), a static address on ``ens192`` pinned to the old MAC by udev, the console on
``tty0`` only, GRUB installed from the guest's own files (``boot.img`` and a ``core.img`` made by
its ``grub-mkimage``, or its ``BOOTX64.EFI``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.boot_disks import TEST_CACHE
from tests.guest_disks import GPT_EFI, GPT_LINUX, make_volume_group, partition_layout, run_tool, write_at

CACHE = TEST_CACHE / "debian-guests"
SUITE = "bookworm"
MIRRORS = ("deb http://deb.debian.org/debian bookworm main",
           "deb http://deb.debian.org/debian bookworm-updates main",
           "deb http://deb.debian.org/debian-security bookworm-security main")
PACKAGES = ("linux-image-cloud-amd64", "initramfs-tools", "systemd-sysv", "udev", "openssh-server", "ifupdown",
            "isc-dhcp-client", "grub-pc-bin", "grub-efi-amd64-bin", "lvm2", "kmod", "busybox", "zstd")
VMWARE_DRIVERS = ("vmw_pvscsi", "mptspi", "ata_piix", "sd_mod")
HOSTNAME = "vmware-guest"
LOGIN_PROMPT = f"{HOSTNAME} login:"
GRUB_CMDLINE = "ro quiet"
GPT_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"
# Not in the guest: documentation, manuals and translations
EXCLUDES = ("/usr/share/man/*", "/usr/share/doc/*", "/usr/share/locale/*", "/usr/share/info/*",
            # and drivers for hardware no test machine has (smaller disks to import)
            *(f"/lib/modules/*/kernel/drivers/{d}/*" for d in ("infiniband", "comedi", "target", "media", "gpu",
                                                                   "net/wireless", "hid", "input", "staging")))
SHAPE = f"""set -e
printf '%s\\n' {' '.join(VMWARE_DRIVERS)} >> "$1/etc/initramfs-tools/modules"
echo MODULES=list > "$1/etc/initramfs-tools/conf.d/driver-policy"
chroot "$1" update-initramfs -u -k all
printf '# Driver inclusion policy selected during installation\\n# Note: this setting only affects the initramfs\\nMODULES=dep\\n' > "$1/etc/initramfs-tools/conf.d/driver-policy"
echo {HOSTNAME} > "$1/etc/hostname"
rm -rf "$1"/var/cache/apt/*.bin "$1"/var/lib/apt/lists/* "$1"/var/log/*.log
"""


def tools_missing() -> list[str]:
    return [t for t in ("mmdebstrap", "mke2fs", "sfdisk", "mkfs.vfat", "mcopy", "lvm", "tar") if shutil.which(t) is None]


def recipe() -> str:
    return hashlib.sha256("\n".join((SUITE, *MIRRORS, *PACKAGES, *EXCLUDES, SHAPE)).encode()).hexdigest()[:12]


def root_tarball() -> Path:
    """The shared root as a tarball, made once (under a lock: test workers may ask at once)."""
    path = CACHE / f"root-{recipe()}.tar"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            partial = path.with_suffix(".partial")
            run_tool("mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(PACKAGES),
                     "--aptopt=Acquire::Check-Valid-Until \"false\"", "--aptopt=Acquire::Check-Date \"false\"",
                     *[f"--dpkgopt=path-exclude={p}" for p in EXCLUDES],
                     f"--customize-hook={SHAPE}", "--format=tar", SUITE, str(partial), *MIRRORS)
            os.replace(partial, path)
    return path


def kernel_version(root: Path) -> str:
    [version] = [p.name[len("vmlinuz-"):] for p in (root / "boot").glob("vmlinuz-*")]
    return version


@dataclass(frozen=True)
class Machine:
    disk: Path
    firmware: str         # BIOS or UEFI_64
    kernel: str
    root_uuid: str


def _unpack(work: Path) -> Path:
    root = work / "root"
    root.mkdir()
    run_tool("tar", "--numeric-owner", "-xpf", str(root_tarball()), "-C", str(root))
    return root


def _write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def _vmware_network(root: Path, interface: str, mac: str) -> None:
    _write(root, "/etc/network/interfaces", "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n"
           f"auto {interface}\niface {interface} inet static\n    address 10.20.30.40/24\n    gateway 10.20.30.1\n")
    _write(root, "/etc/udev/rules.d/70-persistent-net.rules",
           f'SUBSYSTEM=="net", ACTION=="add", DRIVERS=="?*", ATTR{{address}}=="{mac}", NAME="{interface}"\n')


def _grub_defaults(root: Path) -> None:
    """As a VMware install that named its root by device leaves them: no serial console."""
    _write(root, "/etc/default/grub", 'GRUB_DEFAULT=0\nGRUB_TIMEOUT=0\nGRUB_DISTRIBUTOR="Debian"\n'
           'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\nGRUB_DISABLE_LINUX_UUID=true\n')


def _grub_cfg(path: Path, kernel_dir: str, version: str, root_spec: str) -> None:
    """GRUB's generated config, as grub-mkconfig writes its first entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("set default=0\nset timeout=0\ninsmod gzio\ninsmod ext2\n"
                    "menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class os {\n"
                    f"\tlinux\t{kernel_dir}/vmlinuz-{version} root={root_spec} {GRUB_CMDLINE}\n"
                    f"\tinitrd\t{kernel_dir}/initrd.img-{version}\n}}\n")


def _ext4(disk: Path, offset: int, size: int, tree: Path, fs_uuid: str, label: str) -> None:
    run_tool("mke2fs", "-q", "-F", "-t", "ext4", "-U", fs_uuid, "-L", label, "-d", str(tree), "-E",
             f"offset={offset}", str(disk), f"{size // 1024}k")


def _grub_mkimage(root: Path, target: str, prefix: str, modules: list[str], config: str | None = None) -> bytes:
    """An image made by the guest's own ``grub-mkimage`` from its own modules, in its root
    (``config``: a configuration embedded in it)."""
    inside = f"/tmp/grub-{uuid.uuid4().hex[:8]}"
    embedded = []
    if config is not None:
        (root / (inside.lstrip("/") + ".cfg")).write_text(config)
        embedded = ["-c", inside + ".cfg"]
    run_tool("chroot", str(root), "grub-mkimage", "-O", target, "-d", f"/usr/lib/grub/{target}", "-o", inside + ".img",
             "-p", prefix, *embedded, *modules)
    made = root / (inside.lstrip("/") + ".img")
    data = made.read_bytes()
    made.unlink()
    if config is not None:
        (root / (inside.lstrip("/") + ".cfg")).unlink()
    return data


def _tree_mib(tree: Path) -> int:
    used = int(run_tool("du", "-s", "--block-size=1M", str(tree)).split()[0])
    return used + used // 3 + 64


def bios_machine(path: Path, work: Path) -> Machine:
    """An MBR disk with one ext4 root holding ``/boot``, GRUB in the MBR and its gap."""
    root = _unpack(work)
    version = kernel_version(root)
    _grub_defaults(root)
    _vmware_network(root, "ens192", "00:50:56:8a:12:34")
    _write(root, "/etc/fstab", "# <file system> <mount point> <type> <options> <dump> <pass>\n"
           "/dev/sda1 / ext4 errors=remount-ro 0 1\n/dev/sdb1 /data ext4 defaults 0 2\n")
    _grub_cfg(root / "boot" / "grub" / "grub.cfg", "/boot", version, "/dev/sda1")
    shutil.copytree(root / "usr/lib/grub/i386-pc", root / "boot/grub/i386-pc")
    core = _grub_mkimage(root, "i386-pc", "(hd0,msdos1)/boot/grub", ["biosdisk", "part_msdos", "ext2"])
    boot_img = (root / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    [(offset, size)] = partition_layout(path, "dos", [(_tree_mib(root), "83")])
    run_tool("sfdisk", "--quiet", "--activate", str(path), "1")
    assert len(core) < offset - 512, "core.img must fit in the gap before the first partition"
    write_at(path, 0, boot_img[:440])  # the partition table after it stays
    write_at(path, 512, core)          # boot.img loads sector 1; core.img's own list goes on from sector 2
    root_uuid = str(uuid.uuid4())
    _ext4(path, offset, size, root, root_uuid, "root")
    return Machine(path, "BIOS", version, root_uuid)


def uefi_lvm_machine(path: Path, work: Path) -> Machine:
    """A GPT disk: an EFI System Partition with GRUB, ``/boot`` on its own partition (fstab:
    ``/dev/sda2``), the root on LVM (``vg0/root``)."""
    root = _unpack(work)
    version = kernel_version(root)
    boot = work / "boot"
    shutil.move(str(root / "boot"), str(boot))
    (root / "boot").mkdir()
    _grub_defaults(root)
    _vmware_network(root, "ens160", "00:50:56:8a:56:78")
    _write(root, "/etc/fstab", "/dev/mapper/vg0-root / ext4 errors=remount-ro 0 1\n/dev/sda2 /boot ext4 defaults 0 2\n"
           "/dev/sda1 /boot/efi vfat umask=0077 0 1\n")
    (root / "boot" / "efi").mkdir()
    _grub_cfg(boot / "grub" / "grub.cfg", "", version, "/dev/mapper/vg0-root")
    boot_uuid, root_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    loader = _grub_mkimage(root, "x86_64-efi", "/grub", [
        "part_gpt", "fat", "ext2", "normal", "linux", "search", "search_fs_uuid", "configfile", "echo", "test",
        "gzio", "efi_gop", "all_video", "boot"],
        config=f"search --no-floppy --fs-uuid --set=root {boot_uuid}\nset prefix=($root)/grub\n"
               "configfile $prefix/grub.cfg\n")
    parts = partition_layout(path, "gpt", [(32, GPT_EFI), (_tree_mib(boot), GPT_LINUX), (_tree_mib(root) + 16, GPT_LVM)])
    (esp_at, esp_size), (boot_at, boot_size), (pv_at, pv_size) = parts
    run_tool("mkfs.vfat", "-F", "16", "-n", "ESP", "--offset", str(esp_at // 512), str(path), str(esp_size // 1024))
    image = f"{path}@@{esp_at}"
    with tempfile.TemporaryDirectory() as scratch:
        efi = Path(scratch) / "BOOTX64.EFI"
        efi.write_bytes(loader)
        run_tool("mmd", "-i", image, "::/EFI", "::/EFI/BOOT")
        run_tool("mcopy", "-i", image, str(efi), "::/EFI/BOOT/BOOTX64.EFI")
    _ext4(path, boot_at, boot_size, boot, boot_uuid, "boot")
    layout = make_volume_group([(path, pv_at, pv_size)], "vg0", [["-n", "root", "-l", "100%FREE"]], autoactivation=True)
    lv_at, lv_size = layout.lv_range("root", "pv0")
    _ext4(path, pv_at + lv_at, lv_size, root, root_uuid, "root")
    return Machine(path, "UEFI_64", version, root_uuid)
