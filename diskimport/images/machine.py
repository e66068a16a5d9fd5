"""Whole machines: what an OVA, an OVF with its disks beside it, or a machine manifest says a
machine is, read and checked before anything is created.

- **OVA**: a tar (OVF 1.x and 2.0, section "OVF Packages") holding one OVF descriptor
  (``*.ovf``), an optional manifest (``*.mf``) and certificate, and the files the descriptor
  references, one per disk (VMware and VirtualBox write streamOptimized VMDKs). Its layout is
  learned from the tar headers alone (:func:`ova_members`, a few small ranged reads); a disk
  is then a byte range of the object.
- **OVF**: the descriptor as an object of its own, the files it references beside it in the
  bucket (``vms/web.ovf`` with ``web-disk1.vmdk`` means ``vms/web-disk1.vmdk``), and the
  manifest beside it under the descriptor's name with ``.mf``, if there is one.
- **Machine manifest** (``*.machine.json``): a machine named by its operator, disks as object
  names in order, the boot disk first (:func:`parse_machine_manifest` holds the schema).

The descriptor is untrusted XML: one with a document type declaration (entities, which can
expand without bound) is refused, as is one over :data:`MAX_DESCRIPTOR` bytes. File
references must be plain relative names. A file split into chunks (``ovf:chunkSize``) or
compressed by the OVF itself (``ovf:compression``) is refused naming it. The manifest's digests
(SHA1, SHA256 or SHA512, as ovftool and VirtualBox write them) are parsed here; the
descriptor's own is checked at once, each disk's against its bytes as they stream through the
worker.

Every refusal is an :class:`~diskimport.errors.ImageRejected` whose message names the
member or field: ``ova-malformed`` (the tar; not one descriptor), ``ovf-invalid`` (the
descriptor), ``ovf-unsupported`` (chunked or compressed files), ``ova-missing-file``,
``ova-size-mismatch``, ``ova-manifest-invalid``, ``ova-digest-mismatch``,
``ova-capacity-mismatch`` (a disk's header against the descriptor),
``machine-manifest-invalid``; a disk's own refusal (every hostile-image check)
keeps its code, its message then naming the disk.
"""

from __future__ import annotations

import hashlib
import json
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from .. import contract
from . import inspection
from ..errors import ImageRejected
from .inspection import Inspection
from .packed import Packed, tar_members

T = TypeVar("T", bound=Any)

MAX_DESCRIPTOR = 4 * 1024 * 1024
MAX_MANIFEST = 1024 * 1024
MAX_DISKS = 32  # paravirtualized attachments of one instance

OVF_NAMESPACES = {"http://schemas.dmtf.org/ovf/envelope/1": "1", "http://schemas.dmtf.org/ovf/envelope/2": "2"}
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
SASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData"
VMW = "http://www.vmware.com/schema/ovf"
VBOX = "http://www.virtualbox.org/ovf/machine"

# The format URIs descriptors use, to the format the disk's header must then show.
FORMAT_URIS = {
    "http://www.vmware.com/interfaces/specifications/vmdk.html": "vmdk",
    "http://www.vmware.com/specifications/vmdk.html": "vmdk",
    "http://www.gnome.org/~markmc/qcow-image-format.html": "qcow2",
    "http://technet.microsoft.com/en-us/virtualserver/bb676673.aspx": "vpc",
    "http://go.microsoft.com/fwlink/?LinkId=137171": "vpc",
    "http://www.microsoft.com/technet/virtualserver/downloads/vhdspec.mspx": "vpc",
    "http://www.virtualbox.org/manual/ch12.html#vdi": "vdi",
}
DISK_RESOURCE_TYPE, CPU_RESOURCE_TYPE, MEMORY_RESOURCE_TYPE = "17", "3", "4"
DIGEST_ALGORITHMS = {"SHA1": "sha1", "SHA256": "sha256", "SHA512": "sha512"}
MANIFEST_LINE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)\s*$")
UNITS = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+)\s*)?$", re.IGNORECASE)
MACHINE_KINDS = dict(zip(contract.MACHINE_SUFFIXES, ("ova", "ovf", "manifest")))
MACHINE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class MachineDisk:
    position: int                 # 0 is the boot disk
    name: str                     # the descriptor's disk id, or the object's name for a manifest
    file: str                     # the OVA member, or the object in the bucket
    capacity: int | None = None   # bytes, as the descriptor states (the header must agree)
    capacity_unit: int = 1        # the unit the descriptor states it in: the header may round within it
    format: str | None = None     # as the descriptor's format URI says (the header must agree)
    digest: tuple[str, str] | None = None  # (hashlib name, hex) from the manifest
    offset: int | None = None     # an OVA member's data offset in the OVA
    size: int | None = None       # an OVA member's length, or the size the descriptor states


