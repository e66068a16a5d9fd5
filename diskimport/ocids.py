"""OCIDs checked by kind before OCI is asked: OCI answers an OCID of the wrong kind, or a
malformed one, with a bare 404 that names nothing, so a parameter or a block setting that
names a resource is refused here instead, naming what it got and what it takes."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from .errors import InvalidRequest

# An OCID: ocid1.<resource type>.<realm>.[region][.future use].<unique id>
_OCID = re.compile(r"ocid1\.([a-z0-9]+)\.[a-z0-9-]+\.[a-z0-9-]*(?:\.[a-z0-9-]+)?\.[A-Za-z0-9_-]+")
OCID_KINDS = {"volume": "a block volume", "bootvolume": "a boot volume", "volumegroup": "a volume group",
              "compartment": "a compartment", "tenancy": "the tenancy", "subnet": "a subnet", "image": "an image"}
VOLUME_KINDS = ("volume", "bootvolume")
GROUP_KINDS = ("volumegroup",)
COMPARTMENT_KINDS = ("compartment", "tenancy")


def check_ocid(parameter: str, value: str, kinds: Sequence[str], code: str = "invalid-source",
               taken_by: Mapping[str, str] | None = None) -> None:
    """Refuse (``code``) a ``value`` that is not the OCID of one of ``kinds``, naming the parameter,
    what it got and what it takes. ``taken_by``: kind -> the parameter that takes it, for the hint."""
    wanted = " or ".join(f"{OCID_KINDS[kind]} (ocid1.{kind}.…)" for kind in kinds)
    match = _OCID.fullmatch(value)
    if match is None:
        raise InvalidRequest(code, f"{parameter} {value!r} is not an OCID; it takes the OCID of {wanted}")
    kind = match.group(1)
    if kind not in kinds:
        other = (taken_by or {}).get(kind)
        raise InvalidRequest(code, f"{parameter} {value!r} is the OCID of {OCID_KINDS.get(kind, f'a {kind}')}, "
                             f"not of {wanted}" + (f": pass it as {other}" if other else ""))


def check_placement(block: str, compartment_id: str, subnet_id: str, image_id: str) -> None:
    """A block that says where instances launch (a worker VM's shape, a target machine): its
    compartment, subnet and image each the OCID of its kind (``invalid-setting``)."""
    check_ocid(f"{block}.compartment_id", compartment_id, COMPARTMENT_KINDS, code="invalid-setting")
    check_ocid(f"{block}.subnet_id", subnet_id, ("subnet",), code="invalid-setting")
    check_ocid(f"{block}.image_id", image_id, ("image",), code="invalid-setting")
