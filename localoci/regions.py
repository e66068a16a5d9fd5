"""Regions: one local OCI process serves several, each on its own listener.

The first region named is the home region: it is served on the main port, its availability
domains keep their names (``local:LOCAL-AD-1``...) and every record that names no region
belongs to it. Every other region gets a listener of its own on a free loopback port, and its
availability domains are named after it (``local:LOCAL-2-AD-1`` for ``local-2``). A request
knows its region from the listener it arrived on (``Request.region``).

Which services are regional:

- Block Storage is: volumes, boot volumes, volume groups and their backups live in one
  region each, and a call in another region finds none of them (404, as OCI answers);
- Identity's availability and fault domains are the region's;
- Compute, networking, Object Storage, backup policy assignments and the admin API are not:
  every listener serves the same instances, VCNs, buckets and faults, in the home region's
  availability domains (so only a home region volume attaches to an instance).

The regions served are kept in the data directory: a restart that names none serves those of
the last run (each other region on a new free port); one that names others makes the records
of a region left out unreachable, not gone.
"""

from __future__ import annotations

import re

HOME = "local-1"
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)+$")


def parse(text: str) -> list[str]:
    """``local-1,local-2`` as a list of region names, the home region first; ValueError if malformed."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError("name at least one region, e.g. 'local-1'")
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a region name such as 'local-2'")
    if len(set(names)) != len(names):
        raise ValueError(f"a region is named twice in {text!r}")
    return names


def availability_domain_names(region: str, home: str, count: int) -> list[str]:
    """The names of a region's availability domains: the home region's as they always were."""
    if region == home:
        return [f"local:LOCAL-AD-{n}" for n in range(1, count + 1)]
    return [f"local:{region.upper()}-AD-{n}" for n in range(1, count + 1)]
