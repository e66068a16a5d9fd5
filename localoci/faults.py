"""Fault injection: make the next N calls of an operation fail with a chosen error.

A fault names an OCI operation (``LaunchInstance``, ``CreateVolume``, ``GetObject``...)
and, optionally, ``match``: values that the request's path parameters, query
parameters or JSON body must hold for the fault to apply, e.g.
``{"availabilityDomain": "local:AD-1"}`` to fail launches in one domain only, or
``{"region": "local-2"}`` to fail calls made to one region's listener only.

A fault strikes ``before`` the operation (it fails and nothing happens) or ``after``
it (it took effect, but the client gets the error instead of the reply: the case a
retry token exists for). It strikes with an error reply, or with ``drop`` by hanging
up without any reply. Two faults touch no reply: ``cutAfterBytes`` cuts an object
read short, and ``failResource`` lets a create succeed but its resource fail to
provision (a volume, boot volume or backup, a copied one too, ends FAULTY; an instance TERMINATED).

A fault strikes each matching call (``probability`` 1), or a random share of them; it is
spent after ``count`` strikes, or once ``seconds`` have passed since it was added.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ServiceError, invalid_parameter

BEFORE, AFTER = "before", "after"
# The creates whose resource a failResource fault makes fail, instead of becoming AVAILABLE or RUNNING.
FAIL_RESOURCE_OPERATIONS = ("CreateVolume", "LaunchInstance", "CreateBootVolume", "CreateVolumeBackup",
                            "CopyVolumeBackup", "CreateBootVolumeBackup", "CopyBootVolumeBackup",
                            "CreateVolumeGroupBackup", "CopyVolumeGroupBackup")


class ConnectionDropped(ConnectionError):
    """The server hangs up without a reply; the client sees a connection error."""


@dataclass
class Fault:
    operation: str
    status: int
    code: str
    message: str
    count: int = 1
    match: dict[str, Any] = field(default_factory=dict)
    phase: str = BEFORE
    drop: bool = False
    # Instead of an error reply: send the reply's headers and this many body bytes, then hang up
    # (a connection lost mid-transfer). Applies to object reads.
    cut_after_bytes: int | None = None
    fail_resource: bool = False
    probability: float = 1.0
    seconds: float | None = None  # how long the fault is armed (None: until spent)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    added: float = field(default_factory=time.monotonic)

    def expired(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.added > self.seconds

    def applies(self, fields: dict[str, Any]) -> bool:
        return all(k in fields and str(fields[k]) == str(v) for k, v in self.match.items())

    def strike(self, phase: str) -> None:
        """Fail the call, if this fault fails it at ``phase``."""
        if phase != self.phase or self.cut_after_bytes is not None or self.fail_resource:
            return
        if self.drop:
            raise ConnectionDropped(f"fault injected: {self.operation} hung up {phase} the operation")
        raise ServiceError(self.status, self.code, self.message)


def _flag(spec: dict[str, Any], key: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise invalid_parameter(f"fault {key} must be true or false")
    return value


def _check(fault: Fault, spec: dict[str, Any]) -> None:
    if not 0.0 < fault.probability <= 1.0:
        raise invalid_parameter("fault probability must be above 0 and at most 1")
    if fault.seconds is not None and fault.seconds <= 0:
        raise invalid_parameter("fault seconds must be above 0")
    if not 400 <= fault.status <= 599:
        raise invalid_parameter("fault status must be an HTTP error status, 400 to 599")
    if fault.count < 1:
        raise invalid_parameter("fault count must be at least 1")
    if fault.phase not in (BEFORE, AFTER):
        raise invalid_parameter(f"fault phase must be '{BEFORE}' (nothing happens) or '{AFTER}' (the operation takes effect)")
    if fault.cut_after_bytes is not None:
        if fault.cut_after_bytes < 0:
            raise invalid_parameter("fault cutAfterBytes must be a number of bytes, at least 0")
        if "phase" in spec or fault.drop:
            raise invalid_parameter("fault cutAfterBytes cuts an object read short; it takes no phase or drop")
    if fault.fail_resource:
        if fault.operation not in FAIL_RESOURCE_OPERATIONS:
            raise invalid_parameter(f"fault failResource applies to {', '.join(FAIL_RESOURCE_OPERATIONS)} only")
        if "phase" in spec or fault.drop or fault.cut_after_bytes is not None:
            raise invalid_parameter("fault failResource lets the call succeed; it takes no phase, drop or cutAfterBytes")


class FaultInjector:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, spec: dict[str, Any]) -> Fault:
        if not isinstance(spec.get("operation"), str) or not spec["operation"]:
            raise invalid_parameter("fault operation must name an operation, e.g. 'LaunchInstance'")
        if not isinstance(spec.get("match") or {}, dict):
            raise invalid_parameter("fault match must be an object of field values")
        try:
            fault = Fault(
                operation=spec["operation"],
                status=int(spec.get("status", 500)),
                code=str(spec.get("code", "InternalError")),
                message=str(spec.get("message", "Injected fault.")),
                count=int(spec.get("count", 1)),
                match=dict(spec.get("match") or {}),
                phase=spec.get("phase", BEFORE),
                drop=_flag(spec, "drop"),
                cut_after_bytes=None if spec.get("cutAfterBytes") is None else int(spec["cutAfterBytes"]),
                fail_resource=_flag(spec, "failResource"),
                probability=float(spec.get("probability", 1.0)),
                seconds=None if spec.get("seconds") is None else float(spec["seconds"]),
            )
        except (TypeError, ValueError) as exc:
            raise invalid_parameter(f"bad fault specification: {exc!r}") from None
        _check(fault, spec)
        with self._lock:
            self._faults.append(fault)
        return fault

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [asdict(f) for f in self._faults]

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def wanted(self, operation: str) -> bool:
        with self._lock:
            return any(f.operation == operation for f in self._faults)

    def take(self, operation: str, fields: dict[str, Any]) -> Fault | None:
        """The first armed fault for this call, with one of its count consumed."""
        with self._lock:
            self._faults = [f for f in self._faults if not f.expired()]
            for fault in self._faults:
                if fault.operation == operation and fault.applies(fields):
                    if fault.probability < 1.0 and random.random() >= fault.probability:
                        return None
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None
