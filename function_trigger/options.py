"""Import options carried by an upload's ``opc-meta-*`` metadata or by flow parameters.

Standard library only: the OCI Function (which is built from this directory alone)
validates metadata with the same rules the flow applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

VPU_LEVELS = (0, 10, 20, *range(30, 121, 10))
# Object name suffixes and metadata values -> qemu-img format names.
FORMAT_NAMES = {
    "qcow2": "qcow2", "qcow": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vpc": "vpc",
    "vhdx": "vhdx", "vdi": "vdi", "raw": "raw", "img": "raw",
}
OPTION_KEYS = ("ad_number", "display_name", "backup_policy", "vpus", "format")


class InvalidRequest(ValueError):
    """A parameter or metadata value is unusable; the message names it."""


@dataclass(frozen=True)
class ImportOptions:
    ad_number: int | None = None
    display_name: str | None = None
    backup_policy: str | None = None
    vpus: int | None = None
    format: str | None = None

    def as_parameters(self) -> dict[str, Any]:
        """The flow parameters these options set (``format`` travels as metadata only)."""
        values = {"ad_number": self.ad_number, "display_name": self.display_name,
                  "backup_policy": self.backup_policy, "vpus": self.vpus}
        return {k: v for k, v in values.items() if v is not None}


def _whole_number(name: str, value: Any) -> int:
    if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)):
        raise InvalidRequest(f"{name} must be a whole number, not {value!r}")
    return int(value)


def parse_options(values: Mapping[str, Any], ad_count: int | None = None) -> ImportOptions:
    """Validate import options given as flow parameters or as object metadata."""
    ad_number = values.get("ad_number")
    if ad_number in (None, ""):
        ad_number = None
    else:
        ad_number = _whole_number("ad_number", ad_number)
        if ad_number < 1 or (ad_count is not None and ad_number > ad_count):
            limit = f"1 to {ad_count}" if ad_count else "at least 1"
            raise InvalidRequest(f"ad_number must be {limit}, not {ad_number}")
    vpus = values.get("vpus")
    if vpus in (None, ""):
        vpus = None
    else:
        vpus = _whole_number("vpus", vpus)
        if vpus not in VPU_LEVELS:
            raise InvalidRequest(f"vpus must be 0, 10, 20 or 30 to 120 in steps of 10, not {vpus}")
    display_name = values.get("display_name") or None
    if display_name is not None:
        display_name = str(display_name)
        if len(display_name) > 255 or re.search(r"[\x00-\x1f]", display_name):
            raise InvalidRequest("display_name must be at most 255 printable characters")
    backup_policy = values.get("backup_policy") or None
    if backup_policy is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", str(backup_policy)):
        raise InvalidRequest(f"backup_policy must be a policy name or OCID, not {backup_policy!r}")
    fmt = values.get("format") or None
    if fmt is not None and str(fmt).lower() not in FORMAT_NAMES:
        raise InvalidRequest(f"format must be one of {', '.join(sorted(FORMAT_NAMES))}, not {fmt!r}")
    return ImportOptions(ad_number, display_name, backup_policy, vpus, fmt)


def merge(parameters: ImportOptions, metadata: ImportOptions) -> ImportOptions:
    """Flow parameters win over object metadata."""
    return ImportOptions(*(p if p is not None else m for p, m in zip(
        (parameters.ad_number, parameters.display_name, parameters.backup_policy, parameters.vpus, parameters.format),
        (metadata.ad_number, metadata.display_name, metadata.backup_policy, metadata.vpus, metadata.format))))
