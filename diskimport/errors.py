"""How an import fails, by class: refusals (deterministic) and everything else (transient).

A :class:`~diskimport.contract.Refusal` says what was wrong with the request, the image
or the disk, with a stable ``code``; doing the same thing again fails the same way, so
it is never retried. Any other exception (a 5xx that outlived its backoff, a dropped SSH
session, a worker that did not boot) may pass on another attempt.

Every code, with the class that raises it, where it arises and what a user can do about it,
is listed once in :mod:`diskimport.refusals` (and, for users, ``docs/refusals.md``, written
from it); ``tests/test_refusal_codes.py`` fails on a code the product raises that is not
listed there.
"""

from __future__ import annotations

from .contract import InvalidRequest, Refusal

__all__ = ["BootFailed", "FilesystemErrors", "ImageRejected", "InvalidRequest", "OutOfCapacity", "Refusal", "ResourceFailed",
           "is_deterministic", "is_worker_lost"]


class ImageRejected(Refusal):
    """The image is not one the importer accepts."""


class FilesystemErrors(Refusal):
    """A read-only check found errors in a filesystem of the written disk (``filesystem-errors``),
    or could not check something on it while ``unchecked_filesystems`` is ``"fail"``
    (``unchecked-filesystems``)."""


class BootFailed(Refusal):
    """The started machine did not show its boot milestone on the console in time
    (``machine-did-not-boot``); the machine is stopped and its volumes are kept."""


class OutOfCapacity(Exception):
    """The availability domain has no capacity for the shape right now (try another one)."""


class ResourceFailed(Exception):
    """A resource reached a state it cannot come back from (e.g. FAULTY, TERMINATED)."""


def is_worker_lost(exc: BaseException) -> bool:
    """Whether the failure is the worker VM gone (its SSH refused, reset or cut off), which a
    new worker VM can get past; a refusal never is."""
    import paramiko  # the orchestrator's SSH library; the contract module stays without it

    seen: BaseException | None = exc
    for _ in range(8):  # the exception and what caused it
        if seen is None or isinstance(seen, Refusal):
            return False
        if isinstance(seen, (paramiko.SSHException, paramiko.ssh_exception.NoValidConnectionsError, EOFError,
                             ConnectionError)):
            return True
        if isinstance(seen, OSError) and str(seen) == "Socket is closed":  # paramiko's, on a dead transport
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_deterministic(exc: BaseException) -> bool:
    """Whether another attempt would fail the same way (a refusal), so it is not retried."""
    return isinstance(exc, Refusal)
