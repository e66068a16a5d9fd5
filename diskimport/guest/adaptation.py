"""Guest adaptation: a Linux boot disk changed on the worker so it boots on OCI's paravirtualized
devices and answers on its network (``adapt_guest``: ``auto``, the default, or ``off``).

:func:`adapt_guest` runs the worker's ``adapt`` program (:mod:`diskimport.agent.adapt`) on the
device, after the guest report, in a mount namespace of its own. It adds the virtio drivers to
every initramfs with the guest's own tool, names the root and fstab's devices by UUID, adds a
serial console, sets the first network card to DHCP, disables hypervisor tools and schedules
an SELinux relabel, keeping every original inside the guest
(``/var/lib/oci-disk-import/adaptation``). If anything fails, what it changed is put back and
:class:`AdaptationFailed` (``guest-adaptation-failed``) fails the run; the volumes are kept.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import Refusal
from ..worker_vm.commands import CommandFailed
from .report import Adaptation, GuestReport, regions_of, run_in_namespace, worker_directory
from .filesystems import FilesystemCheck

ADAPT_PROGRAM_SECONDS = 1800


class AdaptationFailed(Refusal):
    """The adaptation could not finish; what it changed was put back (or it says it was not).
    ``adaptation`` and ``report`` say what happened and what the guest is."""

    adaptation: Adaptation
    report: GuestReport


def failed(adaptation: Adaptation, report: GuestReport) -> AdaptationFailed:
    restored = ("everything it changed was put back" if adaptation.restored
                else "NOT everything it changed could be put back")
    error = AdaptationFailed("guest-adaptation-failed", f"the guest adaptation failed: {adaptation.error}; "
                             f"{restored}; the volumes are kept as written for inspection (adapt_guest off "
                             "imports without adapting)")
    error.adaptation, error.report = adaptation, report
    report.adaptation = adaptation
    return error


def adapt_guest(runner: Any, device: str, checks: list[FilesystemCheck], report: GuestReport) -> Adaptation:
    """Run the worker's ``adapt`` program on ``device`` for the guest ``report`` found; raises
    :class:`AdaptationFailed` when it fails."""
    with worker_directory(runner, "oci-adapt") as directory:
        config = {"device": device, "regions": regions_of(checks), "root": report.root, "placed": report.placed}
        result = run_in_namespace(runner, directory, "adapt", config, ADAPT_PROGRAM_SECONDS)
    try:
        outcome = json.loads(result.stdout)
    except ValueError:
        raise CommandFailed(result, "the guest adaptation") from None
    adaptation = Adaptation("auto", ran=True, ok=bool(outcome.get("ok")), changes=outcome.get("changes") or [],
                            notes=outcome.get("notes") or [], error=outcome.get("error"),
                            restored=outcome.get("restored"), seconds=outcome.get("seconds"))
    if not adaptation.ok:
        raise failed(adaptation, report)
    return adaptation
