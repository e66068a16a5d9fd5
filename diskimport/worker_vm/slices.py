"""Write the image onto the device slice by slice, and verify each slice behind the write.

The virtual disk is cut into a few slices. qemu-img converts them one after another from
the object as it streams in (NBD), and as soon as a slice is on the device, a second thread
compares it with the worker's copy of the image while the next slice converts. So the
verification, which must read every written byte back from the device, runs while the
network is still the bottleneck, and only the last slice's comparison is left when the
last byte has arrived.

Why a slice may be compared against the staging file while the download still runs: the
comparison of virtual range R reads the same image bytes the conversion of R read (qemu's
format drivers are deterministic), and the conversion read them through NBD, which waited
until they were on the worker; the bytes every open reads (header, tables) were read by
``qemu-img info`` and ``check`` before. Should that ever not hold, the comparison reads
zeros where bytes are still missing and reports a difference, never a false match, and a
slice that differs is compared again once the whole object is on the worker before the
import is failed.

Large runs the image itself reports as zeros are checked on the device with qemu's
``null-co`` driver, which reports them as zeros in one piece: on a sparse volume file that
takes a single look, where ``qemu-img compare`` against a sparse format would ask the
device about every cluster.
"""

from __future__ import annotations

import json
import shlex
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .commands import CommandFailed, CommandRunner
from .qemu_img import ImageInfo, QemuImg, image_opts

MiB = 1024 * 1024
GiB = 1024 * MiB
MAX_SLICES = 16
MIN_SLICE = 256 * MiB
ZERO_RUN = 1 * GiB  # zero runs at least this long are checked on their own (null-co)
VERIFIERS = 1  # one compare at a time: on two cores a second one slows the write more than it helps


class VerificationFailed(Exception):
    """The volume does not read back as the image's guest-visible content."""


@dataclass(frozen=True)
class Piece:
    kind: str  # "compare" (image against device) or "zero" (the device reads as zeros)
    offset: int
    length: int


