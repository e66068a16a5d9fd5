"""What the guest adaptation writes into a guest's configuration files (diskimport/agent/adapt_edits.py):
kernel command lines, GRUB's defaults and environment block, fstab, ifupdown's interfaces."""

from __future__ import annotations

from diskimport.agent import adapt_edits as edits

DEVICES = {"/dev/sda2": "1111-root", "/dev/sda3": "2222-swap"}


def test_the_command_line_names_devices_by_uuid_and_gains_a_serial_console_and_classic_names():
    edited = edits.edit_cmdline("ro root=/dev/sda2 resume=/dev/sda3 quiet", DEVICES)
    assert edited.split() == ["ro", "root=UUID=1111-root", "resume=UUID=2222-swap", "quiet", "console=tty0",
                              "console=ttyS0,115200", "net.ifnames=0"]


def test_the_consoles_there_are_stay_and_a_serial_one_is_added_once():
    assert edits.edit_cmdline("root=UUID=x console=tty1", {}, names=False) == "root=UUID=x console=tty1 console=ttyS0,115200"
    already = "root=UUID=x console=tty0 console=ttyS0,9600 net.ifnames=1"
    assert edits.edit_cmdline(already, {}) == already  # a serial console and a naming choice kept as they are


def test_a_device_name_not_on_the_disk_is_left_as_it_is():
    assert edits.edit_cmdline("root=/dev/sdb1", DEVICES, console=False, names=False) == "root=/dev/sdb1"


def test_grub_cfg_edits_every_linux_line_and_nothing_else():
    text = ("menuentry 'Debian' {\n\tlinux\t/vmlinuz-6 root=/dev/sda2 ro quiet\n\tinitrd\t/initrd.img-6\n}\n"
            "menuentry 'rescue' {\n\tlinux16 /vmlinuz-5 root=/dev/sda2 single\n}\n# linux in a comment\n")
    edited = edits.edit_grub_cfg(text, DEVICES, names=False)
    assert "\tlinux\t/vmlinuz-6 ro quiet root=UUID=1111-root" not in edited  # the order of the words is kept
    assert "\tlinux\t/vmlinuz-6 root=UUID=1111-root ro quiet console=tty0 console=ttyS0,115200\n" in edited
    assert "\tlinux16 /vmlinuz-5 root=UUID=1111-root single console=tty0 console=ttyS0,115200\n" in edited
    assert "\tinitrd\t/initrd.img-6\n" in edited and "# linux in a comment\n" in edited


def test_grub_defaults_keep_the_changes_for_the_next_kernel_and_stop_naming_the_root_by_device():
    text = 'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX="rootdelay=20"\nGRUB_DISABLE_LINUX_UUID=true\n'
    edited = edits.edit_grub_defaults(text, {}).splitlines()
    assert 'GRUB_CMDLINE_LINUX="rootdelay=20 console=tty0 console=ttyS0,115200 net.ifnames=0"' in edited
    assert 'GRUB_CMDLINE_LINUX_DEFAULT="quiet"' in edited
    assert "GRUB_DISABLE_LINUX_UUID=true" not in edited and edits.MARK + " GRUB_DISABLE_LINUX_UUID=true" in edited
    missing = edits.edit_grub_defaults("GRUB_DEFAULT=0\n", {}, names=False)
    assert missing.endswith('GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200"\n')


def test_grubenv_keeps_its_1024_bytes():
    body = b"# GRUB Environment Block\nkernelopts=root=/dev/sda2 ro rhgb quiet\nsaved_entry=ol\n"
    block = body + b"#" * (1024 - len(body))
    edited = edits.edit_grubenv(block, DEVICES)
    assert len(edited) == 1024 and edited.endswith(b"#")
    assert b"kernelopts=root=UUID=1111-root ro rhgb quiet console=tty0 console=ttyS0,115200 net.ifnames=0\n" in edited
    assert b"saved_entry=ol\n" in edited
    assert edits.edit_grubenv(b"not a block", DEVICES) is None
    crowded = b"# GRUB Environment Block\nkernelopts=" + b"x" * 990 + b"\n"
    assert edits.edit_grubenv(crowded + b"#" * (1024 - len(crowded)), DEVICES) is None  # no room: left alone


def test_fstab_names_devices_by_uuid_and_lets_a_missing_one_fail():
    text = ("# <file system> <mount point>\n/dev/sda2 / ext4 errors=remount-ro 0 1\n"
            "/dev/sdb1\t/data\text4\tdefaults\t0\t2\n/dev/sdc1 /backup xfs\nUUID=abc /boot ext4 defaults 0 2\n")
    edited = edits.edit_fstab(text, DEVICES, {"/dev/sdb1", "/dev/sdc1"}).splitlines()
    assert edited[0] == "# <file system> <mount point>"
    assert edited[1] == "UUID=1111-root / ext4 errors=remount-ro 0 1"
    assert edited[2] == "/dev/sdb1\t/data\text4\tdefaults,nofail\t0\t2"
    assert edited[3] == "/dev/sdc1\t/backup\txfs\tdefaults,nofail"
    assert edited[4] == "UUID=abc /boot ext4 defaults 0 2"


def test_interfaces_keep_the_loopback_and_sources_and_comment_out_the_old_cards():
    text = ("source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\nauto ens192\n"
            "iface ens192 inet static\n    address 10.20.30.40/24\n    gateway 10.20.30.1\n")
    edited = edits.edit_interfaces(text).splitlines()
    assert edited[:4] == ["source /etc/network/interfaces.d/*", "", "auto lo", "iface lo inet loopback"]
    assert edited[5:] == [f"{edits.MARK} auto ens192", f"{edits.MARK} iface ens192 inet static",
                          f"{edits.MARK}     address 10.20.30.40/24", f"{edits.MARK}     gateway 10.20.30.1"]
    assert edits.edit_interfaces("auto lo\niface lo inet loopback\n") == "auto lo\niface lo inet loopback\n"


def test_a_bls_entry_that_takes_its_options_from_grubenv_is_left_to_grubenv():
    entry = "title Oracle Linux\nlinux /vmlinuz-5\noptions $kernelopts\n"
    assert edits.edit_bls_entry(entry, DEVICES) == entry
    own = "title Oracle Linux\nlinux /vmlinuz-5\noptions root=/dev/sda2 ro\n"
    assert edits.edit_bls_entry(own, DEVICES, names=False) == (
        "title Oracle Linux\nlinux /vmlinuz-5\noptions root=UUID=1111-root ro console=tty0 console=ttyS0,115200\n")
