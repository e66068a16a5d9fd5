"""Running commands as argument lists, locally or on a worker, never through a shell string
built from untrusted text."""

from __future__ import annotations

import re
import subprocess
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
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            while chunk := proc.stdout.read(256):
                out.append(chunk)
                splitter.write(chunk)
            stderr = proc.stderr.read()
            returncode = proc.wait(timeout=timeout)
        return CommandResult(argv, returncode, "".join(out), stderr)
