"""Firmware detection on real boot disks (built from Debian packages) and on hostile ones, and
the console watch's verdicts."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from diskimport.guest import boot
from tests import boot_disks, guest_disks

pytestmark = pytest.mark.skipif(bool(boot_disks.tools_missing()), reason="boot disk tools missing")


def reader(path: Path) -> boot.Read:
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    return read


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return boot_disks.build_all(tmp_path_factory.mktemp("boot"))


def test_a_uefi_disk_is_detected_by_the_loader_on_its_esp(built):
    found = boot.detect_firmware(reader(built["uefi"]))
    assert found.firmware == boot.UEFI and "/EFI/BOOT/BOOTX64.EFI" in found.reason


def test_a_bios_disk_is_detected_by_its_boot_code(built):
    assert boot.detect_firmware(reader(built["bios"])) == boot.Firmware(boot.BIOS, "disk", "MBR with boot code")


def test_a_disk_without_boot_code_is_not_detected_and_says_why(built):
    found = boot.detect_firmware(reader(built["unbootable"]))
    assert found.firmware is None and "without boot code" in found.reason


def test_an_esp_without_a_loader_is_not_uefi(tmp_path):
    disk = tmp_path / "esp.raw"
    [(offset, size)] = guest_disks.partition_layout(disk, "gpt", [(40, guest_disks.GPT_EFI)])
    image = boot_disks.fat_filesystem(disk, offset, size, "ESP")
    guest_disks.run_tool("mmd", "-i", image, "::/EFI", "::/EFI/BOOT")
    found = boot.detect_firmware(reader(disk))
    assert found.firmware is None and "without an EFI bootloader" in found.reason


def test_a_gpt_bios_boot_partition_means_bios(tmp_path):
    disk = tmp_path / "grub.raw"
    guest_disks.partition_layout(disk, "gpt", [(1, guest_disks.GPT_BIOS_BOOT), (20, guest_disks.GPT_LINUX)])
    found = boot.detect_firmware(reader(disk))
    assert found.firmware == boot.BIOS and "BIOS boot partition" in found.reason


def test_hostile_tables_are_read_within_bounds(built, tmp_path):
    """A GPT claiming millions of entries, and a FAT whose cluster chain loops, find nothing and
    read little."""
    disk = tmp_path / "hostile.raw"
    disk.write_bytes(built["uefi"].read_bytes())
    with open(disk, "r+b") as f:
        f.seek(512 + 80)
        f.write(struct.pack("<I", 10_000_000))
    assert boot.detect_firmware(reader(disk)).firmware is None

    looped = tmp_path / "looped.raw"
    looped.write_bytes(built["uefi"].read_bytes())
    fat = boot.FatVolume(reader(looped), 1024 * 1024, 61 * 1024 * 1024)
    assert fat.bits in (16, 32)
    read_bytes = []

    def counting(offset: int, length: int) -> bytes:
        read_bytes.append(length)
        return reader(looped)(offset, length)
    with open(looped, "r+b") as f:  # every FAT entry points at cluster 2: an endless chain
        entry = b"\x02\x00" if fat.bits == 16 else b"\x02\x00\x00\x00"
        f.seek(1024 * 1024 + fat.fat_start * fat.sector)
        f.write(entry * 4096)
    found = boot.efi_loader(counting, 1024 * 1024, 61 * 1024 * 1024)
    assert sum(read_bytes) < 4 * boot.MAX_DIRECTORY_BYTES, found


def test_the_console_watch_reports_a_boot_or_the_last_lines():
    now = [0.0]
    screens = iter(["\x1b[2JSeaBIOS\r\n", "Booting from Hard Disk...\r\n", "x\r\nhost login: "])
    checked = boot.watch_console(lambda: next(screens), r"login:\s*$", timeout=60, poll=5,
                                 clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert checked.booted and checked.seconds == 10 and checked.console_tail[-1] == "host login: "
    stuck = boot.watch_console(lambda: "\x1b[2JSeaBIOS\r\nBooting from Hard Disk...\r\n", r"login:", timeout=12,
                               poll=5, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert not stuck.booted and stuck.console_tail == ["SeaBIOS", "Booting from Hard Disk..."]
    assert "Booting from Hard Disk" in stuck.describe()
    # A boot that cannot go on ends the check at once, naming the line that said so.
    panicked = iter(["SeaBIOS\r\n", "Loading Linux ...\r\n", "Begin: Running /scripts/local-block ... done.\r\n"
                     "Gave up waiting for root file system device.  Common problems:\r\n"
                     "ALERT!  UUID=0b7f does not exist.  Dropping to a shell!\r\n(initramfs) "])
    now[0] = 0.0
    dead = boot.watch_console(lambda: next(panicked), r"login:", timeout=600, poll=5,
                              clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert not dead.booted and dead.seconds == 10
    assert dead.dead_end == "Gave up waiting for root file system device.  Common problems:"
    assert "the console said 'Gave up waiting" in dead.describe() and "(initramfs)" in dead.describe()


def test_the_console_text_loses_the_escapes_bootloaders_clear_the_screen_with():
    """SeaBIOS and SYSLINUX reset the terminal (ESC c) and clear it; none of it is left in the lines."""
    screen = "\x1bc\x1b[?7l\x1b[2JSeaBIOS (version 1.16.2)\r\n\x1bc\x1b[?7l\x1b[2Jinstance metadata key: k\r\nvm login: "
    checked = boot.watch_console(lambda: screen, r"login:\s*$", timeout=1, poll=1)
    assert checked.console_tail == ["SeaBIOS (version 1.16.2)", "instance metadata key: k", "vm login: "]