@dataclass(frozen=True)
class Machine:
    name: str
    source: str                   # "ova", "ovf" or "manifest"
    disks: tuple[MachineDisk, ...]
    firmware: str | None = None   # "BIOS" or "UEFI_64"
    cpus: int | None = None
    memory_mb: int | None = None
    os: str | None = None
    shape: str | None = None
    hints: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "firmware": self.firmware, "cpus": self.cpus,
                "memory_mb": self.memory_mb, "os": self.os, "shape": self.shape,
                "disks": [{"position": d.position, "name": d.name, "file": d.file, "capacity": d.capacity,
                           "format": d.format} for d in self.disks]}


# -- OVA ---------------------------------------------------------------------------------------

def kind_of(object_name: str) -> str | None:
    """"ova", "ovf" or "manifest" for an object that describes a machine, else None."""
    lower = object_name.lower()
    for suffix, kind in MACHINE_KINDS.items():
        if lower.endswith(suffix):
            return kind
    return None


def ova_members(get: Callable[[int, int], bytes | None], size: int) -> dict[str, tuple[int, int]]:
    """``{name: (data offset, length)}`` of the OVA's files, from its tar headers."""
    members: dict[str, tuple[int, int]] = {}
    for offset, length, name in tar_members(get, "ova-malformed", "the OVA"):
        name = _relative_name(name, "ova-malformed", "an OVA member")
        if name in members:
            raise ImageRejected("ova-malformed", f"the OVA holds {name!r} twice")
        if offset + length > size:
            raise ImageRejected("ova-malformed", f"the OVA member {name!r} runs past the object's end")
        members[name] = (offset, length)
    return members


def describe_ova(get: Callable[[int, int], bytes | None], size: int, object_name: str) -> Machine:
    """The machine an OVA holds, its disks located in it; ``get(start, end)`` reads the OVA."""
    members = ova_members(get, size)
    descriptor_name = _the_one(members, ".ovf", "ova-malformed", "OVF descriptor", required=True)
    manifest_name = _the_one(members, ".mf", "ova-manifest-invalid", "manifest", required=False)
    descriptor = _read_member(get, members, descriptor_name, MAX_DESCRIPTOR, "ovf-invalid")
    digests = (parse_manifest(_read_member(get, members, manifest_name, MAX_MANIFEST, "ova-manifest-invalid"))
               if manifest_name else {})
    _check_digest(descriptor_name, descriptor, digests)
    machine = parse_ovf(descriptor, default_name=_stem(object_name), source="ova")
    disks = []
    for disk in machine.disks:
        if disk.file not in members:
            raise ImageRejected("ova-missing-file", f"the descriptor names {disk.file!r} for disk {disk.name!r}, "
                                "which the OVA does not hold")
        offset, length = members[disk.file]
        if disk.size is not None and disk.size != length:
            raise ImageRejected("ova-size-mismatch", f"the OVA member {disk.file!r} is {length} bytes; the "
                                f"descriptor says {disk.size}")
        disks.append(_with(disk, offset=offset, size=length, digest=digests.get(disk.file)))
    unknown = sorted(set(digests) - set(members))
    if unknown:
        raise ImageRejected("ova-manifest-invalid", f"the manifest lists {unknown[0]!r}, which the OVA does not hold")
    return _with_disks(machine, disks)


