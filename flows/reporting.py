"""What people see of an import in the Prefect UI: a progress bar while the image is written,
and a summary with a table of the time each step took."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from prefect import get_run_logger
from diskimport.contract import Refusal
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, create_table_artifact, \
    update_progress_artifact


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


def publish_summary(summary: dict[str, Any]) -> None:
    rows = [{"step": step, "seconds": seconds} for step, seconds in summary["steps"].items()]
    create_table_artifact(rows, key="import-steps", description=f"Time per step of {summary['object']}")
    lines = [
        f"# Imported `{summary['object']}`",
        "",
        "| | |", "|---|---|",
        f"| object | `{summary['namespace']}/{summary['bucket']}/{summary['object']}` @ `{summary['etag']}` |",
        f"| format | {summary['format']} |",
        f"| virtual size | {summary['virtual_size']:,} bytes |",
        f"| volume | `{summary['volume_id']}` ({summary['volume_size_gb']} GB, {summary['availability_domain']}, "
        f"{summary['vpus_per_gb']} VPUs/GB) |",
        f"| bytes written | {summary['bytes_written']:,} |",
        f"| total time | {sum(summary['steps'].values()):.1f} s |",
        "",
        "## Filesystems",
        "",
        "| location | type | label | size | result | detail |", "|---|---|---|---|---|---|",
        *[f"| `{c['location']}` | {c['filesystem'] or '-'} | {_cell(c.get('label') or '')} | {_size(c['size'])} | "
          f"{c['status']} | {_cell(' / '.join(c['detail'].splitlines()[-2:]))} |" for c in summary["filesystems"]],
    ]
    create_markdown_artifact("\n".join(lines), key="import-summary", description="Import summary")


def _cell(text: str, limit: int = 200) -> str:
    """Text that stays in one markdown table cell."""
    text = text.replace("|", "\\|").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _size(size: int) -> str:
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


def publish_machine_summary(summary: dict[str, Any]) -> None:
    """The machine, and each disk in boot order with its volume, as the run's artifacts."""
    described = summary["machine"]
    rows = [{"disk": d["position"] + 1, "name": d["name"], "file": d["file"], "format": d["format"],
             "virtual size": d["virtual_size"], "volume": d["volume_id"], "digest checked": d["digest_checked"],
             "reused": d["reused"], "seconds": d["seconds"],
             "filesystems": ", ".join(f"{c['location']} {c['filesystem']} {c['status']}" for c in d["filesystems"])}
            for d in summary["disks"]]
    create_table_artifact(rows, key="machine-disks", description=f"Disks of {described['name']}")
    hints = ", ".join(f"{k} {described[k]}" for k in ("firmware", "cpus", "memory_mb", "os", "shape")
                      if described.get(k))
    create_markdown_artifact("\n".join([
        f"# Imported machine `{described['name']}`", "",
        f"From `{summary['namespace']}/{summary['bucket']}/{summary['object']}` ({described['source']}), "
        f"{len(summary['disks'])} disks in volume group `{summary['volume_group_id']}`"
        + (f"; hints: {hints}" if hints else "") + ".", "",
        "Steps: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in summary["steps"].items())
        + " (the disks' own steps are in `machine-disks`).", *_boot_lines(summary.get("boot"))]), key="machine-summary")


def _boot_lines(started: dict[str, Any] | None) -> list[str]:
    """The bootable import's part of the machine summary: firmware, instance, boot check."""
    if not started:
        return []
    lines = ["", f"Boot volume `{started['boot_volume_id']}`, firmware **{started['firmware']}** "
             f"({started['firmware_source']}: {started['firmware_reason']})."]
    if started["instance_id"] is None:
        return lines + ["Not started (`launch: false`): the boot volume is ready to launch from."]
    lines.append(f"Started as instance `{started['instance_id']}`.")
    checked = started.get("boot_check")
    if checked is None:
        return lines + ["Boot check: off."]
    if checked["booted"]:
        return lines + [f"Boot check: **booted in {checked['seconds']:.0f} s**."]
    return lines + [f"Boot check: **did not boot** (no `{checked['pattern']}` within {checked['seconds']:.0f} s). "
                    "Last console lines:", "", "```", *checked["console_tail"], "```"]
