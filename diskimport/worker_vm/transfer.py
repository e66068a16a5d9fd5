"""What runs on the worker: tools, staging the object, second-opinion inspection,
the write and its verification."""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from ..agent.decompress import DECOMPRESSORS
from ..errors import ImageRejected
from .commands import CommandFailed, CommandResult, CommandRunner
from .qemu_img import CHECKABLE_FORMATS, ImageInfo, QemuImg, image_opts
from .agent_archive import ARCHIVE_NAME, agent_archive
from .slices import format_node, nbd_protocol


# Installs what ensure_tools misses with the worker's package manager. The tools every import
# needs must install; the checkers of NTFS and btrfs are tried one package at a time (on Oracle
# Linux ntfsprogs is in EPEL, btrfs-progs in the UEK repositories, which a worker may lack), and
# a filesystem whose checker is missing is then reported "not checked".
_INSTALL_SCRIPT = r"""
if command -v dnf >/dev/null; then pm="dnf -y -q"; elif command -v yum >/dev/null; then pm="yum -y -q"; else pm=; fi
if [ -n "$pm" ]; then
  $pm install qemu-img python3 e2fsprogs xfsprogs dosfstools util-linux gzip xz zstd bzip2 || exit $?
  for p in ntfsprogs btrfs-progs; do
    $pm install "$p" || $pm --enablerepo='*EPEL*' install "$p" || echo "could not install $p" >&2
  done
else
  export DEBIAN_FRONTEND=noninteractive
  apt-get -qq update && apt-get -qq install -y qemu-utils python3 e2fsprogs xfsprogs dosfstools fdisk util-linux \
    gzip xz-utils zstd bzip2 \
    || exit $?
  for p in ntfs-3g btrfs-progs; do apt-get -qq install -y "$p" || echo "could not install $p" >&2; done
fi
"""


def ensure_tools(runner: CommandRunner) -> str:
    """Make sure qemu-img and the filesystem checkers are on the worker; return qemu-img's version.

    Installs them with the worker's package manager when missing (dnf/yum on Oracle Linux,
    apt-get on Debian/Ubuntu): the NTFS checker (``ntfsfix``: ntfsprogs on dnf/yum, ntfs-3g on
    apt) and btrfs's (btrfs-progs) when the worker's repositories have them.
    """
    needed = ["qemu-img", "python3", "e2fsck", "xfs_repair", "fsck.vfat", "ntfsfix", "btrfs", "sfdisk", "blkid",
              "losetup", "prlimit", *sorted({argv[0] for argv in DECOMPRESSORS.values()})]
    probe = runner.run(["sh", "-c", 'for t in "$@"; do command -v "$t" >/dev/null || echo "$t"; done', "sh", *needed])
    missing = probe.stdout.split()
    if missing:
        result = runner.run(["sh", "-c", _INSTALL_SCRIPT], timeout=900)
        if result.returncode != 0:
            raise CommandFailed(result, f"installing {' '.join(missing)} on the worker")
    return QemuImg(runner).version()


STAGING_PREFIXES = ("/dev/shm/oci-disk-import.", "/var/tmp/oci-disk-import.")

# Picks where the object is kept on the worker: memory (tmpfs) when it fits in half of what
# is free there and in memory, else the boot volume. A boot volume is network storage whose
# throughput scales with its size (a 50 GB balanced one writes about 24 MB/s), so keeping the
# copy in memory takes the boot volume off the import's path.
_STAGING_SCRIPT = r"""
size="$1"; name="$2"
shm_free=$(df -P -B1 /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
mem_free_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
if [ -n "$shm_free" ] && [ -n "$mem_free_kib" ] && [ "$size" -le $((shm_free / 2)) ] \
   && [ "$size" -le $((mem_free_kib * 512)) ]; then
  exec mktemp -d "/dev/shm/oci-disk-import.$name.XXXXXX"
fi
exec mktemp -d "/var/tmp/oci-disk-import.$name.XXXXXX"
"""


def make_staging_dir(runner: CommandRunner, import_id: str, size: int) -> str:
    """A private directory on the worker for the object: in memory if it fits, else on disk."""
    result = runner.run(["sh", "-c", _STAGING_SCRIPT, "sh", str(int(size)), import_id[:16]])
    if result.returncode != 0:
        raise CommandFailed(result, "creating the staging directory")
    return result.stdout.strip()


class WorkerFiles(Protocol):
    """What the streaming transfer needs besides running commands: private files on the worker."""

    def put_private_file(self, content: str | bytes, remote_path: str) -> None: ...

    def write_private_ranges(self, remote_path: str, pieces: Sequence[tuple[int, bytes]]) -> None: ...


