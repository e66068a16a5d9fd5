"""The contract between the upload function and the import flow: which objects are disk
images, which import options an upload's ``opc-meta-*`` metadata (or a flow parameter)
may carry and their limits, the identity of one import (idempotency key and import id),
the tags every resource an import creates carries, and the named refusals.

Standard library only, and importing nothing else of the project: the upload function's
build step copies this file beside its ``trigger.py``, so the function deploys without the
rest of the repository and applies the flow's own rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Mapping

# -- formats --------------------------------------------------------------------------------

# Object name suffixes and metadata values -> qemu-img format names.
FORMAT_NAMES = {
    "qcow2": "qcow2", "qcow": "qcow2", "vmdk": "vmdk", "vhd": "vpc", "vpc": "vpc",
    "vhdx": "vhdx", "vdi": "vdi", "raw": "raw", "img": "raw",
}
# Compressions an image name may end with (``disk.raw.gz``) -> container kind.
COMPRESSIONS = {"gz": "gzip", "xz": "xz", "zst": "zstd", "bz2": "bzip2"}
# Archives holding exactly one disk image -> container kind.
PACKED = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar"}
CONTAINERS = ("gzip", "xz", "zstd", "bzip2", "tar", "tar.gz")
# Object names ending in one of these (case-insensitive) are disk images: an image name, an
# image name compressed (``web.img.xz``), or a tar holding one image.
IMAGE_SUFFIXES = (tuple(f".{suffix}" for suffix in FORMAT_NAMES)
                  + tuple(f".{suffix}.{ext}" for ext in COMPRESSIONS for suffix in FORMAT_NAMES)
                  + tuple(PACKED))
# Object names ending in one of these describe a whole machine (diskimport.images.machine): an OVA,
# an OVF descriptor (its disks beside it), a machine manifest.
MACHINE_SUFFIXES = (".ova", ".ovf", ".machine.json")
# The block volumes OCI makes: 50 GB to 32 TB (its GB is 2**30 bytes); no virtual size may exceed the largest.
MIN_VOLUME_GB = 50
MAX_VOLUME_GB = 32768
MAX_VOLUME_BYTES = MAX_VOLUME_GB * 1024 ** 3


def split_name(object_name: str) -> tuple[str | None, str | None]:
    """(inner format claim, container) of an object name, e.g. ``("raw", "gzip")`` for
    ``disk.raw.gz``, ``(None, "tar")`` for ``vm.tar``, ``("qcow2", None)`` for ``a.qcow2``.

    The claim is a qemu-img format name (``None`` when the name does not tell); the container
    one of :data:`CONTAINERS` (``None`` for a plain image). A compression suffix after a name
    that is not an image's (``notes.txt.gz``) is no container of ours: ``(None, None)``.
    """
    lower = object_name.lower().rsplit("/", 1)[-1]
    for suffix, container in PACKED.items():
        if lower.endswith(suffix):
            return None, container
    stem, dot, ext = lower.rpartition(".")
    if not dot:
        return None, None
    if ext in COMPRESSIONS:
        inner_stem, inner_dot, inner = stem.rpartition(".")
        if inner_dot and inner in FORMAT_NAMES:
            return FORMAT_NAMES[inner], COMPRESSIONS[ext]
        return None, None
    return FORMAT_NAMES.get(ext), None

# -- refusals -------------------------------------------------------------------------------


class Refusal(Exception):
    """A request that is not acted on, and that a retry would not change.

    ``code`` is stable kebab-case for programs (decisions, logs, dashboards); ``message``
    is for people and may change. ``str(exc)`` is ``code: message``, so a failed flow run's
    state message carries the code. A class that names a ``default_code`` may be raised
    with the message alone. Every code is listed in :mod:`diskimport.refusals` (not imported
    here: the upload function's image holds this file alone).
    """

    code: str
    message: str
    default_code: str | None = None

    def __init__(self, code: str, message: str | None = None) -> None:
        if message is None:
            if self.default_code is None:
                raise TypeError(f"{type(self).__name__} needs a code and a message")
            code, message = self.default_code, code
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # Prefect pickles exceptions into states; keep the code across the round trip.
        return type(self), (self.code, self.message)


class InvalidRequest(Refusal, ValueError):
    """A parameter or metadata value is unusable; the message names it."""

    default_code = "invalid-request"


# -- import options -------------------------------------------------------------------------

VPU_LEVELS = (0, 10, 20, *range(30, 121, 10))
OPTION_KEYS = ("ad_number", "display_name", "backup_policy", "vpus", "format", "virtual_size")


@dataclass(frozen=True)
class ImportOptions:
    ad_number: int | None = None
    display_name: str | None = None
    backup_policy: str | None = None
    vpus: int | None = None
    format: str | None = None
    virtual_size: int | None = None  # bytes: the inner disk's size, for a compressed raw dump
    sync: bool | None = None  # a new version updates the volume of the object's earlier import in place

    def as_parameters(self) -> dict[str, Any]:
        """The flow parameters these options set (``format`` and ``virtual_size`` travel as metadata only)."""
        values = {"ad_number": self.ad_number, "display_name": self.display_name,
                  "backup_policy": self.backup_policy, "vpus": self.vpus, "sync": self.sync}
        return {k: v for k, v in values.items() if v is not None}


def _whole_number(code: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not re.fullmatch(r"\s*\d+\s*", str(value)):
        raise InvalidRequest(code, f"{name} must be a whole number, not {value!r}")
    return int(value)


def parse_options(values: Mapping[str, Any], ad_count: int | None = None,
                  max_virtual_size: int = MAX_VOLUME_BYTES) -> ImportOptions:
    """Validate import options given as flow parameters or as object metadata.

    Metadata keys come without their ``opc-meta-`` prefix, with ``-`` or ``_``
    (``opc-meta-virtual-size`` is ``virtual-size``).
    """
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    ad_number = values.get("ad_number")
    if ad_number in (None, ""):
        ad_number = None
    else:
        ad_number = _whole_number("invalid-ad-number", "ad_number", ad_number)
        if ad_number < 1 or (ad_count is not None and ad_number > ad_count):
            limit = f"1 to {ad_count}" if ad_count else "at least 1"
            raise InvalidRequest("invalid-ad-number", f"ad_number must be {limit}, not {ad_number}")
    vpus = values.get("vpus")
    if vpus in (None, ""):
        vpus = None
    else:
        vpus = _whole_number("invalid-vpus", "vpus", vpus)
        if vpus not in VPU_LEVELS:
            raise InvalidRequest("invalid-vpus", f"vpus must be 0, 10, 20 or 30 to 120 in steps of 10, not {vpus}")
    display_name = values.get("display_name") or None
    if display_name is not None:
        display_name = str(display_name)
        if len(display_name) > 255 or re.search(r"[\x00-\x1f]", display_name):
            raise InvalidRequest("invalid-display-name", "display_name must be at most 255 printable characters")
    backup_policy = values.get("backup_policy") or None
    if backup_policy is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", str(backup_policy)):
        raise InvalidRequest("invalid-backup-policy",
                             f"backup_policy must be a policy name or OCID, not {backup_policy!r}")
    fmt = values.get("format") or None
    if fmt is not None and str(fmt).lower() not in FORMAT_NAMES:
        raise InvalidRequest("invalid-format",
                             f"format must be one of {', '.join(sorted(FORMAT_NAMES))}, not {fmt!r}")
    virtual_size = values.get("virtual_size")
    if virtual_size in (None, ""):
        virtual_size = None
    else:
        virtual_size = _whole_number("invalid-virtual-size", "virtual_size", virtual_size)
        if not 0 < virtual_size <= max_virtual_size:
            raise InvalidRequest("invalid-virtual-size", f"virtual_size must be 1 to {max_virtual_size} bytes, "
                                 f"not {virtual_size}")
    sync = values.get("sync")
    sync = None if sync in (None, "") else _yes_or_no("invalid-sync", "sync", sync)
    return ImportOptions(ad_number, display_name, backup_policy, vpus, fmt, virtual_size, sync)


MACHINE_OPTION_KEYS = ("bootable", "launch")
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _yes_or_no(code: str, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidRequest(code, f"{name} must be true or false, not {value!r}")


def parse_machine_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """A machine upload's own options, as flow parameters of the machine import: ``bootable``
    (``opc-meta-bootable``: the boot disk on a boot volume) and ``launch`` (``opc-meta-launch``:
    start the machine), each true or false (yes/no, 1/0, on/off), and ``adapt_guest``
    (``opc-meta-adapt_guest``: ``auto`` or ``off``). Absent ones are left to the deployment's
    defaults; ``launch`` without ``bootable`` means nothing and is refused."""
    values = {str(k).replace("-", "_").lower(): v for k, v in values.items()}
    options = {}
    if values.get("bootable") not in (None, ""):
        options["bootable"] = _yes_or_no("invalid-bootable", "bootable", values["bootable"])
    if values.get("launch") not in (None, ""):
        options["launch"] = _yes_or_no("invalid-launch", "launch", values["launch"])
    if values.get("adapt_guest") not in (None, ""):
        options["adapt_guest"] = adapt_mode(values["adapt_guest"])
    if options.get("launch") and options.get("bootable") is False:
        raise InvalidRequest("invalid-launch", "launch is true but bootable is false: only a bootable machine "
                             "is launched")
    return options


ADAPT_MODES = ("auto", "off")


def adapt_mode(value: Any) -> str:
    """``adapt_guest`` (a flow parameter, ``opc-meta-adapt_guest``): ``auto`` or ``off``."""
    mode = str(value).strip().lower()
    if mode not in ADAPT_MODES:
        raise InvalidRequest("invalid-adapt-guest", f"adapt_guest is {str(value)[:40]!r}: give auto (adapt a Linux "
                             "guest to OCI before its launch) or off (launch it as written)")
    return mode


def merge(parameters: ImportOptions, metadata: ImportOptions) -> ImportOptions:
    """Flow parameters win over object metadata."""
    return ImportOptions(*(p if p is not None else m for p, m in zip(
        dataclasses.astuple(parameters), dataclasses.astuple(metadata))))


# -- identity of an import ------------------------------------------------------------------

def idempotency_key(namespace: str, bucket: str, object_name: str, etag: str) -> str:
    """One object version: the function creates at most one flow run per key."""
    return f"{namespace}/{bucket}/{object_name}@{etag}"


def import_id(namespace: str, bucket: str, object_name: str, etag: str) -> str:
    """A stable id of one object version: the same upload always maps to the same import."""
    return hashlib.sha256(idempotency_key(namespace, bucket, object_name, etag).encode()).hexdigest()[:32]


def source_id(namespace: str, bucket: str, object_name: str) -> str:
    """A stable id of one object, every version of it: a sync finds the volume of its earlier import by it."""
    return hashlib.sha256(f"{namespace}/{bucket}/{object_name}".encode()).hexdigest()[:32]


# -- tags on every resource an import creates (so a sweeper finds what a dead run left) -----

MANAGED_BY = "oci-disk-import"
TAG_MANAGED_BY = "managed-by"
TAG_IMPORT_ID = "import-id"
TAG_OBJECT = "import-object"
TAG_ETAG = "import-etag"
TAG_FLOW_RUN = "import-flow-run"
TAG_STATE = "import-state"
TAG_MACHINE = "import-machine"  # a machine import's volumes: the machine's name
TAG_DISK = "import-disk"        # and the disk's position in it (0: the boot disk)
TAG_MACHINE_OF = "imported-machine-of"  # the instance a bootable import started: its import id
TAG_FIRMWARE = "import-firmware"  # a boot volume: the firmware it boots by, as detected or given
TAG_BOOT = "import-boot"        # the started machine's boot check: booted, not-booted
TAG_COPY_ID = "copy-id"         # a copy's backups and restored volumes: the copy's id
TAG_COPY_OF = "copy-of"         # a restored volume: the source volume's OCID
TAG_SOURCE = "import-source"    # an imported disk's volume: its object, whatever the version (source_id)
TAG_VERSION_TIME = "import-version-time"  # and when the version it holds was uploaded (epoch seconds)
TAG_VIRTUAL_SIZE = "import-virtual-size"  # and that version's disk size in bytes
TAG_CUTOVER_TO = "import-cutover-to"      # a sync volume cut over (diskimport.migration): the machine's instance
TAG_MANIFEST = "import-manifest"          # the SHA-256 of the block manifest of what the volume holds
TAG_SYNCED_FROM = "import-synced-from"    # a volume synced to a new version: the ETag it held before
STATE_WRITING = "writing"
STATE_IMPORTED = "imported"
STATE_FAILED = "failed"
