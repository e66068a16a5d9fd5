"""Boot disks: which firmware a disk boots by, and whether a started machine booted.

The firmware is read from the written boot disk, as a firmware would see it:

- a GPT disk with an EFI System Partition holding an EFI bootloader (a ``*.EFI`` file in a
  directory under ``/EFI``, found by reading the FAT directly): ``UEFI_64``;
- a GPT disk with a BIOS boot partition (GRUB's core image), or an MBR disk with boot code
  in its first 440 bytes: ``BIOS``;
- anything else: not detected, with the reason (an ESP without a loader, an MBR whose boot
  code is all zeros, no partition table).

Everything here reads through ``read(offset, length)`` only, so it runs on the worker's
device and on a local file alike, and never trusts a field without bounding it: a hostile
disk's FAT or GPT can make it read at most a few hundred KiB and find nothing.

The boot check reads the instance's serial console through OCI's console history API until
a pattern (a login prompt by default) appears or the time is up.
"""

from __future__ import annotations

import re
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Callable

BIOS, UEFI = "BIOS", "UEFI_64"
SECTOR = 512
ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
BIOS_BOOT_TYPE = uuid.UUID("21686148-6449-6E6F-744E-656564454649")
MBR_ESP, MBR_PROTECTIVE = 0xEF, 0xEE
MAX_GPT_ENTRIES = 256
MAX_DIRECTORY_BYTES = 256 * 1024
CONSOLE_LINES = 20

Read = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Firmware:
    firmware: str | None   # BIOS, UEFI_64, or None: not detected
    source: str            # "disk", "ovf", "manifest", "target" (the TargetMachine block) or "default"
    reason: str

    def describe(self) -> str:
        return f"{self.firmware or 'unknown'} ({self.source}: {self.reason})"


def detect_firmware(read: Read) -> Firmware:
    """What the disk behind ``read`` boots by, read from its partition table and ESP."""
    head = read(0, 34 * SECTOR)
    if len(head) < 2 * SECTOR or head[510:512] != b"\x55\xaa":
        return Firmware(None, "disk", "no partition table or boot sector (no 55AA signature)")
    boot_code = any(head[:440])
    if head[SECTOR:SECTOR + 8] == b"EFI PART":
        return _gpt(read, head, boot_code)
    entries = [struct.unpack_from("<B3xBxxxII", head, 446 + 16 * i) for i in range(4)]
    for index, (_, kind, start, count) in enumerate(entries, start=1):
        if kind == MBR_ESP and count:
            loader = efi_loader(read, start * SECTOR, count * SECTOR)
            if loader:
                return Firmware(UEFI, "disk", f"MBR partition {index} is an EFI System Partition holding {loader}")
    if boot_code:
        return Firmware(BIOS, "disk", "MBR with boot code")
    return Firmware(None, "disk", "MBR without boot code and no EFI System Partition with a bootloader")


