"""What people see of a run in the Prefect UI: a progress bar while an image is written (an
import's) or uploaded (an export's), and a summary of what the run made, with the time each
step took; a refused run's code and reason."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact

from diskimport.contract import Refusal
from diskimport.guest.report import GuestReport
from diskimport.summaries import BootReport, CopySummary, DiskImportSummary, ExportSummary, MachineImportSummary


class TransferProgress:
    """One progress artifact for the write: the lesser of bytes arrived and bytes written."""

    def __init__(self, name: str, size: int) -> None:
        self.logger = get_run_logger()  # events arrive on the transfer's thread, outside the run context
        self.size = max(size, 1)
        self.fetched = 0
        self.percent_written = 0.0
        self.shown = 0.0
        self.artifact = create_progress_artifact(0.0, description=f"Transferring {name} and writing it onto "
                                                                  "the volume")

    def _update(self, force: bool = False) -> None:
        percent = round(min(100.0 * self.fetched / self.size, self.percent_written), 1)
        if force or percent - self.shown >= 5:
            self.shown = percent
            try:
                update_progress_artifact(self.artifact, percent)
            except Exception as exc:  # progress reporting must never break the transfer
                self.logger.debug("progress not reported: %s", exc)

    def event(self, event: dict[str, Any]) -> None:
        if event.get("event") in ("progress", "fetched"):
            self.fetched = int(event.get("fetched", 0))
            if "decoded" in event:  # the streamer writes the disk itself as it decodes it
                self.percent_written = 100.0 * int(event["decoded"]) / max(1, int(event.get("size", 1)))
            self._update()
        elif event.get("event") == "retry":
            self.logger.warning("retrying bytes %s-%s of the object: %s", event.get("start"), event.get("end"),
                                event.get("error"))

    def written(self, percent: float) -> None:
        self.percent_written = percent
        self._update()

    def done(self) -> None:
        self.fetched, self.percent_written = self.size, 100.0
        self._update(force=True)


class UploadProgress:
    """A progress artifact per exported disk: the share of its image uploaded."""

    def __init__(self, name: str) -> None:
        self.logger = get_run_logger()  # events arrive on the upload's thread, outside the run context
        self.name, self.total, self.shown = name, 0, 0.0
        self.artifact = create_progress_artifact(0.0, description=f"Uploading {name}")

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "ready":
            self.total = int(event.get("size") or 0)
        elif kind == "part" and self.total:
            percent = round(100.0 * int(event.get("uploaded", 0)) / self.total, 1)
            if percent - self.shown >= 5:
                self._show(percent)
        elif kind == "final":
            self.total = int(event.get("size") or 0)
            self.logger.info("%s is final: %s bytes in %s parts; %s part(s) qemu-img changed after they were sent "
                             "went again", self.name, event.get("size"), event.get("parts"), event.get("resent"))
        elif kind == "retry":
            self.logger.warning("retrying part %s of %s: %s", event.get("part"), self.name, event.get("error"))

    def _show(self, percent: float) -> None:
        self.shown = percent
        try:
            update_progress_artifact(self.artifact, percent)
        except Exception as exc:  # progress reporting must never break the export
            self.logger.debug("progress not reported: %s", exc)

    def done(self) -> None:
        self._show(100.0)


def publish_summary(summary: DiskImportSummary) -> None:
    rows = [{"step": step, "seconds": seconds} for step, seconds in summary.steps.items()]
    create_table_artifact(rows, key="import-steps", description=f"Time per step of {summary.object}")
    lines = [
        f"# Imported `{summary.object}`",
        "",
        "| | |", "|---|---|",
        f"| object | `{summary.namespace}/{summary.bucket}/{summary.object}` @ `{summary.etag}` |",
        f"| format | {summary.format} |",
        f"| virtual size | {summary.virtual_size:,} bytes |",
        f"| volume | `{summary.volume_id}` ({summary.volume_size_gb} GB, {summary.availability_domain}, "
        f"{summary.vpus_per_gb} VPUs/GB) |",
        f"| bytes written | {summary.bytes_written:,} |",
        *_sync_rows(summary),
        f"| total time | {sum(summary.steps.values()):.1f} s |",
        "",
        "## Filesystems",
        "",
        "| location | type | label | size | result | detail |", "|---|---|---|---|---|---|",
        *[f"| `{c.location}` | {c.filesystem or '-'} | {cell(c.label or '')} | {size_text(c.size)} | "
          f"{c.status} | {cell(' / '.join(c.detail.splitlines()[-2:]))} |" for c in summary.filesystems],
    ]
    create_markdown_artifact("\n".join(lines), key="import-summary", description="Import summary")


def _sync_rows(summary: DiskImportSummary) -> list[str]:
    """A sync's rows: the version it updated the volume from, and what it wrote of what it compared."""
    if summary.synced_from is None:
        return []
    account = summary.synced or {}
    return [f"| synced from | `{summary.synced_from}` (the version the volume held) |",
            f"| sync | {size_text(account.get('written', 0))} written and {size_text(account.get('zeroed', 0))} "
            f"zeroed of {size_text(account.get('compared', 0))} compared; "
            f"{size_text(account.get('unchanged', 0))} unchanged |"] + ([
            f"| delta upload | {size_text(account['delta_bytes'])} uploaded for a {size_text(account.get('compared', 0))} "
            f"disk ({size_text(max(0, account.get('compared', 0) - account['delta_bytes']))} not sent) |"]
        if account.get("delta_bytes") is not None else [])


