"""The guest report: what a written boot disk holds, and whether it boots and answers in each launch mode.

:func:`inspect_guest` runs the worker's ``guest`` program (:mod:`diskimport.agent.guest`) on the
device the disk was written to, after its filesystem checks, in a mount namespace of its own
(its read-only mounts vanish with it), and reads back the guest's facts. :func:`report_from`
turns the facts into a :class:`GuestReport`: the facts people need to see, and a
:class:`LaunchVerdict` for each launch mode:

- ``PARAVIRTUALIZED`` (virtio disk and network, OCI's default): the default kernel's initramfs
  (or the kernel itself) must hold the virtio PCI transport and a virtio disk driver, or the
  kernel stops at "cannot find root device"; the root must be named so that it is found on
  another controller (UUID, label, LVM), not by a kernel name like ``/dev/sda2``;
- ``EMULATED`` (an IDE/SATA disk and an E1000 card, as OCI's emulated mode gives): the
  initramfs must hold ``ata_piix`` or ``ahci`` (or have them built in).

Reachable means the machine takes an address from the subnet's DHCP on the card it is given:
a static address, or an interface pinned to the old machine's name or MAC, keeps it off
the network, unless cloud-init writes the network anew at first boot.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from ..worker_vm.agent_archive import ARCHIVE_NAME, agent_archive
from ..worker_vm.commands import CommandFailed, CommandRunner
from . import windows
from .filesystems import FilesystemCheck

PARAVIRTUALIZED, EMULATED = "PARAVIRTUALIZED", "EMULATED"
VIRTIO_DISK = ("virtio_blk", "virtio_scsi")
EMULATED_DISK = ("ata_piix", "ahci")
GUEST_PROGRAM_SECONDS = 600


@dataclass(frozen=True)
class LaunchVerdict:
    mode: str
    boots: bool | None        # None: cannot be told (no Linux root found, say)
    reachable: bool | None
    reasons: list[str]

    def describe(self) -> str:
        def word(value: bool | None, yes: str, no: str) -> str:
            return "unknown" if value is None else yes if value else no
        return (f"{self.mode}: {word(self.boots, 'boots', 'does not boot')}, "
                f"{word(self.reachable, 'reachable', 'not reachable')}: " + "; ".join(self.reasons))


@dataclass
class Adaptation:
    """What the adaptation did to the guest (a part of the guest report and the summary)."""

    mode: str                                   # "auto" or "off"
    ran: bool = False
    ok: bool = True
    changes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    restored: bool | None = None
    seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        if not self.ran:
            return ("Guest adaptation: off (`adapt_guest: off`); the guest is launched as it was written.\n"
                    if self.mode == "off" else "Guest adaptation: not run (no Linux guest).\n")
        if not self.ok:
            return (f"Guest adaptation **failed**: {self.error}. "
                    f"{'Everything it changed was put back' if self.restored else 'Not all of its changes could be put back'}"
                    "; the volumes are kept as written.\n")
        if not self.changes:
            return "Guest adaptation: nothing to change.\n"
        lines = [f"Guest adaptation: {len(self.changes)} changes in {self.seconds} s "
                 "(originals kept in the guest under /var/lib/oci-disk-import/adaptation)", "",
                 "| file | change | why |", "|---|---|---|"]
        lines += [f"| `{c['path']}` | {c['action']} | {c['why']} |" for c in self.changes]
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"



@dataclass
class GuestReport:
    """What the boot disk holds, and what it means for a launch (a Prefect artifact and part of the summary)."""

    os_type: str | None                   # "linux", "windows", or None (not found: the reason in ``problems``)
    name: str | None = None               # "Debian GNU/Linux 12 (bookworm)"
    distribution: str | None = None
    version: str | None = None
    root: str | None = None               # where the root filesystem is on the disk: p2, p3:vg/root
    default_kernel: str | None = None
    kernels: list[dict[str, Any]] = field(default_factory=list)
    initramfs_tool: dict[str, Any] = field(default_factory=dict)
    bootloader: dict[str, Any] = field(default_factory=dict)
    fstab: list[dict[str, Any]] = field(default_factory=list)
    network: list[dict[str, Any]] = field(default_factory=list)
    cloud_init: dict[str, Any] = field(default_factory=dict)
    hypervisor_tools: list[dict[str, Any]] = field(default_factory=list)
    selinux: str | None = None
    windows: dict[str, Any] = field(default_factory=dict)  # a Windows guest's: version, drivers, static addresses
    placed: dict[str, str] = field(default_factory=dict)   # where the fstab's mounts are on the disk: /boot -> p1
    adaptation: Adaptation | None = None                   # what the guest adaptation changed
    problems: list[str] = field(default_factory=list)
    verdicts: list[LaunchVerdict] = field(default_factory=list)

    def verdict(self, mode: str) -> LaunchVerdict:
        return next(v for v in self.verdicts if v.mode == mode)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        """The report for people: the guest, then each launch mode's verdict, then the facts behind them."""
        lines = ["# Guest report", ""]
        if self.os_type is None:
            lines += ["No operating system was found on the boot disk: " + "; ".join(self.problems), ""]
        else:
            kernel = f"; default kernel {self.default_kernel or 'none found'}" if self.os_type == "linux" else ""
            lines += [f"**{self.name or self.distribution}** (on {self.root}{kernel})", ""]
        lines += ["| launch mode | boots | reachable | why |", "|---|---|---|---|"]
        for v in self.verdicts:
            lines.append(f"| {v.mode} | {_cell(v.boots)} | {_cell(v.reachable)} | {'; '.join(v.reasons)} |")
        if self.kernels:
            lines += ["", "| kernel | initramfs | drivers inside | built in |", "|---|---|---|---|"]
            for k in self.kernels:
                lines.append(f"| {k['version']} | {k.get('initramfs') or '-'}"
                             f"{' (' + k['initramfs_error'] + ')' if k.get('initramfs_error') else ''} | "
                             f"{', '.join(k.get('initramfs_drivers') or []) or '-'} | "
                             f"{', '.join(k.get('builtin') or []) or '-'} |")
        if self.fstab:
            lines += ["", "| fstab device | mount point | named by | on this disk |", "|---|---|---|---|"]
            lines += [f"| `{e['spec']}` | {e['mountpoint']} | {e['naming']} | {e.get('location') or 'not found'} |"
                      for e in self.fstab]
        if self.network:
            lines += ["", "| network config | interface | method | pinned to |", "|---|---|---|---|"]
            lines += [f"| {n['source']} | {n.get('interface') or '-'} | {n.get('method') or '-'} | "
                      f"{', '.join(n.get('pins') or []) or '-'} |" for n in self.network]
        if self.windows.get("services") is not None:
            lines += ["", "| Windows driver | starts |", "|---|---|"]
            lines += [f"| {n} | {START_NAMES.get(v, v)} |" for n, v in sorted(self.windows["services"].items())]
        facts = [f"initramfs built by {self.initramfs_tool.get('tool') or 'unknown'}"
                 + (f" ({self.initramfs_tool['setting']})" if self.initramfs_tool.get("setting") else ""),
                 f"consoles: {', '.join(self.bootloader.get('consoles') or []) or 'the kernel default (tty0)'}",
                 f"cloud-init: {'installed' if self.cloud_init.get('installed') else 'not installed'}",
                 f"SELinux: {self.selinux or 'not configured'}"]
        facts += [f"{t['name']} ({t['found']}), started at boot by {', '.join(t['enabled']) or 'nothing'}"
                  for t in self.hypervisor_tools]
        if self.os_type == "linux":
            lines += [""] + [f"- {fact}" for fact in facts]
        if self.os_type is not None:
            lines += [""] + [f"- problem: {p}" for p in self.problems]
        if self.adaptation is not None:
            lines += ["", self.adaptation.markdown()]
        return "\n".join(lines) + "\n"