def _gpt(read: Read, head: bytes, boot_code: bool) -> Firmware:
    entries_lba, count, size = struct.unpack_from("<QII", head, SECTOR + 72)
    if not (128 <= size <= 1024 and size % 8 == 0) or not 0 < count <= MAX_GPT_ENTRIES or entries_lba < 2:
        return Firmware(None, "disk", "a GPT header with an unusable partition entry array")
    table = read(entries_lba * SECTOR, count * size)
    esp_without_loader, bios_boot = None, None
    for index in range(len(table) // size):
        entry = table[index * size:(index + 1) * size]
        kind = uuid.UUID(bytes_le=entry[:16])
        first, last = struct.unpack_from("<QQ", entry, 32)
        if kind == ESP_TYPE and last >= first:
            loader = efi_loader(read, first * SECTOR, (last - first + 1) * SECTOR)
            if loader:
                return Firmware(UEFI, "disk", f"GPT partition {index + 1} is an EFI System Partition holding {loader}")
            esp_without_loader = index + 1
        elif kind == BIOS_BOOT_TYPE:
            bios_boot = index + 1
    if bios_boot:
        return Firmware(BIOS, "disk", f"GPT partition {bios_boot} is a BIOS boot partition")
    if esp_without_loader:
        return Firmware(None, "disk", f"GPT partition {esp_without_loader} is an EFI System Partition without an "
                        "EFI bootloader")
    if boot_code:
        return Firmware(BIOS, "disk", "GPT whose protective MBR holds boot code")
    return Firmware(None, "disk", "GPT without an EFI System Partition or a BIOS boot partition")


def efi_loader(read: Read, offset: int, size: int) -> str | None:
    """The path of an EFI bootloader (``/EFI/<dir>/<name>.EFI``) on the FAT filesystem at
    ``offset``, or None (not FAT, no loader, or a layout this reader will not follow)."""
    try:
        fat = FatVolume(read, offset, size)
        for directory in fat.entries(fat.root):
            if directory.name == "EFI" and directory.is_dir:
                for vendor in fat.entries(directory.cluster):
                    if vendor.is_dir and vendor.name not in (".", ".."):
                        for entry in fat.entries(vendor.cluster):
                            if not entry.is_dir and entry.name.endswith(".EFI") and entry.size > 0:
                                return f"/EFI/{vendor.name}/{entry.name}"
    except (ValueError, struct.error):
        return None
    return None


@dataclass(frozen=True)
class _Entry:
    name: str
    is_dir: bool
    cluster: int
    size: int


class FatVolume:
    """Just enough of FAT12/16/32 to list directories by their short names."""

    def __init__(self, read: Read, offset: int, size: int) -> None:
        self.read, self.offset = read, offset
        boot = read(offset, SECTOR)
        if len(boot) < SECTOR or boot[510:512] != b"\x55\xaa":
            raise ValueError("no FAT boot sector")
        (self.sector, self.per_cluster, reserved, fats, root_entries, total16, _, fat16,
         ) = struct.unpack_from("<HBHBHHBH", boot, 11)
        total32, fat32 = struct.unpack_from("<II", boot, 32)
        if self.sector not in (512, 1024, 2048, 4096) or self.per_cluster not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError("not a FAT boot sector")
        fat_sectors = fat16 or fat32
        total = total16 or total32
        if not fats or not fat_sectors or total * self.sector > size:
            raise ValueError("a FAT that does not fit its partition")
        self.fat_start = reserved
        root_sectors = (root_entries * 32 + self.sector - 1) // self.sector
        self.data_start = reserved + fats * fat_sectors + root_sectors
        clusters = (total - self.data_start) // self.per_cluster
        self.bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
        self.clusters = clusters
        if self.bits == 32:
            self.root: int | tuple[int, int] = struct.unpack_from("<I", boot, 44)[0]
        else:
            self.root = (reserved + fats * fat_sectors, root_sectors)

    def _next(self, cluster: int) -> int:
        position = cluster * self.bits // 8
        data = self.read(self.offset + self.fat_start * self.sector + position, 4)
        if self.bits == 32:
            return struct.unpack_from("<I", data)[0] & 0x0FFFFFFF
        if self.bits == 16:
            return struct.unpack_from("<H", data)[0]
        value = struct.unpack_from("<H", data)[0]
        return value >> 4 if cluster & 1 else value & 0xFFF

    def _directory(self, where: int | tuple[int, int]) -> bytes:
        if isinstance(where, tuple):  # FAT12/16 root: a fixed region
            start, sectors = where
            return self.read(self.offset + start * self.sector, min(sectors * self.sector, MAX_DIRECTORY_BYTES))
        data, cluster, cluster_bytes = b"", where, self.per_cluster * self.sector
        end = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]
        while 2 <= cluster < min(end, self.clusters + 2) and len(data) < MAX_DIRECTORY_BYTES:
            sector = self.data_start + (cluster - 2) * self.per_cluster
            data += self.read(self.offset + sector * self.sector, cluster_bytes)
            cluster = self._next(cluster)
        return data

    def entries(self, where: int | tuple[int, int]) -> list[_Entry]:
        data, found = self._directory(where), []
        for index in range(0, len(data) - 31, 32):
            raw = data[index:index + 32]
            if raw[0] == 0:
                break
            attributes = raw[11]
            if raw[0] == 0xE5 or attributes == 0x0F or attributes & 0x08:  # deleted, long name, volume label
                continue
            base, extension = raw[:8].decode("latin-1").rstrip(), raw[8:11].decode("latin-1").rstrip()
            high, low, size = struct.unpack_from("<H", raw, 20)[0], struct.unpack_from("<H", raw, 26)[0], \
                struct.unpack_from("<I", raw, 28)[0]
            found.append(_Entry(f"{base}.{extension}" if extension else base, bool(attributes & 0x10),
                                (high << 16) | low, size))
        return found


# -- the boot check -----------------------------------------------------------------------

# What a boot that cannot go on prints on its console: the initramfs gave up on its root device
# (initramfs-tools, dracut), the kernel panicked, systemd dropped to its emergency shell. Once one
# shows, the check ends: waiting out its timeout would only keep a dead machine running.
DEAD_END = re.compile(r"Gave up waiting for root|ALERT! .* does not exist|Dropping to a shell!|"
                      r"Kernel panic - not syncing|You are in emergency mode|dracut-initqueue.*[Cc]ould not boot|"
                      r"Entering emergency mode")


@dataclass(frozen=True)
class BootCheck:
    booted: bool
    seconds: float
    console_tail: list[str]   # the console's last lines (what it showed when the check ended)
    pattern: str
    dead_end: str | None = None  # the console line that said the boot cannot go on, if one did

    def describe(self) -> str:
        if self.booted:
            return f"booted in {self.seconds:.0f} s (console matched {self.pattern!r})"
        shown = "; ".join(self.console_tail[-5:]) or "the console stayed empty"
        if self.dead_end:
            return (f"did not show {self.pattern!r}: after {self.seconds:.0f} s the console said {self.dead_end!r}; "
                    f"last console lines: {shown}")
        return f"did not show {self.pattern!r} within {self.seconds:.0f} s; last console lines: {shown}"


def watch_console(capture: Callable[[], str], pattern: str, timeout: float, poll: float,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> BootCheck:
    """Capture the console every ``poll`` seconds until ``pattern`` matches, the console shows a dead
    end (:data:`DEAD_END`), or ``timeout`` passes."""
    matcher = re.compile(pattern, re.MULTILINE)
    started, text = clock(), ""
    while True:
        text = capture()
        cleaned = _printable(text)
        if matcher.search(cleaned):
            return BootCheck(True, clock() - started, _tail(cleaned), pattern)
        dead = DEAD_END.search(cleaned)
        if dead:
            line = cleaned[cleaned.rfind("\n", 0, dead.start()) + 1:].split("\n", 1)[0].strip()
            return BootCheck(False, clock() - started, _tail(cleaned), pattern, line[:200])
        if clock() - started >= timeout:
            return BootCheck(False, clock() - started, _tail(cleaned), pattern)
        sleep(min(poll, max(0.0, timeout - (clock() - started))))


# CSI sequences, character set choices, and the two-character ones (ESC c resets the terminal,
# as SYSLINUX and GRUB do before they draw).
_ESCAPES = re.compile(r"\x1b\[[0-9;=?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[A-Za-z0-9=>]|[\x00-\x08\x0b-\x1f\x7f]")


def _printable(text: str) -> str:
    """The console text without terminal escapes and control characters (line ends kept)."""
    return _ESCAPES.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _tail(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-CONSOLE_LINES:]