def ovf_companions(object_name: str) -> tuple[str, str]:
    """(directory prefix, manifest object name) of an OVF descriptor object."""
    prefix = object_name.rsplit("/", 1)[0] + "/" if "/" in object_name else ""
    return prefix, object_name[:-len(".ovf")] + ".mf"


def describe_ovf(descriptor: bytes, object_name: str, manifest: bytes | None,
                 sizes: dict[str, int | None]) -> Machine:
    """The machine an OVF object describes; its files are objects beside it (``sizes``: the
    size of each object found there, ``None`` for one that is missing)."""
    prefix, manifest_name = ovf_companions(object_name)
    digests = parse_manifest(manifest) if manifest is not None else {}
    _check_digest(object_name.rsplit("/", 1)[-1], descriptor, digests)
    machine = parse_ovf(descriptor, default_name=_stem(object_name), source="ovf")
    disks = []
    for disk in machine.disks:
        found = sizes.get(prefix + disk.file)
        if found is None:
            raise ImageRejected("ova-missing-file", f"the descriptor names {disk.file!r} for disk {disk.name!r}; "
                                f"no object {prefix + disk.file!r} is beside it")
        if disk.size is not None and disk.size != found:
            raise ImageRejected("ova-size-mismatch", f"the object {prefix + disk.file!r} is {found} bytes; the "
                                f"descriptor says {disk.size}")
        disks.append(_with(disk, file=prefix + disk.file, size=found, digest=digests.get(disk.file)))
    return _with_disks(machine, disks)


def _the_one(members: dict[str, tuple[int, int]], suffix: str, code: str, what: str, required: bool) -> str | None:
    found = [name for name in members if name.lower().endswith(suffix)]
    if len(found) > 1:
        raise ImageRejected(code, f"the OVA holds {len(found)} files ending {suffix} ({', '.join(found[:3])}): "
                            f"one {what} is expected")
    if required and not found:
        raise ImageRejected(code, f"the OVA holds no {what} ({suffix})")
    return found[0] if found else None


def _read_member(get: Callable[[int, int], bytes | None], members: dict[str, tuple[int, int]], name: str,
                 limit: int, code: str) -> bytes:
    offset, length = members[name]
    if length > limit:
        raise ImageRejected(code, f"{name!r} is {length} bytes; at most {limit} are read")
    data = get(offset, offset + length) if length else b""
    if data is None or len(data) != length:
        raise ImageRejected(code, f"{name!r} could not be read whole")
    return data


def _check_digest(name: str, data: bytes, digests: dict[str, tuple[str, str]]) -> None:
    if name in digests:
        algorithm, expected = digests[name]
        if hashlib.new(algorithm, data).hexdigest() != expected:
            raise ImageRejected("ova-digest-mismatch", f"{name!r} does not match its {algorithm.upper()} in the "
                                "manifest")


# -- the disks' headers ---------------------------------------------------------------------------

def inspect_ova_disks(machine: Machine, get: Callable[[int, int], bytes | None],
                      max_virtual_size: int) -> list[tuple[MachineDisk, Inspection, Packed]]:
    """Every disk of an OVA inspected as a plain upload is (every hostile-image check, on its
    head and tail only), then held against what the descriptor says of it. Each disk is a
    byte range of the OVA, as a tar's member is (:class:`~diskimport.images.packed.Packed` ``tar``)."""
    found = []
    for disk in machine.disks:
        assert disk.offset is not None and disk.size is not None
        offset = disk.offset
        image = about_disk(disk, lambda: inspection.inspect(
            lambda lo, hi: get(offset + lo, offset + hi), disk.size or 0,
            disk.format or inspection.claimed_format(disk.file), max_virtual_size))
        found.append((disk, image, Packed("tar", disk.offset, disk.size)))
    return found


