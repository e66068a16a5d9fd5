"""A Windows guest's facts from its registry hives, read with regipy (never a hand-written parser).

- the version: ``Microsoft\\Windows NT\\CurrentVersion`` of the SOFTWARE hive (ProductName,
  CurrentBuildNumber, EditionID);
- the control set Windows boots (``Select\\Current`` of the SYSTEM hive), and in it the storage
  and network drivers installed as services and how each starts (``Start``: 0 boot, 1 system,
  2 automatic, 3 on demand, 4 disabled): the virtio ones (``viostor``, ``vioscsi``, ``netkvm``)
  and the in-box ones emulated devices need (``atapi``, ``intelide``, ``pciide``, ``storahci``);
- the network interfaces with a static address (``Tcpip\\Parameters\\Interfaces``, ``EnableDHCP`` 0).

A storage driver boots the machine only if Windows loads it at boot (``Start`` 0): otherwise it
stops with INACCESSIBLE_BOOT_DEVICE. A virtio driver installed but not set to start at boot
is reported as such.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

VIRTIO_STORAGE = ("viostor", "vioscsi")
VIRTIO_NETWORK = ("netkvm",)
EMULATED_STORAGE = ("atapi", "intelide", "pciide", "storahci")
SERVICES = VIRTIO_STORAGE + VIRTIO_NETWORK + EMULATED_STORAGE
BOOT_START, DISABLED = 0, 4  # a service's Start values


class HiveError(Exception):
    pass


def _open(data: bytes) -> Any:
    from regipy.registry import RegistryHive

    handle, path = tempfile.mkstemp(suffix=".hive")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        return RegistryHive(path)
    except Exception as exc:  # regipy raises its own and construct's errors for a damaged hive
        raise HiveError(f"not a registry hive regipy can read: {type(exc).__name__}: {exc}") from None
    finally:
        os.unlink(path)


def _values(hive: Any, path: str) -> dict[str, Any] | None:
    try:
        key = hive.get_key(path)
    except Exception:  # regipy's RegistryKeyNotFoundException, or a damaged key
        return None
    return {value.name: value.value for value in key.iter_values()}


def windows_facts(system: bytes, software: bytes | None) -> dict[str, Any]:
    """What the SYSTEM (and SOFTWARE) hive say about booting and reaching the machine."""
    hive = _open(system)
    select = _values(hive, "\\Select") or {}
    current = select.get("Current")
    if not isinstance(current, int) or not 0 < current < 1000:
        raise HiveError("the SYSTEM hive has no Select\\Current control set")
    control_set = f"ControlSet{current:03d}"
    services = {}
    for name in SERVICES:
        values = _values(hive, f"\\{control_set}\\Services\\{name}")
        if values is not None:
            start = values.get("Start")
            services[name] = start if isinstance(start, int) else None
    static = []
    try:
        interfaces = hive.get_key(f"\\{control_set}\\Services\\Tcpip\\Parameters\\Interfaces")
        for interface in interfaces.iter_subkeys():
            values = {value.name: value.value for value in interface.iter_values()}
            if values.get("EnableDHCP") == 0 and values.get("IPAddress") not in (None, "", ["0.0.0.0"], "0.0.0.0"):
                static.append({"interface": interface.name, "address": values.get("IPAddress")})
    except Exception:  # no Tcpip key: nothing configured
        pass
    version: dict[str, Any] = {}
    if software is not None:
        current_version = _values(_open(software), "\\Microsoft\\Windows NT\\CurrentVersion") or {}
        version = {k: current_version.get(k) for k in ("ProductName", "CurrentBuildNumber", "EditionID")
                   if current_version.get(k) is not None}
    return {"control_set": control_set, "services": services, "static_interfaces": static, "version": version}


def boots_with(services: dict[str, int | None], drivers: tuple[str, ...]) -> tuple[bool, str]:
    """Whether one of ``drivers`` starts at boot, and the reason in words."""
    started = [d for d in drivers if services.get(d) == BOOT_START]
    if started:
        return True, f"{', '.join(started)} starts at boot"
    installed = [f"{d} (Start {services[d]})" for d in drivers if d in services]
    if installed:
        return False, f"{', '.join(installed)} installed but not started at boot: INACCESSIBLE_BOOT_DEVICE"
    return False, f"none of {', '.join(drivers)} is installed: INACCESSIBLE_BOOT_DEVICE"
