"""The guest inspection on real disks: the worker's ``guest`` program (run here, as on a worker,
under ``unshare``) reads Linux guests shaped the way machines leave VMware and Hyper-V, and a
cloud-ready one (tests/linux_guests.py), and the report says for each launch mode whether the
machine boots and can be reached, and why. Also: a guest cannot make the program read the
worker's files, and the program leaves no mount or loop device behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from diskimport.agent.guest_tree import GuestTree
from diskimport.guest import filesystems, report
from diskimport.worker_vm.agent_archive import ARCHIVE_NAME, agent_archive
from diskimport.worker_vm.commands import LocalRunner
from tests import guest_disks, linux_guests, waiting, windows_hives

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a guest's filesystems needs root")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, linux_guests.Guest]:
    missing = linux_guests.tools_missing()
    if missing:
        pytest.skip(f"guest building tools missing: {missing}")
    tmp = tmp_path_factory.mktemp("linux-guests")
    guests = {}
    for name, build in (("vmware", linux_guests.vmware_debian), ("cloud", linux_guests.cloud_ready_debian),
                        ("hyperv", linux_guests.dracut_lvm_oracle)):
        (tmp / name).mkdir()
        guests[name] = build(tmp / f"{name}.raw", tmp / name)
    return guests


def inspect(disk: Path) -> report.GuestReport:
    runner = LocalRunner()
    checks = filesystems.check_device(runner, str(disk), disk.stat().st_size)
    return report.inspect_guest(runner, str(disk), checks)


def inspected(guest: linux_guests.Guest) -> report.GuestReport:
    """The guest's report; the inspection leaves no loop device over the disk and no mount.

    The kernel lets a loop device go once its last opener closes it: detached while another
    process (another test's probe of every block device) has it open, it goes a moment later.
    """
    found = inspect(guest.disk)
    waiting.wait_for(lambda: subprocess.run(["losetup", "-j", str(guest.disk)], capture_output=True,
                                            text=True).stdout == "", what=f"no loop device over {guest.disk}")
    assert "oci-guest." not in Path("/proc/self/mountinfo").read_text()
    return found


def test_a_debian_guest_from_vmware_does_not_boot_on_virtio_and_the_report_says_why(built):
    guest = built["vmware"]
    found = inspected(guest)
    assert (found.os_type, found.name, found.root) == ("linux", "Debian GNU/Linux 12 (bookworm)", "p2")
    [kernel] = found.kernels
    assert kernel["version"] == guest.kernel == found.default_kernel
    assert kernel["initramfs"] == f"/boot/initrd.img-{guest.kernel}"  # read through the /boot fstab names
    assert kernel["initramfs_drivers"] == ["ata_piix", "sd_mod", "vmw_pvscsi"]
    assert kernel["initramfs_compression"] == ["none", "zstd"] and kernel["initramfs_error"] is None
    assert "virtio_net" in kernel["installed"] and "virtio_blk" not in kernel["builtin"]
    assert found.initramfs_tool == {"tool": "initramfs-tools", "host_only": True, "setting": "MODULES=dep"}
    assert found.bootloader["root"] == [{"spec": "/dev/sda2", "naming": "device"}]
    assert found.bootloader["consoles"] == [] and not found.bootloader["serial_console"]
    assert [(e["spec"], e["naming"], e["location"]) for e in found.fstab] == [
        ("/dev/sda2", "device", "p2"), ("/dev/sda1", "device", "p1"), ("/dev/sdb1", "device", None)]
    assert {(n["kind"], n["interface"], n["method"], tuple(n["pins"])) for n in found.network} == {
        ("ifupdown", "ens192", "static", ("name ens192",)),
        ("udev", "ens192", None, ("mac 00:50:56:8a:12:34", "name ens192"))}
    assert [(t["name"], t["enabled"]) for t in found.hypervisor_tools] == [("open-vm-tools", ["open-vm-tools.service"])]
    paravirtualized, emulated = found.verdict(report.PARAVIRTUALIZED), found.verdict(report.EMULATED)
    assert paravirtualized.boots is False and paravirtualized.reachable is False
    assert any("lacks virtio_pci and virtio_blk or virtio_scsi" in r for r in paravirtualized.reasons)
    assert any("root=/dev/sda2" in r for r in paravirtualized.reasons)
    assert any("static address" in r for r in paravirtualized.reasons)
    assert emulated.boots is True  # ata_piix is in its initramfs
    assert emulated.reachable is False and any("no e1000 driver" in r for r in emulated.reasons)
    text = found.markdown()
    assert "| PARAVIRTUALIZED | **no** | **no** |" in text and "| EMULATED | yes | **no** |" in text
    json.dumps(found.as_dict())  # the summary carries it


def test_a_cloud_ready_guest_boots_on_virtio_and_is_reachable(built):
    found = inspected(built["cloud"])
    paravirtualized = found.verdict(report.PARAVIRTUALIZED)
    assert (paravirtualized.boots, paravirtualized.reachable) == (True, True), paravirtualized.reasons
    assert found.kernels[0]["initramfs_compression"] == ["none", "gzip"]
    assert {"virtio_blk", "virtio_pci", "virtio_scsi"} <= set(found.kernels[0]["initramfs_drivers"])
    assert found.bootloader["serial_console"] and found.bootloader["consoles"] == ["tty0", "ttyS0"]
    assert found.bootloader["root"] == [{"spec": f"UUID={built['cloud'].root_uuid}", "naming": "uuid"}]
    assert found.fstab[0]["location"] == "p2" and found.fstab[1]["location"] is None  # the ESP holds no filesystem
    assert found.cloud_init == {"installed": True, "datasources": ["Oracle", "None"], "disabled": False}
    assert [n["pins"] for n in found.network] == [[]]  # matched by name pattern, not pinned


def test_a_hyperv_oracle_linux_guest_on_lvm_with_dracut_host_only(built):
    guest = built["hyperv"]
    found = inspected(guest)
    assert (found.distribution, found.version, found.root) == ("ol", "9.4", "p2:ol/root")
    [kernel] = found.kernels
    assert kernel["initramfs"] == f"/boot/initramfs-{guest.kernel}.img"
    assert kernel["initramfs_drivers"] == ["ata_piix", "sd_mod"] and kernel["initramfs_compression"] == ["none", "xz"]
    assert found.initramfs_tool == {"tool": "dracut", "host_only": True, "setting": "hostonly=yes"}
    [entry] = found.bootloader["entries"]
    assert entry["cmdline"].startswith("root=/dev/mapper/ol-root ro rd.lvm.lv=ol/root")  # $kernelopts from grubenv
    assert found.bootloader["root"] == [{"spec": "/dev/mapper/ol-root", "naming": "lvm"}]
    assert [(e["spec"], e["location"]) for e in found.fstab] == [
        ("/dev/mapper/ol-root", "p2:ol/root"), (f"UUID={guest.boot_uuid}", "p1"), ("/dev/mapper/ol-swap", "p2:ol/swap")]
    assert found.selinux == "enforcing"
    [ifcfg] = found.network
    assert ifcfg["pins"] == ["name eth0", "mac 00:15:5d:01:02:03"] and ifcfg["method"] == "dhcp"
    assert [t["name"] for t in found.hypervisor_tools] == ["Hyper-V daemons"]
    paravirtualized = found.verdict(report.PARAVIRTUALIZED)
    assert paravirtualized.boots is False and paravirtualized.reachable is False
    assert any("mac 00:15:5d:01:02:03" in r for r in paravirtualized.reasons)


def test_a_disk_without_a_linux_root_is_reported_unknown_not_guessed(tmp_path):
    disk = guest_disks.whole_device_ext4(tmp_path / "data.raw").path
    found = inspect(disk)
    assert found.os_type is None and "no Linux or Windows root found" in found.problems[-1]
    assert all(v.boots is None and v.reachable is None for v in found.verdicts)


def test_a_guests_links_cannot_reach_the_workers_files(tmp_path):
    """``/etc/fstab`` linked to an absolute path of the worker's, ``os-release`` by ``..`` past
    the root, ``/boot`` in a loop: each names the guest's own (missing) file, never the worker's."""
    secret = tmp_path / "worker-secret"
    secret.write_text("UUID=worker-secret / ext4 defaults 0 0\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "fstab").symlink_to(secret)
    (root / "etc" / "os-release").symlink_to("../../../../../.." + str(tmp_path / "os-release"))
    (tmp_path / "os-release").write_text('ID=worker\n')
    (root / "boot").symlink_to("boot")
    tree = GuestTree({"/": str(root)})
    assert tree.resolve("/etc/fstab") is None and tree.read_text("/etc/fstab") is None
    assert tree.read_text("/etc/os-release") is None and tree.listdir("/boot") == []
    (root / str(secret).lstrip("/")).parent.mkdir(parents=True)
    (root / str(secret).lstrip("/")).write_text("/dev/sda1 / ext4 defaults 0 0\n")  # the guest's own file
    assert tree.read_text("/etc/fstab") == "/dev/sda1 / ext4 defaults 0 0\n"


def test_the_guest_program_refuses_to_mount_outside_a_namespace_of_its_own(tmp_path):
    (tmp_path / ARCHIVE_NAME).write_bytes(agent_archive())
    (tmp_path / "guest.json").write_text(json.dumps({"device": "/dev/null", "regions": []}))
    done = subprocess.run(["python3", str(tmp_path / ARCHIVE_NAME), "guest", str(tmp_path / "guest.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "mount namespace of my own" in done.stderr


@pytest.mark.parametrize("services,static,expected", [
    # virtio storage at boot and the virtio network driver: paravirtualized
    ({"viostor": windows_hives.BOOT_START, "netkvm": windows_hives.DEMAND_START, "atapi": windows_hives.BOOT_START},
     None, ("PARAVIRTUALIZED", "PARAVIRTUALIZED", {"PARAVIRTUALIZED": (True, True), "EMULATED": (True, True)})),
    # no virtio driver (as most machines leave VMware): emulated, IDE and E1000
    ({"atapi": windows_hives.BOOT_START, "storahci": windows_hives.DEMAND_START}, None,
     ("IDE", "E1000", {"PARAVIRTUALIZED": (False, False), "EMULATED": (True, True)})),
    # viostor installed but not started at boot: still INACCESSIBLE_BOOT_DEVICE on virtio
    ({"viostor": windows_hives.DEMAND_START, "netkvm": windows_hives.DEMAND_START, "intelide": windows_hives.BOOT_START},
     "10.0.0.5", ("IDE", "E1000", {"PARAVIRTUALIZED": (False, False), "EMULATED": (True, False)})),
])
def test_a_windows_guest_is_read_from_its_registry_hives_and_launched_the_way_it_boots(
        tmp_path, services, static, expected):
    """SYSTEM and SOFTWARE hives written by hivex, placed on an NTFS system drive; the worker's
    program copies them out (nothing mounted) and regipy reads them."""
    missing = windows_hives.tools_missing() + guest_disks.tools_missing()
    if missing:
        pytest.skip(f"tools missing: {missing}")
    disk = windows_hives.windows_disk(tmp_path / "windows.raw", tmp_path, services, static)
    found = inspected(linux_guests.Guest(disk, "", None, ""))
    assert (found.os_type, found.root) == ("windows", "p2")
    assert found.name == "Windows Server 2019 Datacenter (build 17763)"
    assert found.windows["services"] == services and found.windows["control_set"] == "ControlSet001"
    assert {v.mode: (v.boots, v.reachable) for v in found.verdicts} == expected[2]
    if "viostor" in services and services["viostor"] != 0:
        assert "viostor (Start 3) installed but not started at boot" in found.verdict(report.PARAVIRTUALIZED).reasons[0]
    assert launch_types(found) == expected[:2]


def launch_types(found: report.GuestReport) -> tuple[str, str]:
    """The launch options a machine import with the TargetMachine block at ``auto`` chooses."""
    from diskimport.machine_import import launch_types as chosen

    return chosen(found, "auto", "auto")[:2]