START_NAMES = {0: "at boot", 1: "with the system", 2: "automatically", 3: "on demand", 4: "never (disabled)"}


def _cell(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "**no**"


def regions_of(checks: Sequence[FilesystemCheck]) -> list[dict[str, Any]]:
    """Every place the checks found (partitions, logical volumes), as the worker's ``guest`` program
    takes them: it mounts the filesystems it can read, and names the others in fstab's terms."""
    return [{"location": c.location, "offset": c.offset, "size": c.size, "filesystem": c.filesystem,
             "uuid": c.uuid, "label": c.label, "partuuid": c.partuuid} for c in checks]


@contextlib.contextmanager
def worker_directory(runner: Any, prefix: str) -> Iterator[str]:
    """A private directory on the worker holding the agent archive, removed afterwards."""
    made = runner.run(["mktemp", "-d", f"/tmp/{prefix}.XXXXXXXX"])
    if made.returncode != 0:
        raise CommandFailed(made, f"creating the directory {prefix} on the worker")
    directory = made.stdout.strip()
    try:
        runner.put_private_file(agent_archive(), f"{directory}/{ARCHIVE_NAME}")
        yield directory
    finally:
        runner.run(["rm", "-rf", "--one-file-system", directory])


def run_in_namespace(runner: Any, directory: str, program: str, config: dict[str, Any], timeout: float) -> Any:
    """Run the agent's ``program`` with ``config`` in a mount namespace of its own (its mounts
    vanish with it); the completed command."""
    config = {**config, "work": directory, "archive": f"{directory}/{ARCHIVE_NAME}"}
    runner.put_private_file(json.dumps(config), f"{directory}/{program}.json")
    return runner.run(["unshare", "--mount", "--propagation", "private", "python3", f"{directory}/{ARCHIVE_NAME}",
                       program, f"{directory}/{program}.json"], timeout=timeout)


def inspect_guest(runner: Any, device: str, checks: Sequence[FilesystemCheck]) -> GuestReport:
    """Run the worker's ``guest`` program on ``device`` (read-only) and report on what it found.
    ``runner`` runs commands on the worker and puts private files there (a worker session)."""
    with worker_directory(runner, "oci-guest") as directory:
        result = run_in_namespace(runner, directory, "guest", {"device": device, "regions": regions_of(checks)},
                                  GUEST_PROGRAM_SECONDS)
        if result.returncode != 0:
            raise CommandFailed(result, "the guest inspection")
        facts = json.loads(result.stdout)
        if (facts.get("os") or {}).get("type") == "windows":
            facts["windows"] = read_windows(runner, facts.get("hives") or {})
    return report_from(facts)


def read_windows(runner: CommandRunner, hives: dict[str, str]) -> dict[str, Any]:
    """The Windows facts of the hives the worker's ``guest`` program copied out (or the reason they
    cannot be read)."""
    try:
        system = runner.read_bytes(["cat", hives["SYSTEM"]])
        software = runner.read_bytes(["cat", hives["SOFTWARE"]]) if "SOFTWARE" in hives else None
        return windows.windows_facts(system, software)
    except (CommandFailed, KeyError, windows.HiveError) as exc:
        return {"error": f"the registry hives cannot be read: {exc}"}


def report_from(facts: dict[str, Any]) -> GuestReport:
    """The report on the facts the worker's ``guest`` program printed."""
    os_facts = facts.get("os") or {}
    problems = list(facts.get("problems") or [])
    if os_facts.get("type") == "windows":
        return windows_report(facts, problems)
    if os_facts.get("type") != "linux":
        problems.append(os_facts.get("reason") or "no operating system found")
        return GuestReport(None, problems=problems, verdicts=_cannot_tell(
            "no operating system (Linux or Windows) was found on the boot disk, so nothing can be told"))
    report = GuestReport(
        "linux", os_facts.get("name"), os_facts.get("distribution"), os_facts.get("version"), facts.get("root"),
        kernels=facts.get("kernels") or [], initramfs_tool=facts.get("initramfs_tool") or {},
        bootloader=facts.get("bootloader") or {}, fstab=facts.get("fstab") or [], network=facts.get("network") or [],
        cloud_init=facts.get("cloud_init") or {}, hypervisor_tools=facts.get("hypervisor_tools") or [],
        selinux=facts.get("selinux"), problems=problems, placed=facts.get("placed") or {})
    kernel = default_kernel(report)
    report.default_kernel = kernel["version"] if kernel else None
    report.verdicts = [verdict(report, kernel, PARAVIRTUALIZED), verdict(report, kernel, EMULATED)]
    return report


def windows_report(facts: dict[str, Any], problems: list[str]) -> GuestReport:
    """A Windows guest: virtio (``PARAVIRTUALIZED``) boots only with viostor or vioscsi started
    at boot, and reaches the network with netkvm; emulated needs an in-box IDE/AHCI driver
    started at boot, and has E1000's driver in-box. A static address keeps it off the subnet."""
    found = facts.get("windows") or {}
    version = found.get("version") or {}
    name = str(version.get("ProductName") or "Windows")
    if version.get("CurrentBuildNumber"):
        name += f" (build {version['CurrentBuildNumber']})"
    report = GuestReport("windows", name, "windows", version.get("CurrentBuildNumber"), facts.get("root"),
                         problems=problems, windows=found)
    if "error" in found:
        problems.append(found["error"])
        report.verdicts = _cannot_tell(found["error"])
        return report
    services = found.get("services") or {}
    static = [f"interface {s['interface']} has the static address {s['address']}"
              for s in found.get("static_interfaces") or []]
    pv_boots, pv_why = windows.boots_with(services, windows.VIRTIO_STORAGE)
    netkvm = "netkvm" in services and services["netkvm"] != windows.DISABLED
    pv_reasons = [pv_why, "netkvm (the virtio network driver) is installed" if netkvm else
                  "netkvm (the virtio network driver) is not installed: no network card"] + static
    em_boots, em_why = windows.boots_with(services, windows.EMULATED_STORAGE)
    em_reasons = [em_why, "the E1000 driver is in-box"] + static
    report.verdicts = [LaunchVerdict(PARAVIRTUALIZED, pv_boots, netkvm and not static, pv_reasons),
                       LaunchVerdict(EMULATED, em_boots, not static, em_reasons)]
    return report


def _cannot_tell(reason: str) -> list[LaunchVerdict]:
    return [LaunchVerdict(PARAVIRTUALIZED, None, None, [reason]), LaunchVerdict(EMULATED, None, None, [reason])]


def default_kernel(report: GuestReport) -> dict[str, Any] | None:
    """The kernel the bootloader starts first (its first entry), else the newest installed."""
    by_version = {k["version"]: k for k in report.kernels}
    for entry in report.bootloader.get("entries") or []:
        image = str(entry.get("kernel", "")).rsplit("/", 1)[-1]
        if image.startswith("vmlinuz-") and image[len("vmlinuz-"):] in by_version:
            return by_version[image[len("vmlinuz-"):]]
    return report.kernels[-1] if report.kernels else None


def verdict(report: GuestReport, kernel: dict[str, Any] | None, mode: str) -> LaunchVerdict:
    reasons: list[str] = []
    boots: bool | None = True
    if kernel is None:
        boots = None
        reasons.append("no kernel found in /boot")
    else:
        have = set(kernel.get("initramfs_drivers") or []) | set(kernel.get("builtin") or [])
        needs = VIRTIO_DISK if mode == PARAVIRTUALIZED else EMULATED_DISK
        transport_ok = mode != PARAVIRTUALIZED or "virtio_pci" in have
        if kernel.get("initramfs_error") and not set(needs) & set(kernel.get("builtin") or []):
            boots = None
            reasons.append(f"kernel {kernel['version']}'s initramfs {kernel['initramfs_error']}")
        elif set(needs) & have and transport_ok:
            reasons.append(f"kernel {kernel['version']} has {', '.join(sorted(set(needs) & have))}")
        else:
            boots = False
            missing = [d for d in ("virtio_pci",) if not transport_ok] + ([] if set(needs) & have else
                                                                          [" or ".join(needs)])
            held = ", ".join(kernel.get("initramfs_drivers") or []) or "none of the known disk drivers"
            reasons.append(f"kernel {kernel['version']}'s initramfs lacks {' and '.join(missing)} "
                           f"(it holds {held}): the root device cannot be found")
    for root in report.bootloader.get("root") or []:
        if root["naming"] == "device" and mode == PARAVIRTUALIZED:
            boots = False
            reasons.append(f"the root is named root={root['spec']}, a device name a virtio disk does not keep")
        elif root["naming"] == "device":
            reasons.append(f"the root is named root={root['spec']}, which the first emulated disk keeps")
    reachable = reachability(report, mode, kernel)
    return LaunchVerdict(mode, boots, reachable[0], reasons + reachable[1])


def reachability(report: GuestReport, mode: str, kernel: dict[str, Any] | None) -> tuple[bool | None, list[str]]:
    driver = "virtio_net" if mode == PARAVIRTUALIZED else "e1000"
    if kernel is not None and driver not in set(kernel.get("installed") or []) | set(kernel.get("builtin") or []):
        return False, [f"kernel {kernel['version']} has no {driver} driver for the network card"]
    if report.cloud_init.get("installed") and not report.cloud_init.get("disabled"):
        return True, ["cloud-init configures the network at first boot"]
    configured = [n for n in report.network if n.get("method")]
    static = [n for n in configured if n["method"] in ("static", "manual", "none")]
    pinned = [n for n in configured if n.get("pins")]
    reasons = [f"{n['source']} gives {n.get('interface') or 'an interface'} a static address" for n in static]
    first_is_eth0 = classic_names(report)
    reasons += [f"{n['source']} binds its configuration to {', '.join(n['pins'])}" for n in pinned
                if any(p.startswith("mac ") for p in n["pins"]) or not _generic_name(n, first_is_eth0)]
    if reasons:
        return False, reasons
    if not configured:
        return None, ["no network configuration found"]
    return True, ["the network is configured by DHCP, not bound to a name or address of the old machine"]


def _generic_name(entry: dict[str, Any], first_is_eth0: bool = False) -> bool:
    """An interface pinned by a pattern (``en*``, ``eth*`` with a wildcard) follows any card; so
    does ``eth0`` where the kernel names cards the classic way (``net.ifnames=0``)."""
    return all("*" in p or "?" in p or (first_is_eth0 and p == "name eth0")
               for p in entry.get("pins") or [] if p.startswith("name "))


def classic_names(report: GuestReport) -> bool:
    """Whether the kernel command lines turn predictable interface names off (``net.ifnames=0``):
    the first card is then ``eth0`` on any machine."""
    lines = [e.get("cmdline", "") for e in report.bootloader.get("entries") or []]
    return bool(lines) and all("net.ifnames=0" in line.split() for line in lines)
