"""How an import fails, by class: refusals (deterministic) and everything else (transient).

A :class:`~diskimport.contract.Refusal` says what was wrong with the request, the image
or the disk, with a stable ``code``; doing the same thing again fails the same way, so
it is never retried. Any other exception (a 5xx that outlived its backoff, a dropped SSH
session, a worker that did not boot) may pass on another attempt.

Codes, by where they arise (oslo.utils' safety check names pass through unchanged:
``backing_file``, ``data_file``, ``unknown_features``, ``descriptor``, ``footer``,
``mbr``, ``version``, ``passphrase``, ``inner_safety``):

- request: ``object-not-found``, ``object-changed``, ``invalid-ad-number``,
  ``invalid-vpus``, ``invalid-display-name``, ``invalid-backup-policy``,
  ``invalid-format``, ``invalid-virtual-size``, ``unknown-backup-policy``, ``invalid-setting``;
- image header: ``empty``, ``multiple-formats``, ``incomplete-header``,
  ``unsupported-format``, ``unreadable-header``, ``claimed-format-mismatch``,
  ``zero-virtual-size``, ``too-large``; a VHD's footer (:mod:`diskimport.inspection`):
  ``vhd-footer-checksum``, ``vhd-not-fixed``, ``vhd-differencing``, ``vhd-size-mismatch``,
  and ``nested-image`` for a fixed VHD whose data is itself an image; a compressed or
  packed upload (:mod:`diskimport.packed`): ``decompression-failed``,
  ``decompression-bomb``, ``virtual-size-unknown``, ``virtual-size-mismatch``,
  ``tar-not-one-image``;
- a machine (:mod:`diskimport.machine`: an OVA, an OVF, a machine manifest):
  ``ova-malformed``, ``ovf-invalid``, ``ovf-unsupported``, ``ova-missing-file``,
  ``ova-size-mismatch``, ``ova-manifest-invalid``, ``ova-digest-mismatch``,
  ``ova-capacity-mismatch``, ``machine-manifest-invalid``;
- on the worker VM: ``decompression-failed`` and ``decompression-bomb`` (the data runs
  past its size, or ends short), ``vmdk-stream-invalid`` (a streamOptimized VMDK whose
  grains or tables the streamer will not decode as they are), ``qemu-cannot-read``, ``qemu-disagrees``, ``qemu-check-failed``,
  ``nested-image``, ``filesystem-errors``, ``unchecked-filesystems``;
- a bootable machine (:mod:`diskimport.boot`): ``machine-did-not-boot`` (with
  ``boot_check: require``), ``no-target-machine`` (a bootable import without a
  TargetMachine block);
- an export (:mod:`diskimport.export`) or a copy to another region (:mod:`diskimport.regions`):
  ``invalid-source``, ``volume-not-found``, ``volume-not-available``, ``volume-attached``,
  ``invalid-export-format``, ``invalid-object-name``, ``object-exists``, ``vhd-too-large``,
  ``iscsi-export-unsupported``, ``export-convert-failed``, ``worker-disk-full``,
  ``export-inspection-mismatch``, ``invalid-destination-region``, ``invalid-availability-domain``.
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