def plan_slices(virtual_size: int, image_bytes: int | None = None) -> list[tuple[int, int]]:
    """``[(offset, length)]`` covering the disk in up to 16 equal slices.

    A slice costs a convert and a few compares (processes, opens, a flush) whatever it holds,
    so there is one per 256 MiB of the image file (which bounds the data it holds) or of the
    virtual disk, whichever is smaller: a sparse 64 GiB disk with 1 GiB of data gets 4.
    """
    work = virtual_size if image_bytes is None else min(virtual_size, image_bytes)
    return _even_slices(virtual_size, max(1, min(MAX_SLICES, work // MIN_SLICE)))


def _even_slices(virtual_size: int, count: int) -> list[tuple[int, int]]:
    step = -(-virtual_size // count)
    step = -(-step // MiB) * MiB  # whole MiB, so slices start on every device's block boundary
    return [(offset, min(step, virtual_size - offset)) for offset in range(0, virtual_size, step)]


WINDOW_SLICE = 128 * MiB   # through a window: slices of about this much image data (see window_for)
MAX_WINDOW_SLICES = 64
MAX_WINDOW = 1 * GiB       # the most a window keeps behind its furthest read
WINDOW_MARGIN = 64 * MiB   # and beyond two slices: a VMDK's grain table is read up to 32 MiB ahead of its grains


def plan_window_slices(virtual_size: int, image_bytes: int) -> list[tuple[int, int]]:
    """Slices for an image staged through a window (diskimport.agent.window): one per ``WINDOW_SLICE`` of its data
    (more and smaller than :func:`plan_slices`'s, as the window holds the two slices being
    written and compared), up to 64."""
    return _even_slices(virtual_size, max(1, min(MAX_WINDOW_SLICES, min(virtual_size, image_bytes) // WINDOW_SLICE)))


def window_for(virtual_size: int, image_bytes: int) -> tuple[int, int] | None:
    """``(behind, ahead)`` bytes for writing a streamOptimized VMDK through a window, or None when
    its slices are too large for one (it is then staged whole).

    While slice k is written, slice k - 1 is compared: the comparison reads at most two slices
    behind the furthest read. A slice's grains hold at most its virtual bytes (plus a marker and
    deflate's framing, under 1%), so two slices' worth, with room for qemu's reads ahead of a
    grain (two grains) and for the tables, bounds it for an image laid out in order. The fetch
    runs as far ahead, so the network keeps going while a write waits for a comparison.
    """
    slices = plan_window_slices(virtual_size, image_bytes)
    largest = max(length for _, length in slices)
    behind = min(image_bytes, 2 * largest + largest // 50 + WINDOW_MARGIN)
    return None if behind > MAX_WINDOW else (behind, behind)


# Runs on the worker: ``qemu-img map`` of the image, reduced to its zero runs of at least
# ``min_length`` bytes, merged. The map of a hostile image can have a line per cluster; it is
# read line by line there, and only the few long runs come back.
ZERO_RUNS_SCRIPT = r"""
import json, subprocess, sys
min_length, argv = int(sys.argv[1]), sys.argv[2:]
proc = subprocess.Popen(argv, stdout=subprocess.PIPE, universal_newlines=True)
runs, run = [], None
for line in proc.stdout:
    line = line.strip().strip("[],")
    if not line:
        continue
    extent = json.loads(line)
    start, end = int(extent["start"]), int(extent["start"]) + int(extent["length"])
    if not extent.get("zero"):
        continue
    if run is not None and run[1] == start:
        run[1] = end
        continue
    if run is not None and run[1] - run[0] >= min_length:
        runs.append(run)
    run = [start, end]
if run is not None and run[1] - run[0] >= min_length:
    runs.append(run)
code = proc.wait()
if code:
    sys.exit(code)
print(json.dumps(runs))
"""


# Runs on the worker: drop a written and compared range of the device from the page cache.
DROP_PAGES = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
              "os.posix_fadvise(fd, int(sys.argv[2]), int(sys.argv[3]), os.POSIX_FADV_DONTNEED)")


def pieces_for(offset: int, length: int, zeros: Sequence[tuple[int, int]]) -> list[Piece]:
    """How to verify [offset, offset + length): compare what the image holds, zero-check its long zero runs."""
    pieces: list[Piece] = []
    pos, end = offset, offset + length
    for zstart, zlength in zeros:
        lo, hi = max(pos, zstart), min(end, zstart + zlength)
        if lo >= hi:
            continue
        if lo > pos:
            pieces.append(Piece("compare", pos, lo - pos))
        pieces.append(Piece("zero", lo, hi - lo))
        pos = hi
    if pos < end:
        pieces.append(Piece("compare", pos, end - pos))
    return pieces


def format_node(fmt: str, offset: int, length: int, **protocol: str) -> str:
    """``--image-opts`` for bytes [offset, offset + length) of the guest disk in an image of ``fmt``."""
    window = {"driver": "raw", "offset": str(offset), "size": str(length)}
    if fmt == "raw":
        return image_opts(**window, **{f"file.{k}": v for k, v in protocol.items()})
    return image_opts(**window, **{"file.driver": fmt}, **{f"file.file.{k}": v for k, v in protocol.items()})


def device_node(device: str, offset: int, length: int, direct: bool = True) -> str:
    """``--image-opts`` for a window of the device, read and written with O_DIRECT unless ``direct`` is off.

    Locking is off: the slices' converts and compares open the device side by side, each
    within its own window, and nothing else on the worker touches it. Flushes are on (qemu-img
    convert's default cache mode skips them), so nothing written stays in the worker's memory.
    """
    return image_opts(driver="raw", offset=str(offset), size=str(length), **{
        "file.filename": device, "file.locking": "off", "cache.direct": "on" if direct else "off",
        "cache.no-flush": "off"})  # each convert ends with a flush: the slice is on the device before it is compared


def compressed_grains(fmt: str, info: ImageInfo) -> bool:
    """Whether the image stores its data as compressed grains (a streamOptimized VMDK).

    Such an image is read back one 64 KiB grain at a time, so the comparison would wait on
    the device once per grain with O_DIRECT; through the page cache, which the write fills,
    those reads cost nothing. Everything else is written and read back with O_DIRECT, which
    keeps the worker's memory and CPU for the transfer.
    """
    return fmt == "vmdk" and info.format_specific.get("create-type") == "streamOptimized"


def nbd_protocol(socket: str) -> dict[str, str]:
    return {"driver": "nbd", "server.type": "unix", "server.path": socket}


class SliceWriter:
    """Converts slices from the NBD stream and verifies each one behind the write on a second thread."""

    def __init__(self, runner: CommandRunner, qemu: QemuImg, fmt: str, virtual_size: int, socket: str,
                 staging_image: str, device: str, *, target_is_zero: bool, direct_io: bool = True,
                 on_progress: Callable[[float], None] | None = None,
                 on_verified: Callable[[int, int], None] | None = None, image_bytes: int | None = None,
                 windowed: bool = False, sync_socket: str | None = None) -> None:
        self.runner, self.qemu, self.fmt, self.virtual_size = runner, qemu, fmt, virtual_size
        self.socket, self.staging_image, self.device = socket, staging_image, device
        self.target_is_zero, self.direct_io = target_is_zero, direct_io
        self.on_progress, self.on_verified = on_progress, on_verified
        # Through a window (diskimport.agent.window), a write waits for the comparison two slices back,
        # so the window holds what the comparisons still read, and the stream outlives them: a
        # second look reads over NBD what the window let go.
        self.windowed = windowed
        self.slices = (plan_window_slices(virtual_size, image_bytes or virtual_size) if windowed
                       else plan_slices(virtual_size, image_bytes))
        # A sync writes through the agent's sync target (diskimport.worker_vm.sync_target), which writes
        # only what differs from the device: every byte goes there, zeros too.
        self.sync_socket = sync_socket
        if sync_socket is not None:
            self.target_is_zero = False
        self.zeros: list[tuple[int, int]] | None = None
        self.verified_bytes = 0
        self._lock = threading.Lock()

    def _nbd(self, offset: int, length: int) -> str:
        return format_node(self.fmt, offset, length, **nbd_protocol(self.socket))

    def _device(self, offset: int, length: int) -> str:
        return device_node(self.device, offset, length, self.direct_io)

    def _target(self, offset: int, length: int) -> str:
        if self.sync_socket is not None:
            return format_node("raw", offset, length, **nbd_protocol(self.sync_socket))
        return self._device(offset, length)

    def _staging(self, offset: int, length: int, again: bool = False) -> str:
        if self.windowed and again:  # the stream fetches again what the window let go
            return self._nbd(offset, length)
        return format_node(self.fmt, offset, length, filename=self.staging_image)

    def plan_zeros(self) -> list[tuple[int, int]]:
        """The image's long zero runs, from its metadata (read over NBD: only bytes already fetched)."""
        if self.zeros is None:
            if self.fmt == "raw":
                self.zeros = []  # a raw image has no metadata: every byte is compared
            else:
                argv = ["python3", "-c", ZERO_RUNS_SCRIPT, str(ZERO_RUN), *self.qemu.limits.prefix(),
                        self.qemu.binary, "map", "--output=json", "--image-opts", self._nbd(0, self.virtual_size)]
                result = self.runner.run(argv)
                if result.returncode != 0:
                    raise CommandFailed(result, "qemu-img map")
                self.zeros = [(int(start), int(end) - int(start)) for start, end in json.loads(result.stdout)]
        return self.zeros

    def verify_slice(self, offset: int, length: int, again: bool = False) -> str | None:
        """Compare one slice; ``None`` if the device holds it, else what differs.

        Through a window, the first look reads the staging file, which holds zeros where the
        window let bytes go: a difference, or an image qemu-img cannot read there, is looked at
        ``again`` over NBD, which fetches those bytes again.
        """
        commands = []
        for piece in pieces_for(offset, length, self.plan_zeros()):
            image = (self._staging(piece.offset, piece.length, again) if piece.kind == "compare"
                     else image_opts(driver="null-co", size=str(piece.length), **{"read-zeroes": "on"}))
            commands.append(shlex.join([self.qemu.binary, "compare", "--image-opts", image,
                                        self._device(piece.offset, piece.length)]))
        if not self.direct_io:
            # Once compared, the slice's pages leave the page cache: the next slices' writes reuse
            # them, instead of the volume growing the worker's cache by its whole size.
            commands.append(shlex.join(["python3", "-c", DROP_PAGES, self.device, str(offset), str(length)]))
        # One shell for the slice's pieces: the first difference (exit 1) or error (exit 2) stops it.
        result = self.runner.run(["sh", "-c", " && ".join(commands)])
        if result.returncode == 1 or (result.returncode != 0 and self.windowed and not again):
            return f"bytes {offset}-{offset + length - 1}: {(result.stdout + result.stderr).strip()[-500:]}"
        if result.returncode != 0:
            raise CommandFailed(result, f"qemu-img compare of bytes {offset}-{offset + length - 1}")
        with self._lock:
            self.verified_bytes += length
        if self.on_verified is not None:
            self.on_verified(self.verified_bytes, self.virtual_size)
        return None

    def write(self, wait_complete: Callable[[], Any]) -> dict[str, Any]:
        """Convert every slice, verifying behind; ``wait_complete`` waits for the object's last byte.

        Returns what ``wait_complete`` returned. Raises :class:`VerificationFailed` if a slice
        still differs once the whole object is on the worker.
        """
        verifier = ThreadPoolExecutor(max_workers=VERIFIERS, thread_name_prefix="verify-slice")
        checks: list[tuple[tuple[int, int], Future[str | None]]] = []
        try:
            zeros = verifier.submit(self.plan_zeros)  # the map runs while the first slice converts
            count = len(self.slices)
            for index, (offset, length) in enumerate(self.slices):
                if self.windowed and index >= 2:
                    checks[index - 2][1].result()  # its bytes may leave the window once compared

                def progress(percent: float, index: int = index) -> None:
                    if self.on_progress is not None:
                        self.on_progress((index + percent / 100) * 100 / count)

                self.qemu.convert_nodes(self._nbd(offset, length), self._target(offset, length),
                                        target_is_zero=self.target_is_zero, on_progress=progress)
                checks.append(((offset, length), verifier.submit(self.verify_slice, offset, length)))
                failed = next((f for _, f in checks if f.done() and f.exception() is not None), None)
                if failed is not None:
                    failed.result()  # raises what the comparison raised
            zeros.result()  # the map reads over NBD, which ends once the download completes
            if self.windowed:  # the comparisons read through the stream: it ends after them
                differing = [(window, f.result()) for window, f in checks]
                self._second_looks(differing)
                return wait_complete()
            completed = wait_complete()
            differing = [(window, f.result()) for window, f in checks]
        finally:
            verifier.shutdown(wait=True, cancel_futures=True)
        self._second_looks(differing)
        return completed

    def _second_looks(self, differing: list[tuple[tuple[int, int], str | None]]) -> None:
        for (offset, length), difference in differing:
            # Every byte is on the worker now: a second look tells a real difference from a bad read.
            if difference is not None and (difference := self.verify_slice(offset, length, again=True)) is not None:
                raise VerificationFailed(f"the volume does not hold the image's content: {difference}")

    def summary(self) -> dict[str, Any]:
        return {"slices": len(self.slices), "verified_bytes": self.verified_bytes,
                "zero_runs_bytes": sum(length for _, length in self.zeros or [])}