def about_disk(disk: MachineDisk, inspect: Callable[[], T]) -> T:
    """``inspect()``'s finding for one disk (which claims the descriptor's format, so a header of
    another is ``claimed-format-mismatch``), its size checked against the descriptor's capacity;
    a refusal names the disk."""
    image = naming_disk(disk, inspect)
    if disk.capacity is not None and abs(disk.capacity - image.virtual_size) >= disk.capacity_unit:
        raise ImageRejected("ova-capacity-mismatch", f"{_where(disk)}: the descriptor says {disk.capacity} bytes, "
                            f"the header {image.virtual_size}")
    return image


def naming_disk(disk: MachineDisk, call: Callable[[], T]) -> T:
    """``call()``, a refusal it raises naming the disk."""
    try:
        return call()
    except ImageRejected as exc:
        raise ImageRejected(exc.code, f"{_where(disk)}: {exc.message}") from None


def _where(disk: MachineDisk) -> str:
    return f"disk {disk.position + 1} ({disk.file})"


# -- the manifest --------------------------------------------------------------------------------

def parse_manifest(data: bytes) -> dict[str, tuple[str, str]]:
    """``{file: (hashlib name, lowercase hex)}`` from ``SHA256(file)= hex`` lines."""
    if len(data) > MAX_MANIFEST:
        raise ImageRejected("ova-manifest-invalid", f"the manifest is over {MAX_MANIFEST} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageRejected("ova-manifest-invalid", "the manifest is not UTF-8 text") from None
    digests: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        match = MANIFEST_LINE.match(line)
        if not match:
            raise ImageRejected("ova-manifest-invalid", f"manifest line {number} is not 'SHA256(file)= digest': "
                                f"{line[:80]!r}")
        algorithm = DIGEST_ALGORITHMS[match.group(1)]
        name, digest = match.group(2).strip(), match.group(3).lower()
        if len(digest) != hashlib.new(algorithm).digest_size * 2:
            raise ImageRejected("ova-manifest-invalid", f"manifest line {number}: a {match.group(1)} digest of "
                                f"{len(digest)} hex digits")
        if name in digests:
            raise ImageRejected("ova-manifest-invalid", f"the manifest lists {name!r} twice")
        digests[_relative_name(name, "ova-manifest-invalid", "a manifest entry")] = (algorithm, digest)
    return digests


# -- the OVF descriptor --------------------------------------------------------------------------

def parse_ovf(data: bytes, default_name: str = "machine", source: str = "ovf") -> Machine:
    """The machine an OVF descriptor describes: disks in boot order, hardware hints."""
    if len(data) > MAX_DESCRIPTOR:
        raise ImageRejected("ovf-invalid", f"the descriptor is over {MAX_DESCRIPTOR} bytes")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ImageRejected("ovf-invalid", "the descriptor declares a document type (entities are not accepted)")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise ImageRejected("ovf-invalid", f"the descriptor is not well-formed XML: {exc}") from None
    ns = root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""
    if ns not in OVF_NAMESPACES or root.tag != f"{{{ns}}}Envelope":
        raise ImageRejected("ovf-invalid", "the descriptor is not an OVF 1.x or 2.0 Envelope")

    def q(tag: str) -> str:
        return f"{{{ns}}}{tag}"

    def attr(element: ElementTree.Element, name: str) -> str | None:
        return element.get(q(name), element.get(name))

    files: dict[str, ElementTree.Element] = {}
    references = root.find(q("References"))
    for file in references.findall(q("File")) if references is not None else []:
        file_id, href = attr(file, "id"), attr(file, "href")
        if not file_id or not href:
            raise ImageRejected("ovf-invalid", "a File reference lacks its id or href")
        files[file_id] = file

    disks: dict[str, MachineDisk] = {}
    section = root.find(q("DiskSection"))
    for index, disk in enumerate(section.findall(q("Disk")) if section is not None else []):
        disk_id, file_ref = attr(disk, "diskId"), attr(disk, "fileRef")
        if not disk_id:
            raise ImageRejected("ovf-invalid", f"disk {index + 1} of the DiskSection has no diskId")
        if not file_ref:
            raise ImageRejected("ovf-unsupported", f"disk {disk_id!r} has no file (a blank disk): there is nothing "
                                "to import for it")
        if file_ref not in files:
            raise ImageRejected("ovf-invalid", f"disk {disk_id!r} refers to file {file_ref!r}, which References "
                                "does not list")
        file = files[file_ref]
        href = _relative_name(attr(file, "href") or "", "ovf-invalid", f"the file of disk {disk_id!r}")
        if attr(file, "chunkSize"):
            raise ImageRejected("ovf-unsupported", f"{href!r} is split into chunks (ovf:chunkSize): join them into "
                                "one file before uploading")
        if (attr(file, "compression") or "identity") != "identity":
            raise ImageRejected("ovf-unsupported", f"{href!r} is compressed by the OVF ({attr(file, 'compression')}):"
                                " export it uncompressed")
        disks[disk_id] = MachineDisk(
            position=0, name=disk_id, file=href,
            capacity=_capacity(attr(disk, "capacity"), attr(disk, "capacityAllocationUnits"), disk_id),
            capacity_unit=_units(attr(disk, "capacityAllocationUnits") or "byte", f"the capacity units of {disk_id!r}"),
            format=_format_of(attr(disk, "format")),
            size=_integer(attr(file, "size"), f"the size of {href!r}"))
    if not disks:
        raise ImageRejected("ovf-invalid", "the descriptor lists no disks (DiskSection)")
    if len(disks) > MAX_DISKS:
        raise ImageRejected("ovf-unsupported", f"the descriptor lists {len(disks)} disks; at most {MAX_DISKS} "
                            "attach to one instance")

    system = root.find(q("VirtualSystem"))
    if system is None:
        collection = root.find(q("VirtualSystemCollection"))
        raise ImageRejected("ovf-unsupported" if collection is not None else "ovf-invalid",
                            "the descriptor holds a collection of virtual systems: import one machine at a time"
                            if collection is not None else "the descriptor has no VirtualSystem")
    name = (system.findtext(q("Name")) or attr(system, "id") or default_name).strip() or default_name
    hardware = system.find(q("VirtualHardwareSection"))
    items = list(hardware) if hardware is not None else []
    order, cpus, memory_mb, controllers = [], None, None, {}
    for item in items:
        kind = _field(item, "ResourceType")
        instance = _field(item, "InstanceID")
        if kind in ("5", "6", "20") and instance:  # IDE, SCSI, other storage (SATA)
            controllers[instance] = len(controllers)
        elif kind == CPU_RESOURCE_TYPE:
            cpus = _integer(_field(item, "VirtualQuantity"), "the CPU count")
        elif kind == MEMORY_RESOURCE_TYPE:
            quantity = _integer(_field(item, "VirtualQuantity"), "the memory size")
            units = _units(_field(item, "AllocationUnits") or "byte * 2^20", "the memory's AllocationUnits")
            memory_mb = quantity * units // 2**20 if quantity is not None else None
        elif kind == DISK_RESOURCE_TYPE:
            for resource in (_field(item, "HostResource", multiple=True) or []):
                disk_id = resource.rsplit("/", 1)[-1]
                if disk_id in disks and disk_id not in [d for d, _ in order]:
                    address = _integer(_field(item, "AddressOnParent"), "an AddressOnParent") or 0
                    order.append((disk_id, (controllers.get(_field(item, "Parent") or "", len(controllers)),
                                            address, len(order))))
    ordered = [disk_id for disk_id, _ in sorted(order, key=lambda pair: pair[1])]
    ordered += [disk_id for disk_id in disks if disk_id not in ordered]  # listed but not attached: after
    firmware = _firmware(hardware, system)
    os_section = system.find(q("OperatingSystemSection"))
    os_name = None
    if os_section is not None:
        os_name = (os_section.get(f"{{{VMW}}}osType") or os_section.findtext(q("Description")) or "").strip() or None
    return Machine(name=_machine_name(name), source=source,
                   disks=tuple(_with(disks[disk_id], position=i) for i, disk_id in enumerate(ordered)),
                   firmware=firmware, cpus=cpus, memory_mb=memory_mb, os=os_name)


def _field(item: ElementTree.Element, name: str, multiple: bool = False) -> Any:
    """A RASD/SASD field of a hardware item (OVF 2.0 storage items use SASD), by local name."""
    values = [child.text.strip() for child in item if child.tag in (f"{{{RASD}}}{name}", f"{{{SASD}}}{name}")
              and child.text]
    return values if multiple else (values[0] if values else None)


def _firmware(hardware: ElementTree.Element | None, system: ElementTree.Element) -> str | None:
    for config in hardware.iter(f"{{{VMW}}}Config") if hardware is not None else []:
        if config.get(f"{{{VMW}}}key") == "firmware":
            return "UEFI_64" if (config.get(f"{{{VMW}}}value") or "").lower() == "efi" else "BIOS"
    for machine in system.iter(f"{{{VBOX}}}Machine"):  # VirtualBox's own settings, in whatever namespace
        for element in machine.iter():
            if element.tag.rsplit("}", 1)[-1] == "Firmware":
                return "UEFI_64" if (element.get("type") or "").upper().startswith("EFI") else "BIOS"
    return None


def _capacity(value: str | None, units: str | None, disk_id: str) -> int | None:
    if value is None:
        return None
    if value.startswith("${"):
        raise ImageRejected("ovf-unsupported", f"disk {disk_id!r} takes its capacity from a property ({value})")
    number = _integer(value, f"the capacity of disk {disk_id!r}")
    return None if number is None else number * _units(units or "byte", f"the capacity units of disk {disk_id!r}")


NAMED_UNITS = {"kilobytes": 2**10, "megabytes": 2**20, "gigabytes": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}


def _units(text: str, what: str) -> int:
    """'byte * 2^20' (DSP0004 programmatic units, as OVF asks) or VirtualBox's 'MegaBytes'."""
    if text.strip().lower() in NAMED_UNITS:
        return NAMED_UNITS[text.strip().lower()]
    match = UNITS.match(text)
    if not match:
        raise ImageRejected("ovf-invalid", f"{what} are {text!r}; 'byte' or 'byte * 2^N' is expected")
    return int(match.group(1)) ** int(match.group(2)) if match.group(1) else 1


def _integer(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise ImageRejected("ovf-invalid", f"{what} is {text!r}, not a whole number") from None
    if value < 0:
        raise ImageRejected("ovf-invalid", f"{what} is negative")
    return value


def _format_of(uri: str | None) -> str | None:
    if not uri:
        return None
    return FORMAT_URIS.get(uri.split("#", 1)[0].rstrip("/"))


# -- the machine manifest ------------------------------------------------------------------------

MANIFEST_FIELDS = {"name", "disks", "firmware", "shape", "ocpus", "memory_gbs", "boot_volume_type",
                   "network_type"}
# A bootable machine's launch options a manifest may set (they win over the guest report and the block).
LAUNCH_OPTIONS = {"boot_volume_type": ("PARAVIRTUALIZED", "SCSI", "IDE", "ISCSI"),
                  "network_type": ("PARAVIRTUALIZED", "E1000", "VFIO")}


def parse_machine_manifest(data: bytes, object_name: str) -> Machine:
    """A ``*.machine.json``::

        {"name": "web-01",                                   # optional: the object's name before .machine.json
         "disks": ["exports/web-01-boot.qcow2", "exports/web-01-data.vmdk"],   # boot disk first
         "firmware": "UEFI_64",                              # optional: "BIOS" or "UEFI_64"
         "shape": "VM.Standard.E5.Flex", "ocpus": 2, "memory_gbs": 16,         # optional hints
         "boot_volume_type": "IDE", "network_type": "E1000"}  # optional: a bootable machine's launch

    Disks are object names in the manifest's bucket, each an image name the upload trigger
    accepts (compressed and packed ones too), each at most once.
    """
    def invalid(message: str) -> ImageRejected:
        return ImageRejected("machine-manifest-invalid", message)

    if len(data) > MAX_MANIFEST:
        raise invalid(f"the manifest is over {MAX_MANIFEST} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid(f"the manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid("the manifest is not a JSON object")
    unknown = sorted(set(doc) - MANIFEST_FIELDS)
    if unknown:
        raise invalid(f"unknown field {unknown[0]!r} (the fields are {', '.join(sorted(MANIFEST_FIELDS))})")
    name = doc.get("name", _stem(object_name))
    if not isinstance(name, str) or not MACHINE_NAME.match(name):
        raise invalid(f"name {name!r} must be 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or "
                      "digit")
    disks = doc.get("disks")
    if not isinstance(disks, list) or not disks:
        raise invalid("disks must be a list of one or more object names, the boot disk first")
    if len(disks) > MAX_DISKS:
        raise invalid(f"disks lists {len(disks)}; at most {MAX_DISKS} attach to one instance")
    seen = set()
    for index, disk in enumerate(disks):
        if not isinstance(disk, str) or not disk or len(disk) > 1024:
            raise invalid(f"disks[{index}] must be an object name")
        if not disk.lower().endswith(contract.IMAGE_SUFFIXES):
            raise invalid(f"disks[{index}] {disk!r} is not an image name "
                          f"({', '.join(sorted(contract.IMAGE_SUFFIXES)[:6])}, ...)")
        if disk in seen:
            raise invalid(f"disks[{index}] {disk!r} is listed twice")
        seen.add(disk)
    firmware = doc.get("firmware")
    if firmware is not None and firmware not in ("BIOS", "UEFI_64"):
        raise invalid(f"firmware {firmware!r} must be 'BIOS' or 'UEFI_64'")
    shape = doc.get("shape")
    if shape is not None and (not isinstance(shape, str) or not re.match(r"^[A-Za-z0-9.]{1,64}$", shape)):
        raise invalid(f"shape {shape!r} must be a shape name such as 'VM.Standard.E5.Flex'")
    hints = {}
    for key in ("ocpus", "memory_gbs"):
        value = doc.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 4096:
                raise invalid(f"{key} must be a number above 0")
            hints[key] = value
    for key, allowed in LAUNCH_OPTIONS.items():
        value = doc.get(key)
        if value is not None:
            if value not in allowed:
                raise invalid(f"{key} {value!r} must be one of {', '.join(allowed)}")
            hints[key] = value
    return Machine(name=name, source="manifest", firmware=firmware, shape=shape, hints=hints,
                   cpus=int(hints["ocpus"]) if "ocpus" in hints else None,
                   memory_mb=int(hints["memory_gbs"] * 1024) if "memory_gbs" in hints else None,
                   disks=tuple(MachineDisk(position=i, name=disk, file=disk) for i, disk in enumerate(disks)))


# -- shared --------------------------------------------------------------------------------------

def _relative_name(name: str, code: str, what: str) -> str:
    """A file name inside a package: relative, no '..', no scheme."""
    name = name.strip()
    if name.startswith("./"):
        name = name[2:]
    if (not name or name.startswith("/") or "\\" in name or "://" in name or "\0" in name
            or any(part in ("", "..") for part in name.split("/"))):
        raise ImageRejected(code, f"{what} is named {name!r}: a relative name without '..' is expected")
    return name


def _stem(object_name: str) -> str:
    base = object_name.rsplit("/", 1)[-1]
    for suffix in (".machine.json", ".ova", ".ovf"):
        if base.lower().endswith(suffix):
            base = base[:-len(suffix)]
            break
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip("._-")[:63]
    return cleaned or "machine"


def _machine_name(name: str) -> str:
    return name if MACHINE_NAME.match(name) else _stem(name)


def _with(disk: MachineDisk, **changes: Any) -> MachineDisk:
    from dataclasses import replace

    return replace(disk, **changes)


def _with_disks(machine: Machine, disks: list[MachineDisk]) -> Machine:
    from dataclasses import replace

    return replace(machine, disks=tuple(disks))
