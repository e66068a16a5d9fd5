"""``make bench``'s sync row: a new version of a disk synced onto the volume of its earlier import.

An 8 GiB disk (2 GiB of incompressible data in 64 MiB runs, the rest zeros; a qcow2 cached
under ``.local/bench/images/sync``) is imported by its upload with ``opc-meta-sync`` (no earlier
import: a full import), then 256 MiB of it changes (in 1 MiB pieces spread over its data) and
the new version is uploaded and synced. The row prints both times, what the sync wrote and
compared, and what was uploaded. Targets (the warm migration's): the sync in at most 15% of the
full import, and an upload of at most 1.1 times the changed bytes. The upload is whole until
delta uploads exist, so both are missed today; the row measures what a sync costs meanwhile.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

from deployments import demo

SYNC = "sync-8g"
GiB = 1024 ** 3
MiB = 1024 ** 2
DISK_BYTES, DATA_RUN, DATA_EVERY = 8 * GiB, 64 * MiB, 256 * MiB  # 2 GiB of data
CHANGED_BYTES, PIECE = 256 * MiB, MiB
TARGET_RATIO, TARGET_UPLOAD = 0.15, 1.1


def ensure_sync_disks(image_dir: Path) -> tuple[Path, Path]:
    """The disk's two versions as qcow2 files (built once, from a fixed seed)."""
    directory = image_dir / "sync"
    first, second = directory / "v1.qcow2", directory / "v2.qcow2"
    if first.exists() and second.exists():
        return first, second
    directory.mkdir(parents=True, exist_ok=True)
    raw = directory / "disk.raw"
    rng = random.Random(8)
    with open(raw, "wb") as f:
        f.truncate(DISK_BYTES)
        for offset in range(0, DISK_BYTES, DATA_EVERY):
            f.seek(offset)
            f.write(rng.randbytes(DATA_RUN))
    _qcow2(raw, first)
    runs = [offset for offset in range(0, DISK_BYTES, DATA_EVERY)]
    with open(raw, "r+b") as f:
        for n in range(CHANGED_BYTES // PIECE):
            f.seek(runs[n % len(runs)] + (n // len(runs)) * PIECE)
            f.write(rng.randbytes(PIECE))
    _qcow2(raw, second)
    raw.unlink()
    return first, second


def _qcow2(raw: Path, target: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(target) + ".partial"],
                   check=True)
    os.rename(str(target) + ".partial", target)


def _synced_import(env: dict[str, str], path: Path, object_name: str) -> tuple[float, dict[str, Any], int]:
    """Upload with opc-meta-sync; seconds from the upload event to ready, the result, the bytes uploaded."""
    etag = demo.upload(env, path, object_name, {"sync": "true"})
    event_time = dt.datetime.now(dt.timezone.utc)
    run = demo.wait_for_run(env, demo.run_started_by_upload(env, object_name, etag, timeout=300).id, timeout=3600)
    if not run.state.is_completed():
        raise RuntimeError(f"the import of {object_name} ended {run.state.name}: {run.state.message}")
    summary = demo.run_result(env, run)
    return (dt.datetime.fromisoformat(summary["ready_at"]) - event_time).total_seconds(), summary, path.stat().st_size


def bench_sync(env: dict[str, str], disks: tuple[Path, Path]) -> dict[str, Any]:
    """The full import of the first version, then the sync of the second onto its volume."""
    import oci

    from deployments.bench import settle

    client, config = demo.stack_clients(env)
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    object_name = f"bench/{SYNC}-{int(time.time())}.qcow2"
    volume_id = None
    try:
        settle()
        full_s, full, _ = _synced_import(env, disks[0], object_name)
        volume_id = full["volume_id"]
        settle()
        sync_s, synced, uploaded = _synced_import(env, disks[1], object_name)
        if synced["volume_id"] != volume_id or not synced.get("synced"):
            raise RuntimeError(f"the second version was not synced onto volume {volume_id}: {synced}")
    finally:
        client.delete_object(env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], object_name)
        if volume_id:
            for backup in blockstorage.list_volume_backups(env["COMPARTMENT_ID"], volume_id=volume_id).data:
                blockstorage.delete_volume_backup(backup.id)
            blockstorage.delete_volume(volume_id)
    account = synced["synced"]
    return {"full_s": round(full_s, 3), "sync_s": round(sync_s, 3), "sync_over_full": round(sync_s / full_s, 3),
            "changed_bytes": CHANGED_BYTES, "uploaded_bytes": uploaded,
            "upload_over_changed": round(uploaded / CHANGED_BYTES, 3), "account": account,
            "steps": synced["steps"]}


def sync_lines(s: dict[str, Any]) -> list[str]:
    a = s["account"]
    return [f"{SYNC}: full import {s['full_s']:.1f} s; sync of {s['changed_bytes'] / MiB:.0f} MiB changed "
            f"{s['sync_s']:.1f} s ({s['sync_over_full']:.2f} of the full import); wrote "
            f"{a['written'] / MiB:.0f} MiB and zeroed {a['zeroed'] / MiB:.0f} MiB of {a['compared'] / MiB:.0f} MiB "
            f"compared; uploaded {s['uploaded_bytes'] / MiB:.0f} MiB ({s['upload_over_changed']:.2f} x the changed "
            "bytes: whole, until delta uploads); steps " + ", ".join(f"{k} {v:.1f}" for k, v in s["steps"].items())]


def sync_targets(s: dict[str, Any]) -> list[tuple[str, bool, str]]:
    a = s["account"]
    return [(f"{SYNC} sync <= {TARGET_RATIO:.2f} of a full import", s["sync_over_full"] <= TARGET_RATIO,
             f"{s['sync_over_full']:.2f}"),
            (f"{SYNC} upload <= {TARGET_UPLOAD} x the changed bytes", s["upload_over_changed"] <= TARGET_UPLOAD,
             f"{s['upload_over_changed']:.2f}"),
            (f"{SYNC} writes <= {TARGET_UPLOAD} x the changed bytes",
             a["written"] + a["zeroed"] <= TARGET_UPLOAD * s["changed_bytes"],
             f"{(a['written'] + a['zeroed']) / s['changed_bytes']:.2f}")]
