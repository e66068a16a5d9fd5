"""A typed wrapper around ``qemu-img``: info, check, convert, compare, measure.

Every call pins the source format with ``-f``: qemu-img never guesses. Commands go out
as argument lists through a :class:`~diskimport.worker_vm.commands.CommandRunner`, so the same
code runs here or on a worker over SSH. ``info`` and ``check`` parse untrusted headers
and run under ``prlimit`` (address space and CPU time), as OpenStack does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .commands import CommandFailed, CommandResult, CommandRunner

# qemu-img's names for the formats this importer accepts.
FORMATS = ("qcow2", "vmdk", "vpc", "vhdx", "vdi", "raw")
CHECKABLE_FORMATS = ("qcow2", "vmdk", "vhdx", "vdi")
PROGRESS = re.compile(r"\(\s*([0-9]+(?:\.[0-9]+)?)/100%\)")


@dataclass(frozen=True)
class ResourceLimits:
    """Limits for qemu-img parsing untrusted headers (``prlimit --as``, ``--cpu``)."""

    address_space_bytes: int = 1024**3
    cpu_seconds: int = 30

    def prefix(self) -> list[str]:
        return ["prlimit", f"--as={self.address_space_bytes}", f"--cpu={self.cpu_seconds}", "--"]


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info --output=json`` says about an image."""

    format: str
    virtual_size: int
    actual_size: int | None
    backing_filename: str | None
    data_file: str | None
    format_specific: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "ImageInfo":
        specific = (doc.get("format-specific") or {}).get("data") or {}
        return cls(
            format=doc["format"],
            virtual_size=int(doc["virtual-size"]),
            actual_size=doc.get("actual-size"),
            backing_filename=doc.get("backing-filename") or doc.get("full-backing-filename"),
            data_file=specific.get("data-file"),
            format_specific=specific,
            raw=doc,
        )


@dataclass(frozen=True)
class CheckResult:
    """``qemu-img check``: ``ok`` unless it found corruption or errors."""

    ok: bool
    supported: bool
    corruptions: int
    leaks: int
    output: str


def _require_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def image_opts(**options: str) -> str:
    """A qemu ``--image-opts`` string; commas in values are doubled, as qemu's option syntax wants."""
    return ",".join(f"{key}={value.replace(',', ',,')}" for key, value in options.items())


class QemuImg:
    def __init__(self, runner: CommandRunner, binary: str = "qemu-img", limits: ResourceLimits | None = None) -> None:
        self.runner = runner
        self.binary = binary
        self.limits = limits or ResourceLimits()

    def _run(self, argv: Sequence[str], what: str, ok_codes: Sequence[int] = (0,), **kwargs: Any) -> CommandResult:
        result = self.runner.run(argv, **kwargs)
        if result.returncode not in ok_codes:
            raise CommandFailed(result, what)
        return result

    def version(self) -> str:
        return self._run([self.binary, "--version"], "qemu-img --version").stdout.splitlines()[0]

    def info(self, path: str, fmt: str) -> ImageInfo:
        argv = [*self.limits.prefix(), self.binary, "info", "-f", _require_format(fmt), "--output=json", path]
        result = self._run(argv, "qemu-img info")
        return ImageInfo.from_json(json.loads(result.stdout))

    def info_node(self, node: str) -> ImageInfo:
        """``qemu-img info`` of an ``--image-opts`` node (a window of an image, a driver's options)."""
        argv = [*self.limits.prefix(), self.binary, "info", "--output=json", "--image-opts", node]
        result = self._run(argv, "qemu-img info")
        return ImageInfo.from_json(json.loads(result.stdout))

    def check(self, path: str, fmt: str) -> CheckResult:
        """Exit codes: 0 clean, 2 corrupted, 3 leaked clusters only, 63 format cannot be checked."""
        argv = [*self.limits.prefix(), self.binary, "check", "-f", _require_format(fmt), "--output=json", path]
        result = self._run(argv, "qemu-img check", ok_codes=(0, 2, 3, 63))
        if result.returncode == 63:
            return CheckResult(True, False, 0, 0, result.stderr.strip())
        try:
            doc = json.loads(result.stdout)
        except ValueError:
            doc = {}
        corruptions = int(doc.get("corruptions", 0)) + int(doc.get("check-errors", 0))
        leaks = int(doc.get("leaks", 0))
        return CheckResult(result.returncode in (0, 3) and corruptions == 0, True, corruptions, leaks,
                           (result.stdout + result.stderr).strip())

    def convert(
        self,
        source: str,
        fmt: str,
        target: str,
        *,
        target_is_zero: bool = True,
        coroutines: int = 16,
        out_of_order: bool = True,
        on_progress: Callable[[float], None] | None = None,
        source_cache: str | None = None,
        target_cache: str | None = "none",
    ) -> None:
        """Write ``source`` as raw onto an existing ``target`` (a device or volume file).

        ``target_is_zero`` skips writing zero regions, right for a fresh volume. The target is
        written with O_DIRECT (cache mode ``none``) by default: the bytes go straight to the
        device instead of first filling the worker's page cache, which costs the worker CPU and
        memory it needs for the transfer.
        """
        options = ["-f", _require_format(fmt), "-O", "raw"]
        if source_cache:
            options += ["-T", source_cache]
        if target_cache:
            options += ["-t", target_cache]
        self._convert(options, source, target, target_is_zero, out_of_order, coroutines, on_progress)

    def convert_nodes(self, source: str, target: str, *, target_is_zero: bool = True, coroutines: int = 16,
                      on_progress: Callable[[float], None] | None = None) -> None:
        """Like :meth:`convert`, with source and target given as ``--image-opts`` strings (windows of
        images and devices). The target's options set its cache mode."""
        self._convert(["--image-opts", "--target-image-opts"], source, target, target_is_zero, True, coroutines,
                      on_progress)

    def _convert(self, options: list[str], source: str, target: str, target_is_zero: bool, out_of_order: bool,
                 coroutines: int, on_progress: Callable[[float], None] | None) -> None:
        argv = [self.binary, "convert", "-p", *options, "-n"]
        if target_is_zero:
            argv.append("--target-is-zero")
        if out_of_order:
            argv.append("-W")
        argv += ["-m", str(coroutines), source, target]

        def progress(line: str) -> None:
            if on_progress and (m := PROGRESS.search(line)):
                on_progress(float(m.group(1)))

        self._run(argv, "qemu-img convert", on_output=progress)

    def compare(self, image: str, fmt: str, device: str) -> tuple[bool, str]:
        """Whether ``device`` (raw) holds the guest-visible content of ``image``.

        Not strict: the device may be larger than the image as long as the rest reads as zeros.
        The device is read with O_DIRECT: what is on it, not what the page cache remembers.
        """
        argv = [self.binary, "compare", "--image-opts",
                image_opts(driver=_require_format(fmt), **{"file.filename": image}),
                image_opts(driver="raw", **{"file.filename": device, "cache.direct": "on"})]
        result = self._run(argv, "qemu-img compare", ok_codes=(0, 1))
        return result.returncode == 0, (result.stdout + result.stderr).strip()

    def measure(self, path: str, fmt: str) -> dict[str, int]:
        argv = [*self.limits.prefix(), self.binary, "measure", "-f", _require_format(fmt), "-O", "raw",
                "--output=json", path]
        return json.loads(self._run(argv, "qemu-img measure").stdout)
