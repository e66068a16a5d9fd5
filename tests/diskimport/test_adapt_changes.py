"""The adaptation's changes on a guest's tree (diskimport/agent/adapt.py, adapt_changes.py), without
mounting anything: every network format turned to DHCP on eth0, hypervisor tools disabled, each
original kept and everything put back by a restore; writes stay inside the guest whatever its
links say."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from diskimport.agent import adapt, adapt_edits
from diskimport.agent.adapt_changes import Changes
from diskimport.agent.guest_tree import GuestTree
from diskimport.agent.linux import inspect_linux

KEPT = "/var/lib/oci-disk-import/adaptation/originals"


def write(root: Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    target.chmod(mode)


def digest(top: Path) -> dict[str, str]:
    found = {}
    for directory, names, files in os.walk(top):
        for name in names + files:
            path = Path(directory, name)
            key = str(path.relative_to(top))
            if path.is_symlink():
                found[key] = "-> " + os.readlink(path)
            elif path.is_file():
                found[key] = f"{path.stat().st_mode:o} " + hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = "dir"
    return found


def rhel_like(root: Path) -> None:
    """A guest with every network format pinned to its old card, and the Hyper-V daemons on."""
    write(root, "/etc/os-release", 'ID="ol"\nVERSION_ID="9.4"\n')
    write(root, "/etc/fstab", "/dev/mapper/ol-root / xfs defaults 0 0\n")
    write(root, "/etc/sysconfig/network-scripts/ifcfg-eth0", 'DEVICE=eth0\nHWADDR="00:15:5D:01:02:03"\n'
          "BOOTPROTO=none\nIPADDR=10.0.0.5\nONBOOT=yes\n")
    write(root, "/etc/sysconfig/network-scripts/ifcfg-lo", "DEVICE=lo\nIPADDR=127.0.0.1\n")
    write(root, "/etc/NetworkManager/system-connections/eth0.nmconnection",
          "[connection]\nid=eth0\ntype=ethernet\ninterface-name=eth0\n[ethernet]\nmac-address=00:15:5D:01:02:03\n"
          "[ipv4]\nmethod=manual\naddress1=10.0.0.5/24\n", 0o600)
    write(root, "/etc/netplan/01-netcfg.yaml", "network:\n  ethernets:\n    ens192:\n      match:\n"
          "        macaddress: 00:50:56:8a:12:34\n      addresses: [10.0.0.5/24]\n")
    write(root, "/etc/systemd/network/10-static.network", "[Match]\nMACAddress=00:15:5d:01:02:03\n\n[Network]\n"
          "Address=10.0.0.5/24\n")
    write(root, "/etc/udev/rules.d/70-persistent-net.rules",
          'SUBSYSTEM=="net", ATTR{address}=="00:15:5d:01:02:03", NAME="eth0"\n')
    write(root, "/usr/sbin/hv_kvp_daemon", "", 0o755)
    write(root, "/usr/lib/systemd/system/hypervkvpd.service", "[Unit]\n")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "hypervkvpd.service").symlink_to("/usr/lib/systemd/system/hypervkvpd.service")


def test_every_network_format_goes_to_dhcp_on_eth0_and_a_restore_puts_every_file_back(tmp_path):
    root = tmp_path / "root"
    rhel_like(root)
    before = digest(root)
    tree = GuestTree({"/": str(root)})
    facts = inspect_linux(tree, [])
    assert adapt.needs_network(facts)
    changes = Changes(tree, KEPT)
    adapt.edit_network(changes, tree, facts)
    adapt.disable_tools(changes, tree, facts)
    done = {c["path"]: c["action"] for c in changes.made}
    assert done == {
        "/etc/sysconfig/network-scripts/ifcfg-eth0": "changed",
        "/etc/NetworkManager/system-connections/eth0.nmconnection": "removed",
        "/etc/netplan/01-netcfg.yaml": "removed",
        "/etc/systemd/network/10-static.network": "removed",
        "/etc/udev/rules.d/70-persistent-net.rules": "removed",
        "/etc/NetworkManager/system-connections/oci-dhcp.nmconnection": "created",
        "/etc/netplan/50-oci-dhcp.yaml": "created",
        "/etc/systemd/network/50-oci-dhcp.network": "created",
        "/etc/systemd/system/multi-user.target.wants/hypervkvpd.service": "disabled",
    }
    # the ifcfg file of the old card is removed, then written again for eth0 without its pin
    assert (root / "etc/sysconfig/network-scripts/ifcfg-eth0").read_text() == adapt_edits.IFCFG_DHCP
    assert (root / "etc/sysconfig/network-scripts/ifcfg-lo").exists()
    assert (root / "etc/NetworkManager/system-connections/oci-dhcp.nmconnection").stat().st_mode & 0o777 == 0o600
    assert "00:15:5D:01:02:03" in (root / KEPT.lstrip("/") / "etc/sysconfig/network-scripts/ifcfg-eth0").read_text()
    assert (root / "usr/lib/systemd/system/hypervkvpd.service").exists()  # disabled, not deleted
    after = inspect_linux(tree, [])
    assert not adapt.needs_network({**after, "bootloader": {"entries": [{"cmdline": "ro net.ifnames=0"}]}})
    assert after["hypervisor_tools"][0]["enabled"] == []

    assert changes.restore() == []
    assert digest(root) == before


@pytest.fixture
def guest(tmp_path: Path) -> tuple[Path, GuestTree]:
    root = tmp_path / "root"
    rhel_like(root)
    return root, GuestTree({"/": str(root)})


def test_the_list_of_changes_is_written_into_the_guest(guest):
    root, tree = guest
    changes = Changes(tree, KEPT)
    changes.write("/etc/fstab", "UUID=x / xfs defaults 0 0\n", "devices by UUID")
    changes.write_log("/var/lib/oci-disk-import/adaptation", 0)
    log = (root / "var/lib/oci-disk-import/adaptation/changes.log").read_text()
    assert "changed  /etc/fstab: devices by UUID (kept: " + KEPT + "/etc/fstab)" in log
    assert (root / KEPT.lstrip("/") / "etc/fstab").read_text() == "/dev/mapper/ol-root / xfs defaults 0 0\n"


def test_a_guest_file_that_links_out_of_the_guest_is_written_inside_it(tmp_path):
    """A hostile guest links /etc/fstab to a worker path: the link is followed inside the guest."""
    root, outside = tmp_path / "root", tmp_path / "worker-file"
    outside.write_text("the worker's\n")
    (root / "etc").mkdir(parents=True)
    (root / "etc/fstab").symlink_to(f"../../../../../../..{outside}")
    write(root, str(outside), "the guest's own\n")  # what the link names, inside the guest
    changes = Changes(GuestTree({"/": str(root)}), KEPT)
    changes.write("/etc/fstab", "changed\n", "test")
    assert outside.read_text() == "the worker's\n"
    assert (root / str(outside).lstrip("/")).read_text() == "changed\n"
    assert changes.restore() == [] and (root / str(outside).lstrip("/")).read_text() == "the guest's own\n"


def test_a_second_adaptation_keeps_the_first_ones_originals(guest):
    root, tree = guest
    first = Changes(tree, KEPT)
    first.write("/etc/fstab", "first\n", "test")
    first.finish()
    second = Changes(tree, KEPT)
    second.write("/etc/fstab", "second\n", "test")
    assert (root / KEPT.lstrip("/") / "etc/fstab").read_text() == "/dev/mapper/ol-root / xfs defaults 0 0\n"
    assert second.restore() == []
    assert (root / "etc/fstab").read_text() == "first\n"  # this adaptation's restore gives back the first's result
    assert (root / KEPT.lstrip("/") / "etc/fstab").read_text() == "/dev/mapper/ol-root / xfs defaults 0 0\n"
    assert not list((root / KEPT.lstrip("/") / "etc").glob("*.before-this-adaptation"))
