"""Durable state of the local OCI: JSON collections under the data directory.

Every mutation happens under one lock and is followed by :meth:`Store.save`, which
replaces the state file atomically, so a restart (or a crash between calls) never
loses an acknowledged change.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator


class Store:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "state.json"
        self.lock = threading.RLock()
        self._state: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._state = json.loads(self.path.read_text())

    def collection(self, name: str) -> dict[str, Any]:
        """The dict of one resource kind, keyed by id; created empty on first use."""
        with self.lock:
            return self._state.setdefault(name, {})

    def values(self, name: str) -> Iterator[dict[str, Any]]:
        with self.lock:
            return iter(list(self.collection(name).values()))

    def save(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump(self._state, f, separators=(",", ":"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