@dataclass(frozen=True)
class TransferSettings:
    connections: int = 4
    chunk_bytes: int = 8 * 1024 * 1024
    bind: str | None = "ssh"  # connect from the address the SSH session reached the worker on
    max_attempts: int = 10


class ObjectStream:
    """The object arriving on the worker through :mod:`diskimport.agent.stream`, served over NBD.

    ``nbd_url`` is what qemu-img opens while the download runs; ``path`` is the complete
    local copy once :meth:`finish` returns.
    """

    def __init__(self, runner: CommandRunner, directory: str,
                 on_event: Callable[[dict[str, Any]], None] | None) -> None:
        self.runner = runner
        self.directory = directory
        self.path = f"{directory}/image"
        self.socket = f"{directory}/nbd.sock"
        self.stop_file = f"{directory}/stop"
        self.config = f"{directory}/stream.json"
        self.script = f"{directory}/{ARCHIVE_NAME}"
        self.events: list[dict[str, Any]] = []
        self.windowed = False  # staged through a window: ``path`` is never a whole copy
        self.device_file = f"{directory}/device"
        self.decoding = False  # a VMDK the streamer decodes onto the device itself (:class:`Decode`)
        self._on_event = on_event
        self._ready = threading.Event()
        self._result: CommandResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="object-stream", daemon=True)

    @property
    def nbd_url(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def _line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if not isinstance(event, dict):
            return
        self.events.append(event)
        if event.get("event") == "ready":
            self._ready.set()
        if self._on_event is not None:
            self._on_event(event)

    def _run(self) -> None:
        try:
            self._result = self.runner.run(["python3", self.script, "stream", self.config], timeout=24 * 3600,
                                           on_output=self._line)
        except BaseException as exc:  # surfaced by wait_ready / finish
            self._error = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 60.0) -> None:
        self._thread.start()
        self._ready.wait(timeout)
        if not any(e.get("event") == "ready" for e in self.events):
            self._thread.join(5)
            raise self._failure("the transfer did not start")

    def _failure(self, what: str) -> Exception:
        if self._error is not None:
            return TransferFailed(f"{what}: {self._error}")
        refused = self.refusal()
        if refused is not None:
            return refused
        failed = next((e for e in reversed(self.events) if e.get("event") == "failed"), None)
        if failed is not None:
            return TransferFailed(f"{what}: {failed.get('error')}")
        if self._result is not None:
            return TransferFailed(f"{what}: {CommandFailed(self._result, 'the transfer')}")
        return TransferFailed(what)

    def refusal(self) -> ImageRejected | None:
        """The data was not what the inspection said (a decompression bomb, a corrupt stream): the refusal."""
        failed = next((e for e in reversed(self.events) if e.get("event") == "failed" and e.get("code")), None)
        return None if failed is None else ImageRejected(str(failed["code"]), str(failed.get("error")))

    def use_device(self, device: str) -> None:
        """Name the attached volume's device to a streamer decoding onto it (it waits for this)."""
        self.runner.run(["sh", "-c", 'printf "%s\\n" "$2" > "$1.tmp" && mv "$1.tmp" "$1"', "sh",
                         self.device_file, device])

    def finish(self, timeout: float = 24 * 3600) -> dict[str, Any]:
        """Wait for the last byte; return the transfer's account (bytes fetched, seconds).

        Decoding, it also waits for the device to be written and read back, and the account
        holds what was (``decoded``: grains, bytes written and verified, runs, zeros checked).
        """
        self.runner.run(["sh", "-c", 'echo stop > "$1"', "sh", self.stop_file])
        self._thread.join(timeout)
        if self._thread.is_alive() or self._result is None or self._result.returncode != 0:
            raise self._failure("transferring the image onto the worker failed")
        done = next(e for e in reversed(self.events) if e.get("event") == "fetched")
        window = next((e for e in reversed(self.events) if e.get("event") == "window"), {})
        decoded = next((e for e in reversed(self.events) if e.get("event") == "decoded"), None)
        return {"fetched_bytes": int(done["fetched"]) + int(window.get("refetched", 0)),
                "seconds": float(done["seconds"]),
                "retries": sum(1 for e in self.events if e.get("event") == "retry"),
                "refetched_bytes": int(window.get("refetched", 0)),
                **({"decoded": {k: v for k, v in decoded.items() if k != "event"}} if decoded else {})}

    def abort(self) -> None:
        """Stop the download (the worker is about to be cleaned up)."""
        if self._thread.is_alive():
            self.runner.run(["sh", "-c", 'echo abort > "$1"', "sh", self.stop_file])
            self._thread.join(30)


class TransferFailed(Exception):
    """The object could not be brought onto the worker."""


@dataclass(frozen=True)
class Inner:
    """The image inside a compressed or packed object (``InspectedImage``'s container fields)."""

    container: str   # contract.CONTAINERS
    offset: int      # a tar member's offset in the object; a tar.gz member's in the decompressed data
    size: int        # the image's length: what ``ObjectStream.path`` holds