def cell(text: str, limit: int = 200) -> str:
    """Text that stays in one markdown table cell."""
    text = text.replace("|", "\\|").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def size_text(size: int) -> str:
    """A byte count as people read it (``1.5 GiB``)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{size} B"


@contextlib.contextmanager
def refusal_reported(object_name: str) -> Iterator[None]:
    """A refused import's summary: its code and reason, beside the run's failed state."""
    try:
        yield
    except Refusal as exc:
        create_markdown_artifact(f"# Refused `{object_name}`\n\ncode: `{exc.code}`\n\n{exc.message}\n",
                                 key="import-refused", description=f"Import refused: {exc.code}")
        raise


def publish_machine_summary(summary: MachineImportSummary) -> None:
    """The machine, and each disk in boot order with its volume, as the run's artifacts."""
    described = summary.machine
    rows = [{"disk": d.position + 1, "name": d.name, "file": d.file, "format": d.format,
             "virtual size": d.virtual_size, "volume": d.volume_id, "digest checked": d.digest_checked,
             "reused": d.reused, "seconds": d.seconds,
             "filesystems": ", ".join(f"{c.location} {c.filesystem} {c.status}" for c in d.filesystems)}
            for d in summary.disks]
    create_table_artifact(rows, key="machine-disks", description=f"Disks of {described['name']}")
    hints = ", ".join(f"{k} {described[k]}" for k in ("firmware", "cpus", "memory_mb", "os", "shape")
                      if described.get(k))
    create_markdown_artifact("\n".join([
        f"# Imported machine `{described['name']}`", "",
        f"From `{summary.namespace}/{summary.bucket}/{summary.object}` ({described['source']}), "
        f"{len(summary.disks)} disks in volume group `{summary.volume_group_id}`"
        + (f"; hints: {hints}" if hints else "") + ".", "",
        "Steps: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in summary.steps.items())
        + " (the disks' own steps are in `machine-disks`).", *_boot_lines(summary.boot)]), key="machine-summary")


def publish_guest_report(report: GuestReport | None) -> None:
    """The guest report (what the boot disk holds, whether it boots and answers in each launch mode)
    as the run's artifact."""
    if report is not None:
        create_markdown_artifact(report.markdown(), key="guest-report",
                                 description="Guest report: " + "; ".join(v.describe() for v in report.verdicts))


