"""Running commands as argument lists, locally or on a worker, never through a shell string
built from untrusted text."""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

LineCallback = Callable[[str], None]


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(Exception):
    """A command exited non-zero; the message carries what it printed on stderr."""

    def __init__(self, result: CommandResult, what: str | None = None) -> None:
        self.result = result
        detail = (result.stderr or result.stdout).strip()[-4000:]
        super().__init__(f"{what or result.argv[0]} failed (exit {result.returncode}): {detail}")


class CommandRunner(Protocol):
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        on_output: LineCallback | None = None,
    ) -> CommandResult:
        """Run ``argv``; ``on_output`` receives stdout piece by piece (split on CR and LF)."""

    def read_bytes(self, argv: Sequence[str], *, timeout: float | None = None) -> bytes:
        """Run ``argv`` and return its standard output as bytes; raise :class:`CommandFailed` on failure."""


def read_range(runner: CommandRunner, device: str, start: int, length: int) -> bytes:
    """``length`` bytes of ``device`` from byte ``start`` (fewer where the device ends), read with dd."""
    return runner.read_bytes(["dd", f"if={device}", "iflag=skip_bytes,count_bytes", f"skip={start}",
                              f"count={length}", "bs=65536", "status=none"])


class LineSplitter:
    """Feeds text written in arbitrary pieces to a callback one line (CR or LF ended) at a time."""

    def __init__(self, callback: LineCallback) -> None:
        self.callback = callback
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = re.split(r"[\r\n]", self.pending)
        for line in lines:
            if line.strip():
                self.callback(line)
        return len(text)

    def flush(self) -> None:
        pass


class LocalRunner:
    """Runs commands on this machine with ``subprocess`` (no shell)."""

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        on_output: LineCallback | None = None,
    ) -> CommandResult:
        argv = tuple(argv)
        if on_output is None:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            return CommandResult(argv, done.returncode, done.stdout, done.stderr)
        splitter = LineSplitter(on_output)
        out: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        with tempfile.TemporaryFile() as errors, \
                subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors) as proc:
            assert proc.stdout is not None
            # os.read returns what is there: a progress line reaches the callback when printed.
            while data := os.read(proc.stdout.fileno(), 65536):
                chunk = decoder.decode(data)
                out.append(chunk)
                splitter.write(chunk)
            returncode = proc.wait(timeout=timeout)
            errors.seek(0)
            stderr = errors.read().decode("utf-8", "replace")
        return CommandResult(argv, returncode, "".join(out), stderr)

    def read_bytes(self, argv: Sequence[str], *, timeout: float | None = None) -> bytes:
        argv = tuple(argv)
        done = subprocess.run(argv, capture_output=True, timeout=timeout)
        if done.returncode != 0:
            raise CommandFailed(CommandResult(argv, done.returncode, "", done.stderr.decode("utf-8", "replace")))
        return done.stdout

    def put_private_file(self, content: str | bytes, path: str) -> None:
        self.write_private_ranges(path, [(0, content.encode() if isinstance(content, str) else content)])

    def write_private_ranges(self, path: str, pieces: Sequence[tuple[int, bytes]]) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
