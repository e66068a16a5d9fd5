"""OCIDs and timestamps in OCI's formats."""

from __future__ import annotations

import datetime as dt
import secrets

REGION = "local-1"


def new_ocid(resource_type: str, realm: str = "oc1", region: str | None = None) -> str:
    """Return a fresh OCID such as ``ocid1.volume.oc1.local-1.<random>`` (of the home region unless told)."""
    return f"ocid1.{resource_type}.{realm}.{region or REGION}.{secrets.token_hex(16)}"


def now_iso() -> str:
    """The current time as OCI renders it: RFC 3339, milliseconds, UTC."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
