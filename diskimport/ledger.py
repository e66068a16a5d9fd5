"""The ledger of undos: what an import created, and how to take each one back.

A step registers the undo of a resource the moment the create call returns, before it
waits for the resource to become usable, so a wait that fails, a later step that fails,
or a run that is stopped leaves nothing behind. When the import succeeds, the resources
it hands over (the volume) are *released* from the ledger and the temporary ones (the
worker VM, the attachment) are taken back in order as steps of their own. On failure
the ledger *unwinds*: every undo still registered runs, newest first, and one failing
undo does not keep the others from running.

The undos are the functions of :mod:`diskimport.cloud` that the crash hook and the
sweeper also use, so there is one way to remove each kind of resource.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Undo:
    """One registered undo: what it takes back (``kind`` and ``resource_id``) and how."""

    kind: str
    resource_id: str
    action: Callable[[], object]
    done: bool = field(default=False)

    def __str__(self) -> str:
        return f"{self.kind} {self.resource_id}"


class Ledger:
    """Undos of one import, safe to use from the threads of concurrent steps."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
        self._undos: list[Undo] = []
        self._lock = threading.Lock()
        self.log = logger or log

    def register(self, kind: str, resource_id: str, action: Callable[[], object]) -> Undo:
        """Register how to take back a resource just made (once: a retried create that returned
        the same resource keeps its first registration)."""
        with self._lock:
            known = next((u for u in self._undos if u.kind == kind and u.resource_id == resource_id), None)
            if known is not None:
                return known
            undo = Undo(kind, resource_id, action)
            self._undos.append(undo)
        return undo

    def find(self, kind: str, resource_id: str) -> Undo | None:
        """The registered undo of one resource, if it is still registered."""
        with self._lock:
            return next((u for u in self._undos if u.kind == kind and u.resource_id == resource_id), None)

    def release(self, undo: Undo | None) -> None:
        """The resource is no longer this ledger's to remove (handed over, or gone)."""
        with self._lock:
            if undo is not None and undo in self._undos:
                self._undos.remove(undo)

    def undo(self, undo: Undo) -> object:
        """Take one resource back now (a step that removes what it made, or a failed wait)."""
        result = undo.action()
        undo.done = True
        self.release(undo)
        return result

    def pending(self) -> list[Undo]:
        with self._lock:
            return list(self._undos)

    def unwind(self) -> list[BaseException]:
        """Run every registered undo, newest first; return the errors (each is also logged)."""
        errors: list[BaseException] = []
        while True:
            with self._lock:
                if not self._undos:
                    return errors
                undo = self._undos.pop()
            try:
                result = undo.action()
                undo.done = True
                self.log.info("undid %s%s", undo, f": {result}" if isinstance(result, str) else "")
            except Exception as exc:  # keep unwinding: the sweeper catches what is left, by its tags
                self.log.error("could not undo %s: %s", undo, exc)
                errors.append(exc)
