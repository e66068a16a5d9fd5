"""Fault injection: make the next N calls of an operation fail with a chosen error.

A fault names an OCI operation (``LaunchInstance``, ``CreateVolume``, ``GetObject``...)
and, optionally, ``match``: values that the request's path parameters, query
parameters or JSON body must hold for the fault to apply, e.g.
``{"availabilityDomain": "local:AD-1"}`` to fail launches in one domain only.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ServiceError


@dataclass
class Fault:
    operation: str
    status: int
    code: str
    message: str
    count: int = 1
    match: dict[str, Any] = field(default_factory=dict)
    # Instead of an error reply: send the reply's headers and this many body bytes, then hang up
    # (a connection lost mid-transfer). Applies to object reads.
    cut_after_bytes: int | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def applies(self, fields: dict[str, Any]) -> bool:
        return all(k in fields and str(fields[k]) == str(v) for k, v in self.match.items())


class FaultInjector:
    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, spec: dict[str, Any]) -> Fault:
        try:
            fault = Fault(
                operation=str(spec["operation"]),
                status=int(spec.get("status", 500)),
                code=str(spec.get("code", "InternalError")),
                message=str(spec.get("message", "Injected fault.")),
                count=int(spec.get("count", 1)),
                match=dict(spec.get("match") or {}),
                cut_after_bytes=None if spec.get("cutAfterBytes") is None else int(spec["cutAfterBytes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(400, "InvalidParameter", f"bad fault specification: {exc!r}") from None
        if not isinstance(spec.get("operation"), str) or not spec["operation"]:
            raise ServiceError(400, "InvalidParameter", "fault operation must name an operation, e.g. 'LaunchInstance'")
        if not isinstance(spec.get("match") or {}, dict):
            raise ServiceError(400, "InvalidParameter", "fault match must be an object of field values")
        if not 400 <= fault.status <= 599:
            raise ServiceError(400, "InvalidParameter", "fault status must be an HTTP error status, 400 to 599")
        if fault.cut_after_bytes is not None and fault.cut_after_bytes < 0:
            raise ServiceError(400, "InvalidParameter", "fault cutAfterBytes must be a number of bytes, at least 0")
        if fault.count < 1:
            raise ServiceError(400, "InvalidParameter", "fault count must be at least 1")
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

    def check(self, operation: str, fields: dict[str, Any]) -> int | None:
        """Raise the first armed fault for this call, consuming one of its count.

        A fault that cuts the body short is returned (its byte count) instead of raised.
        """
        with self._lock:
            for fault in self._faults:
                if fault.operation == operation and fault.applies(fields):
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    if fault.cut_after_bytes is not None:
                        return fault.cut_after_bytes
                    raise ServiceError(fault.status, fault.code, fault.message)
        return None
