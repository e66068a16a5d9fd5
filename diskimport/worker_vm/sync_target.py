"""The attached volume as a write target that writes only what differs (:mod:`diskimport.agent.sync`).

A sync writes a new version of a disk onto the volume holding an earlier one: qemu-img
converts each slice onto :attr:`SyncTarget.socket` instead of the device, and the agent there
compares every write with the device and writes only the pages that differ. :meth:`stop`
returns its account: bytes compared, written, zeroed and left unchanged.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from .commands import CommandFailed, CommandResult, CommandRunner
from .transfer import WorkerFiles


class SyncFailed(Exception):
    """The sync target could not start, or did not report what it wrote."""


class SyncTarget:
    """``python3 agent.pyz sync`` on the worker, serving ``device`` on a socket in ``directory``."""

    def __init__(self, runner: CommandRunner, files: WorkerFiles, script: str, directory: str, device: str) -> None:
        self.runner, self.files, self.script = runner, files, script
        self.device = device
        self.socket = f"{directory}/sync.sock"
        self.stop_file = f"{directory}/sync-stop"
        self.config = f"{directory}/sync.json"
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._result: CommandResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sync-target", daemon=True)

    def _line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if isinstance(event, dict):
            self.events.append(event)
            if event.get("event") in ("ready", "failed"):
                self._ready.set()

    def _run(self) -> None:
        try:
            self._result = self.runner.run(["python3", self.script, "sync", self.config], timeout=24 * 3600,
                                           on_output=self._line)
        except BaseException as exc:  # surfaced by start / stop
            self._error = exc
        finally:
            self._ready.set()

    def start(self, timeout: float = 60.0) -> SyncTarget:
        self.files.put_private_file(json.dumps({"device": self.device, "socket": self.socket,
                                                "stop_file": self.stop_file}), self.config)
        self._thread.start()
        self._ready.wait(timeout)
        if not any(e.get("event") == "ready" for e in self.events):
            raise self._failure(f"the sync target on {self.device} did not start")
        return self

    def _failure(self, what: str) -> SyncFailed:
        failed = next((e for e in reversed(self.events) if e.get("event") == "failed"), None)
        if failed is not None:
            return SyncFailed(f"{what}: {failed.get('error')}")
        if self._error is not None:
            return SyncFailed(f"{what}: {self._error}")
        if self._result is not None and self._result.returncode != 0:
            return SyncFailed(f"{what}: {CommandFailed(self._result, 'the sync target')}")
        return SyncFailed(what)

    def stop(self, timeout: float = 600.0) -> dict[str, int]:
        """Stop serving (every write is on the device) and return the account of what was written."""
        self.runner.run(["sh", "-c", 'echo stop > "$1"', "sh", self.stop_file])
        self._thread.join(timeout)
        synced = next((e for e in reversed(self.events) if e.get("event") == "synced"), None)
        if self._thread.is_alive() or synced is None:
            raise self._failure(f"the sync target on {self.device} did not report what it wrote")
        return {k: int(v) for k, v in synced.items() if k != "event"}