@dataclass(frozen=True)
class Window:
    """Keep only this much of the image in the staging file, not all of it (diskimport.agent.window)."""

    behind: int  # bytes kept behind the furthest read (the readers that follow it: the comparisons)
    ahead: int   # bytes fetched past it


@dataclass(frozen=True)
class Decode:
    """The streamer decodes a streamOptimized VMDK as it arrives and writes it onto the device itself
    (diskimport.agent.vmdk): no staging copy, no NBD, no qemu-img."""

    capacity: int         # the disk's bytes (the inspection's virtual size)
    target_is_zero: bool  # the device reads as zeros where no grain is (a fresh volume)


def stream_optimized_header(head: bytes) -> bool:
    """Whether a VMDK's sparse header says it is stream-optimized: deflated grains with markers
    (flags bits 16 and 17), which the streamer decodes in order (:class:`Decode`)."""
    return compressed_grains_header(head) and bool(int.from_bytes(head[8:12], "little") & (1 << 17))


def compressed_grains_header(head: bytes) -> bool:
    """Whether a VMDK's sparse header says its grains are compressed (a streamOptimized VMDK).

    The header's flags (little-endian at byte 8) have bit 16 set for compressed grains,
    and its compress algorithm (byte 77) is 1 (deflate).
    """
    if len(head) < 79 or head[:4] != b"KDMV":
        return False
    flags = int.from_bytes(head[8:12], "little")
    return bool(flags & (1 << 16)) and int.from_bytes(head[77:79], "little") == 1


def start_stream(runner: CommandRunner, files: WorkerFiles, url: str, etag: str, size: int, directory: str,
                 present: Sequence[tuple[int, bytes]], settings: TransferSettings = TransferSettings(),
                 on_event: Callable[[dict[str, Any]], None] | None = None, inner: Inner | None = None,
                 digest: tuple[str, str, str] | None = None, window: Window | None = None,
                 decode: Decode | None = None) -> ObjectStream:
    """Start fetching the object (minus the ``present`` pieces, written first) and serving it over NBD.

    With ``inner``, what is served (and kept at ``path``) is the image inside: a tar's
    member is fetched alone; a compressed object is fetched whole beside it
    (``{directory}/object``) and decompressed in order as it arrives.
    The PAR URL (a bearer secret) goes into a configuration file readable only by the
    worker user, never onto a command line. ``digest`` (hashlib name, hex, what it is of: an
    OVA manifest's line) is checked against the fetched bytes as they arrive. With ``window``,
    an image (not a compressed object) is kept in the staging file only within that window
    of its readers: ``path`` is then never a complete copy. With ``decode``, an image (not a
    compressed object) is decoded onto the device named by :meth:`ObjectStream.use_device`,
    and nothing is served over NBD.
    """
    stream = ObjectStream(runner, directory, on_event)
    files.put_private_file(agent_archive(), stream.script)
    extra: dict[str, Any] = {}
    fetched_into = stream.path
    if inner is not None and inner.container == "tar":
        present = [(max(start, inner.offset) - inner.offset,
                    data[max(0, inner.offset - start):max(0, inner.offset + inner.size - start)])
                   for start, data in present]
        extra = {"base": inner.offset}
        size = inner.size
    elif inner is not None:
        fetched_into = f"{directory}/object"
        extra = {"container": inner.container, "object_size": size, "object_path": fetched_into,
                 "skip": inner.offset}
        size = inner.size
    present = [(start, data) for start, data in present if data]
    files.write_private_ranges(fetched_into, present)
    config = {
        "url": url, "etag": etag, "size": size, "path": stream.path, "socket": stream.socket,
        "stop_file": stream.stop_file, "directory": directory, "present": [[start, start + len(data)] for start, data in present],
        "connections": settings.connections, "chunk_bytes": settings.chunk_bytes, "bind": settings.bind,
        "max_attempts": settings.max_attempts, **extra,
    }
    if digest is not None:
        config["digest"] = list(digest)
    if window is not None and (inner is None or inner.container == "tar"):
        config["window"] = {"behind": window.behind, "ahead": window.ahead}
    if decode is not None and (inner is None or inner.container == "tar"):
        config.pop("window", None)
        config["vmdk_stream"] = {"capacity": decode.capacity, "target_is_zero": decode.target_is_zero,
                                 "device_file": stream.device_file}
    stream.windowed = "window" in config
    stream.decoding = "vmdk_stream" in config
    files.put_private_file(json.dumps(config), stream.config)
    stream.start()
    return stream