def _boot_lines(started: BootReport | None) -> list[str]:
    """The bootable import's part of the machine summary: firmware, launch mode, instance, boot check."""
    if started is None:
        return []
    lines = ["", f"Boot volume `{started.boot_volume_id}`, firmware **{started.firmware}** "
             f"({started.firmware_source}: {started.firmware_reason})."]
    if started.boot_volume_type:
        lines.append(f"Launch: {started.boot_volume_type} boot volume, {started.network_type} network "
                     f"({started.launch_reason}); the guest report is the `guest-report` artifact.")
    adapted = (started.guest or {}).get("adaptation")
    if adapted:
        lines.append(_adaptation_line(adapted))
    if started.instance_id is None:
        return lines + ["Not started (`launch: false`): the boot volume is ready to launch from."]
    lines.append(f"Started as instance `{started.instance_id}`.")
    checked = started.boot_check
    if checked is None:
        return lines + ["Boot check: off."]
    if checked.booted:
        reached = "" if checked.reachable is None else (f" Reachable: {'yes' if checked.reachable else '**no**'}, "
                                                         f"{checked.reach_result}.")
        return lines + [f"Boot check: **booted in {checked.seconds:.0f} s**.{reached}"]
    return lines + [f"Boot check: **did not boot** (no `{checked.pattern}` within {checked.seconds:.0f} s). "
                    "Last console lines:", "", "```", *checked.console_tail, "```"]


def _adaptation_line(adapted: dict[str, Any]) -> str:
    if not adapted.get("ran"):
        return "Guest adaptation: off; the guest is launched as it was written."
    changed = ", ".join(f"`{c['path']}` {c['action']}" for c in adapted.get("changes") or []) or "nothing to change"
    return f"Guest adaptation ({adapted.get('seconds')} s): {changed}; originals kept in the guest under " \
           "`/var/lib/oci-disk-import/adaptation`."


def publish_export_summary(summary: ExportSummary) -> None:
    """The exported volumes, each with its object, size, SHA-256 and time, as the run's artifact."""
    what = f"machine `{summary.machine}`" if summary.machine else f"`{summary.disks[0].volume_id}`"
    lines = [f"# Exported {what} as {summary.format}" + (" (compressed)" if summary.compressed else ""), "",
             "| volume | object | size | sha256 | seconds |", "|---|---|---|---|---|"]
    for disk in summary.disks:
        size = "already written" if disk.object_bytes is None else size_text(disk.object_bytes)
        seconds = ", ".join(f"{k} {v:.1f}" for k, v in disk.seconds.items())
        lines.append(f"| `{disk.volume_id}` | `{cell(disk.object)}` | {size} | `{disk.sha256 or '-'}` "
                     f"| {seconds or '-'} |")
    if summary.manifest:
        lines += ["", f"Machine manifest: `{summary.manifest}` (re-import it with `import-machine`)."]
    create_markdown_artifact("\n".join(lines), key="export-summary", description="Export summary")


def publish_copy_summary(summary: CopySummary) -> None:
    """The restored disks as a table, and where they went, as the run's artifacts."""
    rows = [{"disk": d.position, "source volume": d.source_volume_id, "restored volume": d.volume_id,
             "boot": d.boot, "GB": d.size_in_gbs, "reused": d.reused,
             **{f"{k} s": v for k, v in d.seconds.items()}} for d in summary.disks]
    create_table_artifact(rows, key="copy-disks", description=f"Disks copied to {summary.destination_region}")
    what = f"machine `{summary.machine}`" if summary.machine else "volume"
    group = f" in volume group `{summary.volume_group_id}`" if summary.volume_group_id else ""
    create_markdown_artifact(f"# Copied {what} from {summary.source_region} to {summary.destination_region}\n\n"
                             f"{len(summary.disks)} disk(s) restored in `{summary.availability_domain}`{group}.",
                             key="copy-summary", description="Copy summary")
