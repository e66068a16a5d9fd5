"""The guest adaptation on real disks, as on a worker (the ``adapt`` program under ``unshare``, run
here): a Debian machine built from Debian's packages as it leaves VMware (tests/debian_guests.py)
is adapted with its own update-initramfs and its report then says it boots and answers on virtio;
every original is kept inside the guest. An adaptation whose guest tool fails puts every file back.
A guest's tool runs confined: no network, no other process, no mount, a bounded set of powers.
(Its boots, adapted and not, are in tests/e2e/test_bootable_machines.py.)"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from diskimport.agent import adapt_edits
from diskimport.guest import adaptation, filesystems, report
from diskimport.worker_vm.commands import LocalRunner
from tests import debian_guests, linux_guests

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="adapting a guest mounts its filesystems: root"),
              pytest.mark.heavy]
KEPT = "/var/lib/oci-disk-import/adaptation"


@contextlib.contextmanager
def mounted(disk: Path, check: filesystems.FilesystemCheck, writable: bool = False) -> Iterator[Path]:
    """The filesystem ``check`` found, mounted (read-only unless ``writable``) in a directory of its own."""
    where = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    options = f"loop,offset={check.offset},sizelimit={check.size}" + ("" if writable else ",ro,noload")
    subprocess.run(["mount", "-t", str(check.filesystem), "-o", options, str(disk), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        where.rmdir()


def tree_digest(top: Path) -> dict[str, str]:
    """Every file's content (or link's target) and mode under ``top``."""
    found = {}
    for directory, names, files in os.walk(top):
        for name in names + files:
            path = Path(directory, name)
            info = path.lstat()
            if path.is_symlink():
                found[str(path.relative_to(top))] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path.relative_to(top))] = f"{info.st_mode:o} " + hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(path.relative_to(top))] = f"{info.st_mode:o}"
    return found


def checks_of(disk: Path) -> list[filesystems.FilesystemCheck]:
    return filesystems.check_device(LocalRunner(), str(disk), disk.stat().st_size)


def adapt(disk: Path) -> tuple[report.GuestReport, report.Adaptation, report.GuestReport]:
    runner, checks = LocalRunner(), checks_of(disk)
    before = report.inspect_guest(runner, str(disk), checks)
    done = adaptation.adapt_guest(runner, str(disk), checks, before)
    after = report.inspect_guest(runner, str(disk), checks)
    assert subprocess.run(["losetup", "-j", str(disk)], capture_output=True, text=True).stdout == ""
    assert "oci-adapt." not in Path("/proc/self/mountinfo").read_text()
    return before, done, after


@pytest.fixture(scope="module")
def debian_machine(tmp_path_factory: pytest.TempPathFactory) -> debian_guests.Machine:
    missing = debian_guests.tools_missing()
    if missing:
        pytest.skip(f"guest building tools missing: {missing}")
    tmp = tmp_path_factory.mktemp("debian")
    (tmp / "work").mkdir()
    return debian_guests.uefi_lvm_machine(tmp / "uefi-lvm.raw", tmp / "work")


def test_a_debian_machine_from_vmware_is_adapted_with_its_own_tools_and_keeps_its_originals(debian_machine):
    before, done, after = adapt(debian_machine.disk)
    paravirtualized = before.verdict(report.PARAVIRTUALIZED)
    assert (paravirtualized.boots, paravirtualized.reachable) == (False, False), paravirtualized
    assert before.initramfs_tool["setting"] == "MODULES=dep"
    assert (after.verdict(report.PARAVIRTUALIZED).boots, after.verdict(report.PARAVIRTUALIZED).reachable) == (True, True)
    [kernel] = after.kernels
    assert {"virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net", "vmw_pvscsi"} <= set(kernel["initramfs_drivers"])
    assert after.bootloader["serial_console"] and after.initramfs_tool["setting"] == "MODULES=dep"
    changed = {c["path"]: c for c in done.changes}
    assert changed[f"/boot/initrd.img-{debian_machine.kernel}"]["action"] == "rebuilt"
    assert "update-initramfs" in changed[f"/boot/initrd.img-{debian_machine.kernel}"]["why"]
    assert changed["/etc/udev/rules.d/70-persistent-net.rules"]["action"] == "removed"
    assert {"/etc/fstab", "/etc/default/grub", "/boot/grub/grub.cfg", "/etc/network/interfaces",
            "/etc/initramfs-tools/modules"} <= set(changed)
    fstab = {e["mountpoint"]: e for e in after.fstab}
    assert fstab["/boot"]["naming"] == "uuid" and fstab["/"]["spec"] == "/dev/mapper/vg0-root"  # LVM names stay

    checks = {c.location: c for c in checks_of(debian_machine.disk)}
    with mounted(debian_machine.disk, checks["p3:vg0/root"]) as root:
        log = (root / KEPT.lstrip("/") / "changes.log").read_text()
        assert "/etc/fstab" in log and "/etc/udev/rules.d/70-persistent-net.rules" in log
        kept = root / KEPT.lstrip("/") / "originals"
        assert "/dev/sda2 /boot ext4" in (kept / "etc/fstab").read_text()
        assert "ATTR{address}==\"00:50:56:8a:56:78\"" in (kept / "etc/udev/rules.d/70-persistent-net.rules").read_text()
        assert not (root / "etc/udev/rules.d/70-persistent-net.rules").exists()
        defaults = (root / "etc/default/grub").read_text()
        assert "console=ttyS0,115200" in defaults and "net.ifnames=0" in defaults
        assert adapt_edits.MARK + " GRUB_DISABLE_LINUX_UUID=true" in defaults
        assert "iface eth0 inet dhcp" in (root / "etc/network/interfaces").read_text()
        assert "virtio_blk" in (root / "etc/initramfs-tools/modules").read_text()
        assert not (root / "etc/initramfs-tools/conf.d/zz-oci-disk-import-rebuild").exists()  # for the rebuild only
    with mounted(debian_machine.disk, checks["p2"]) as boot:  # the initramfs kept is on the root filesystem
        assert "console=ttyS0,115200" in (boot / "grub/grub.cfg").read_text()

    again = adaptation.adapt_guest(LocalRunner(), str(debian_machine.disk), list(checks.values()), after)
    assert again.changes == []  # adapted once: nothing left to change


@pytest.fixture
def stub_guest(tmp_path: Path) -> linux_guests.Guest:
    missing = linux_guests.tools_missing()
    if missing:
        pytest.skip(f"guest building tools missing: {missing}")
    (tmp_path / "work").mkdir()
    return linux_guests.vmware_debian(tmp_path / "vmware.raw", tmp_path / "work")


def test_an_adaptation_that_fails_puts_every_file_back_and_says_so(stub_guest):
    """The guest's update-initramfs cannot run (no /bin/sh in this guest): the edits already made
    are undone and the run fails with its code."""
    checks = {c.location: c for c in checks_of(stub_guest.disk)}
    digests = {}
    for location in ("p1", "p2"):
        with mounted(stub_guest.disk, checks[location]) as top:
            digests[location] = tree_digest(top)
    with pytest.raises(adaptation.AdaptationFailed) as failed:
        adapt(stub_guest.disk)
    assert failed.value.code == "guest-adaptation-failed" and failed.value.adaptation.restored
    assert "update-initramfs" in failed.value.adaptation.error and "put back" in str(failed.value)
    assert failed.value.report.adaptation is failed.value.adaptation and not failed.value.adaptation.ok
    for location in ("p1", "p2"):
        with mounted(stub_guest.disk, checks[location]) as top:
            assert tree_digest(top) == digests[location], location


PROBE = """#!/bin/sh
exec > /probe.txt 2>&1
echo "processes: $(ls /proc | grep -c '^[0-9]')"
echo "interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')"
mount -t tmpfs none /mnt; echo "mount: $?"
cat /proc/sys/kernel/modprobe > /proc/sys/kernel/modprobe; echo "sysctl: $?"
echo "devices: $(ls /dev | tr '\\n' ' ')"
grep CapBnd /proc/self/status
echo "outside: $(ls / | tr '\\n' ' ')"
exit 0
"""


def test_a_guest_tool_runs_without_network_other_processes_mounts_or_the_powers_that_lead_out(stub_guest):
    checks = {c.location: c for c in checks_of(stub_guest.disk)}
    with mounted(stub_guest.disk, checks["p2"], writable=True) as root:
        (root / "bin").mkdir(exist_ok=True)
        shutil.copy("/bin/busybox", root / "bin" / "busybox")
        for tool in ("sh", "ls", "grep", "tail", "cut", "tr", "mount", "echo", "cat"):
            (root / "bin" / tool).symlink_to("busybox")
        (root / "mnt").mkdir()
        (root / "proc").mkdir(exist_ok=True)
        (root / "dev").mkdir(exist_ok=True)
        (root / "usr/sbin/update-initramfs").write_text(PROBE)
    with pytest.raises(adaptation.AdaptationFailed) as failed:  # the probe adds no driver
        adapt(stub_guest.disk)
    assert "still lacks" in failed.value.adaptation.error
    with mounted(stub_guest.disk, checks["p2"]) as root:
        probe = dict(line.split(":", 1) for line in (root / "probe.txt").read_text().splitlines() if ":" in line)
    # its own pid namespace: the script, its command substitution and the two commands in it, not the worker's
    assert int(probe["processes"]) <= 4, probe
    assert probe["interfaces"].split() == ["lo"], probe  # a network namespace of its own, with no card
    assert probe["mount"].strip() != "0", probe
    assert probe["sysctl"].strip() != "0", probe  # the worker's kernel settings are read-only to it
    assert probe["devices"].split() == ["fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout",
                                        "urandom", "zero"], probe
    assert int(probe["CapBnd"], 16) == 0b11011111, probe  # chown, dac_*, fowner, fsetid, setgid, setuid
    assert "probe.txt" in probe["outside"] and "tmp" in probe["outside"]  # the guest's root is its /