def second_opinion(qemu: QemuImg, path: str, fmt: str, expected_virtual_size: int,
                   driver: str | None = None) -> ImageInfo:
    """``qemu-img info`` and ``check`` on the worker, under resource limits; refuse disagreements.

    ``driver`` is the one the disk is written through when it is not ``fmt``'s own
    (``InspectedImage.driver``): a fixed VHD's, ``raw``, gets :func:`fixed_vhd_opinion`.
    """
    if driver is not None and driver != fmt:
        if (fmt, driver) != ("vpc", "raw"):
            raise ValueError(f"no second opinion for {fmt} read as {driver}")
        return fixed_vhd_opinion(qemu, path, expected_virtual_size)
    return _opinion(qemu, path, fmt, expected_virtual_size, None, path)


def delta_opinion(qemu: QemuImg, path: str, expected_virtual_size: int, backing: str, detached: str) -> ImageInfo:
    """:func:`second_opinion` of a delta upload (:mod:`diskimport.delta`) staged whole at ``path``: a
    qcow2 whose backing file is exactly ``backing`` (read, never opened), and which ``qemu-img check``
    finds clean opened as ``detached`` (the same file with its backing cut off)."""
    return _opinion(qemu, path, "qcow2", expected_virtual_size, backing, detached)


def _opinion(qemu: QemuImg, path: str, fmt: str, expected_virtual_size: int, backing: str | None,
             checked: str) -> ImageInfo:
    try:
        info = qemu.info(path, fmt)
    except CommandFailed as exc:
        raise ImageRejected("qemu-cannot-read", f"qemu-img cannot read the image as {fmt}: {exc}") from None
    if info.format != fmt:
        raise ImageRejected("qemu-disagrees", f"qemu-img reads the image as {info.format}, not {fmt}")
    if info.backing_filename != backing:
        raise ImageRejected("backing_file", f"the image has a backing file ({info.backing_filename!r})"
                            if backing is None else f"the image's backing file is {info.backing_filename!r}, "
                            f"not {backing!r}")
    if info.data_file:
        raise ImageRejected("data_file", f"the image has an external data file ({info.data_file!r})")
    if info.virtual_size != expected_virtual_size:
        raise ImageRejected("qemu-disagrees", f"qemu-img reports a virtual size of {info.virtual_size} bytes, the header "
                            f"{expected_virtual_size}")
    if fmt in CHECKABLE_FORMATS:
        check = qemu.check(checked, fmt)
        if not check.ok:
            raise ImageRejected("qemu-check-failed", f"qemu-img check found {check.corruptions} corruption(s): {check.output[-2000:]}")
    return info


def remove_staging(runner: CommandRunner, directory: str) -> None:
    if directory.startswith(STAGING_PREFIXES) and "/../" not in directory:
        runner.run(["rm", "-rf", "--one-file-system", directory])


# qemu's vpc driver opens no VHD above 0xff000000 sectors (2040 GiB; "File too large").
QEMU_VPC_MAX_BYTES = 0xFF000000 * 512


def fixed_vhd_opinion(qemu: QemuImg, path: str, data_size: int) -> ImageInfo:
    """qemu-img's reading of a fixed VHD whose first ``data_size`` bytes are the disk.

    The window the write reads (raw, bytes [0, data_size)) must open, which qemu refuses
    when it reaches past the object's end; and qemu's ``vpc`` driver, told to size by the
    footer's current size rather than the geometry, must find a fixed VHD of that size
    (above its 2040 GiB limit that reading is skipped). Returns the window's info.
    """
    protocol = _protocol(path)
    vpc = image_opts(driver="vpc", force_size_calc="current_size", **{f"file.{k}": v for k, v in protocol.items()})
    try:
        window = qemu.info_node(format_node("raw", 0, data_size, **protocol))
        footer = qemu.info_node(vpc) if data_size <= QEMU_VPC_MAX_BYTES else None
    except CommandFailed as exc:
        raise ImageRejected("qemu-cannot-read", f"qemu-img cannot read the image as a fixed VHD of {data_size} bytes: "
                            f"{exc}") from None
    if footer is not None and (footer.format, footer.virtual_size) != ("vpc", data_size):
        raise ImageRejected("qemu-disagrees", f"qemu-img reads the VHD footer as {footer.format} of "
                            f"{footer.virtual_size} bytes, the header inspection as a fixed VHD of {data_size}")
    if window.virtual_size != data_size:
        raise ImageRejected("qemu-disagrees", f"qemu-img reads {window.virtual_size} bytes of disk, the header "
                            f"{data_size}")
    return window


def _protocol(path: str) -> dict[str, str]:
    """``--image-opts`` protocol options for ``path``: a file, or the streamer's ``nbd+unix://`` URL."""
    url = urllib.parse.urlsplit(path)
    if url.scheme == "nbd+unix":
        return nbd_protocol(urllib.parse.parse_qs(url.query)["socket"][0])
    return {"filename": path}
