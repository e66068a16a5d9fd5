"""Windows registry hives for the guest inspection's tests, written by hivex (``hivexsh``).

hivex edits hives but does not make one from nothing, so :func:`empty_hive` writes the smallest
hive Windows' format allows (a base block, one bin, a root key and its security descriptor,
checksummed); everything in it after that is added by ``hivexsh -w`` (libhivex-bin), the
libguestfs tool virt-v2v uses: :func:`system_hive` gives a SYSTEM hive with a control set and
the services asked for, :func:`software_hive` a SOFTWARE hive with the Windows version.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

BLOCK = 4096
# A self-relative security descriptor with no owner, group or ACLs (revision 1, SE_SELF_RELATIVE).
DESCRIPTOR = struct.pack("<BBHIIII", 1, 0, 0x8000, 0, 0, 0, 0)
BOOT_START, SYSTEM_START, AUTO_START, DEMAND_START, DISABLED = 0, 1, 2, 3, 4


def tools_missing() -> list[str]:
    return [t for t in ("hivexsh",) if shutil.which(t) is None]


def _cell(data: bytes) -> bytes:
    size = (4 + len(data) + 7) // 8 * 8
    return struct.pack("<i", -size) + data + b"\0" * (size - 4 - len(data))


def empty_hive(path: Path, root_name: str = "ROOT") -> Path:
    """A hive holding only its root key."""
    name = root_name.encode("ascii")
    root_at = 0x20
    nk_size = (4 + 0x4C + len(name) + 7) // 8 * 8
    sk_at = root_at + nk_size
    nk = (b"nk" + struct.pack("<HQIIIIIIIIIIIIIIIHH", 0x2C, 0, 0, 0xFFFFFFFF, 0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 0,
                              0xFFFFFFFF, sk_at, 0xFFFFFFFF, 0, 0, 0, 0, 0, len(name), 0) + name)
    sk = b"sk" + struct.pack("<HIIII", 0, sk_at, sk_at, 1, len(DESCRIPTOR)) + DESCRIPTOR
    cells = _cell(nk) + _cell(sk)
    free = BLOCK - 0x20 - len(cells)
    hbin = b"hbin" + struct.pack("<IIQQI", 0, BLOCK, 0, 0, 0) + cells + struct.pack("<i", free) + b"\0" * (free - 4)
    base = bytearray(BLOCK)
    struct.pack_into("<4sIIQIIIIIII", base, 0, b"regf", 1, 1, 0, 1, 3, 0, 1, root_at, BLOCK, 1)
    checksum = 0
    for (word,) in struct.iter_unpack("<I", bytes(base[:508])):
        checksum ^= word
    struct.pack_into("<I", base, 508, checksum)
    path.write_bytes(bytes(base) + hbin)
    return path


def _value(kind: str, value: object) -> str:
    if kind == "dword":
        return f"dword:0x{int(str(value)):08x}"
    return f"{kind}:{value}"


def edit(path: Path, keys: dict[str, dict[str, tuple[str, object]]]) -> Path:
    """Add ``keys`` (``\\``-separated paths from the root, parents first) with their values
    (name -> (``string`` | ``expandstring`` | ``dword``, value)) through ``hivexsh -w``."""
    script: list[str] = []
    made: set[str] = set()
    for key, values in keys.items():
        parts = [p for p in key.split("\\") if p]
        for depth in range(len(parts)):
            here = "\\".join(parts[:depth + 1])
            if here not in made:
                script += ["cd \\" + "\\".join(parts[:depth]), f"add {parts[depth]}"]
                made.add(here)
        script += ["cd \\" + "\\".join(parts), f"setval {len(values)}"]
        for name, (kind, value) in values.items():
            script += [name, _value(kind, value)]
    script.append("commit")
    done = subprocess.run(["hivexsh", "-w", str(path)], input="\n".join(script) + "\n", text=True,
                          capture_output=True)
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(f"hivexsh failed ({done.returncode}): {done.stderr.strip()}")
    return path


def system_hive(path: Path, services: dict[str, int], static_address: str | None = None) -> Path:
    """A SYSTEM hive: ``Select\\Current`` 1, ``ControlSet001\\Services\\<name>`` with its ``Start``
    for each of ``services``, and a network interface that takes DHCP, or ``static_address``."""
    keys: dict[str, dict[str, tuple[str, object]]] = {"Select": {"Current": ("dword", 1), "Default": ("dword", 1)}}
    for name, start in services.items():
        keys[f"ControlSet001\\Services\\{name}"] = {"Start": ("dword", start), "Type": ("dword", 1),
                                                     "ImagePath": ("expandstring", f"System32\\drivers\\{name}.sys")}
    interface = {"EnableDHCP": ("dword", 0 if static_address else 1)}
    if static_address:
        interface["IPAddress"] = ("string", static_address)
    keys["ControlSet001\\Services\\Tcpip\\Parameters\\Interfaces\\{4d36e972-e325-11ce-bfc1-08002be10318}"] = interface
    return edit(empty_hive(path, "SYSTEM"), keys)


def software_hive(path: Path, product: str = "Windows Server 2019 Datacenter", build: str = "17763") -> Path:
    return edit(empty_hive(path, "SOFTWARE"), {"Microsoft\\Windows NT\\CurrentVersion": {
        "ProductName": ("string", product), "CurrentBuildNumber": ("string", build),
        "EditionID": ("string", "ServerDatacenter")}})


def windows_disk(path: Path, work: Path, services: dict[str, int], static_address: str | None = None) -> Path:
    """A Windows boot disk (:func:`tests.guest_disks.windows`: "System Reserved" and the system
    drive, both NTFS) whose system drive holds ``Windows\\System32\\config\\SYSTEM`` and
    ``SOFTWARE``, copied in through ntfs-3g in a mount namespace of its own."""
    from tests import guest_disks

    disk = guest_disks.windows(path)
    offset, size = disk.regions["p2"]
    config = work / "config"
    config.mkdir(parents=True, exist_ok=True)
    system_hive(config / "SYSTEM", services, static_address)
    software_hive(config / "SOFTWARE")
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size),
                           str(path)], capture_output=True, text=True, check=True).stdout.strip()
    try:
        mount = work / "mnt"
        mount.mkdir(exist_ok=True)
        script = ('ntfs-3g "$1" "$2" && mkdir -p "$2/Windows/System32/config" && '
                  'cp "$3/SYSTEM" "$3/SOFTWARE" "$2/Windows/System32/config/" && umount "$2"')
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", loop, str(mount),
                        str(config)], check=True, capture_output=True)
    finally:
        subprocess.run(["losetup", "--detach", loop], capture_output=True)
    return path
