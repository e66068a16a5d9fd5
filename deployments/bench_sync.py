"""``make bench``'s sync row: a new version of a disk pushed with ``oci-disk-delta`` and synced onto
the volume of its earlier import.

An 8 GiB disk (2 GiB of incompressible data in 64 MiB runs, the rest zeros; a sparse raw file
cached under ``.local/bench/images/sync``) is pushed whole (no earlier import: a full import,
whose block manifest the worker records), then 256 MiB of it change (in 1 MiB pieces spread over
its data) and it is pushed again: the client uploads only the changed blocks as a qcow2 over the
first import, and the sync applies them onto its volume. Then another 256 MiB change and that
third version is pushed with the areas written (``--changed-areas``, as the source's change
tracking lists them; here the bench's own writes): the client reads only them, not the whole
disk. The second and third pushes start once the backup the import before took ahead of the
next sync is done, as it is where syncs are minutes apart.
Each time is measured from the push's start (the client reads and hashes the disk, makes and
uploads what it sends) to the volume ready. Targets (the warm migration's): the sync in at most
15% of the full import, an upload of at most 1.1 times the changed bytes (the client's manifest
included), and writes of at most 1.1 times the changed bytes.
"""

from __future__ import annotations

import datetime as dt
import io
import json
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


def ensure_sync_disks(image_dir: Path) -> Path:
    """The disk's first version as a sparse raw file (built once, from a fixed seed)."""
    directory = image_dir / "sync"
    disk = directory / "v1.raw"
    if disk.exists():
        return disk
    directory.mkdir(parents=True, exist_ok=True)
    for old in ("v1.qcow2", "v2.qcow2"):  # what earlier versions of this row cached
        (directory / old).unlink(missing_ok=True)
    rng = random.Random(8)
    partial = directory / "v1.raw.partial"
    with open(partial, "wb") as f:
        f.truncate(DISK_BYTES)
        for offset in range(0, DISK_BYTES, DATA_EVERY):
            f.seek(offset)
            f.write(rng.randbytes(DATA_RUN))
    partial.rename(disk)
    return disk


def change(disk: Path, seed: int = 9, shift: int = 0) -> list[dict[str, int]]:
    """A new version: 256 MiB of the data rewritten, 1 MiB at a time, spread over every run (from
    ``shift`` MiB into each run); the areas written, as a change tracker lists them."""
    rng = random.Random(seed)
    runs = list(range(0, DISK_BYTES, DATA_EVERY))
    written = []
    with open(disk, "r+b") as f:
        for n in range(CHANGED_BYTES // PIECE):
            at = runs[n % len(runs)] + (shift + n // len(runs)) * PIECE
            f.seek(at)
            f.write(rng.randbytes(PIECE))
            written.append({"start": at, "length": PIECE})
    return written


def _pushed(env: dict[str, str], client: Any, disk: Path, object_name: str, work: Path, **tracking: Any
            ) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Push the disk; seconds from the push's start to the volume ready, the push's and the run's summaries.
    ``tracking``: the push's ``changed_areas`` and ``changes_since``."""
    from diskimport.delta import client as delta_client

    started = dt.datetime.now(dt.timezone.utc)
    pushed = delta_client.push(client, env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], object_name, disk, work,
                               out=io.StringIO(), **tracking)
    pushed["push_s"] = round((dt.datetime.now(dt.timezone.utc) - started).total_seconds(), 3)
    run = demo.wait_for_run(env, demo.run_started_by_upload(env, object_name, pushed["etag"], timeout=300).id,
                            timeout=3600)
    if not run.state.is_completed():
        raise RuntimeError(f"the import of {object_name} ended {run.state.name}: {run.state.message}")
    summary = demo.run_result(env, run)
    return (dt.datetime.fromisoformat(summary["ready_at"]) - started).total_seconds(), pushed, summary


def backups_done(blockstorage: Any, compartment_id: str, volume_id: str) -> None:
    """Wait until no backup of the volume is CREATING: the one its import took ahead of the next sync
    is done long before that sync where syncs are minutes or hours apart, as an operator's are."""
    import oci

    for backup in blockstorage.list_volume_backups(compartment_id, volume_id=volume_id).data:
        if backup.lifecycle_state == "CREATING":
            oci.wait_until(blockstorage, blockstorage.get_volume_backup(backup.id),
                           evaluate_response=lambda r: r.data.lifecycle_state != "CREATING", max_wait_seconds=600)


def remove_backups_of(blockstorage: Any, compartment_id: str, volume_id: str) -> None:
    """Delete a volume's backups, each once it can be (the one a sync-mode import takes ahead of the
    next sync may still be CREATING)."""
    backups_done(blockstorage, compartment_id, volume_id)
    for backup in blockstorage.list_volume_backups(compartment_id, volume_id=volume_id).data:
        if backup.lifecycle_state not in ("TERMINATING", "TERMINATED"):
            blockstorage.delete_volume_backup(backup.id)


def bench_sync(env: dict[str, str], cached: Path) -> dict[str, Any]:
    """The full push and import of the first version, then the delta push and sync of the second."""
    import oci

    from deployments.bench import settle
    from diskimport import delta

    client, config = demo.stack_clients(env)
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    object_name = f"bench/{SYNC}-{int(time.time())}.qcow2"
    work = cached.parent / "work"
    disk, areas = work / "disk.raw", work / "changed-areas.json"
    work.mkdir(exist_ok=True)
    subprocess.run(["cp", "--sparse=always", str(cached), str(disk)], check=True)
    volume_id, import_ids = None, []
    try:
        settle()
        full_s, full_push, full = _pushed(env, client, disk, object_name, work)
        volume_id = full["volume_id"]
        import_ids.append(full["import_id"])
        backups_done(blockstorage, env["COMPARTMENT_ID"], volume_id)
        change(disk)
        settle()
        sync_s, sync_push, synced = _pushed(env, client, disk, object_name, work)
        import_ids.append(synced["import_id"])
        if synced["volume_id"] != volume_id or not synced.get("synced"):
            raise RuntimeError(f"the second version was not synced onto volume {volume_id}: {synced}")
        # The third version, pushed with the areas a change tracker on the source lists (here the
        # bench's own writes, as exact as a tracker at 1 MiB granularity): only they are read.
        backups_done(blockstorage, env["COMPARTMENT_ID"], volume_id)
        areas.write_text(json.dumps(change(disk, seed=10, shift=4)))
        settle()
        tracked_s, tracked_push, tracked = _pushed(env, client, disk, object_name, work, changed_areas=areas,
                                                   changes_since=sync_push["etag"])
        import_ids.append(tracked["import_id"])
        if tracked["volume_id"] != volume_id or not tracked_push["changed_areas"]:
            raise RuntimeError(f"the third version was not synced by its changed areas onto {volume_id}: {tracked}")
    finally:
        disk.unlink(missing_ok=True)
        areas.unlink(missing_ok=True)
        client.delete_object(env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], object_name)
        for import_id in import_ids:
            client.delete_object(env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], delta.manifest_object(import_id))
        if volume_id:
            remove_backups_of(blockstorage, env["COMPARTMENT_ID"], volume_id)
            blockstorage.delete_volume(volume_id)
    account = synced["synced"]
    uploaded = sync_push["uploaded_bytes"]
    return {"full_s": round(full_s, 3), "sync_s": round(sync_s, 3), "sync_over_full": round(sync_s / full_s, 3),
            "full_push_s": full_push["push_s"], "sync_push_s": sync_push["push_s"],
            "full_uploaded_bytes": full_push["uploaded_bytes"], "changed_bytes": CHANGED_BYTES,
            "uploaded_bytes": uploaded, "manifest_bytes": sync_push["manifest_bytes"],
            "upload_over_changed": round(uploaded / CHANGED_BYTES, 3), "account": account,
            "full_steps": full["steps"], "steps": synced["steps"],
            "full_phases": full.get("write_phases"), "phases": synced.get("write_phases"),
            "tracked_s": round(tracked_s, 3), "tracked_over_full": round(tracked_s / full_s, 3),
            "tracked_push_s": tracked_push["push_s"], "tracked_read_bytes": tracked_push["read_bytes"],
            "tracked_uploaded_bytes": tracked_push["uploaded_bytes"], "tracked_steps": tracked["steps"]}


def sync_lines(s: dict[str, Any]) -> list[str]:
    a = s["account"]
    return [f"{SYNC}: full push and import {s['full_s']:.1f} s (push {s['full_push_s']:.1f} s, "
            f"{s['full_uploaded_bytes'] / MiB:.0f} MiB uploaded); delta push and sync of {s['changed_bytes'] / MiB:.0f} "
            f"MiB changed {s['sync_s']:.1f} s (push {s['sync_push_s']:.1f} s; {s['sync_over_full']:.2f} of the full "
            f"import); uploaded {s['uploaded_bytes'] / MiB:.1f} MiB ({s['upload_over_changed']:.2f} x the changed "
            f"bytes, its manifest {s['manifest_bytes'] / MiB:.1f} MiB included); wrote {a['written'] / MiB:.0f} MiB "
            f"and zeroed {a['zeroed'] / MiB:.0f} MiB",
            f"{SYNC} steps: full " + ", ".join(f"{k} {v:.1f}" for k, v in s["full_steps"].items())
            + "; sync " + ", ".join(f"{k} {v:.1f}" for k, v in s["steps"].items()),
            f"{SYNC} write phases: full " + ", ".join(f"{k} {v:.1f}" for k, v in (s["full_phases"] or {}).items())
            + "; sync " + ", ".join(f"{k} {v:.1f}" for k, v in (s["phases"] or {}).items()),
            f"{SYNC} with change tracking: push (the changed areas alone read, {s['tracked_read_bytes'] / MiB:.0f} "
            f"MiB) and sync of {s['changed_bytes'] / MiB:.0f} MiB changed {s['tracked_s']:.1f} s (push "
            f"{s['tracked_push_s']:.1f} s; {s['tracked_over_full']:.2f} of the full import); uploaded "
            f"{s['tracked_uploaded_bytes'] / MiB:.1f} MiB; steps "
            + ", ".join(f"{k} {v:.1f}" for k, v in s["tracked_steps"].items())]


def sync_targets(s: dict[str, Any]) -> list[tuple[str, bool, str]]:
    a = s["account"]
    return [(f"{SYNC} sync <= {TARGET_RATIO:.2f} of a full import", s["sync_over_full"] <= TARGET_RATIO,
             f"{s['sync_over_full']:.2f}"),
            (f"{SYNC} sync with change tracking <= {TARGET_RATIO:.2f} of a full import",
             s["tracked_over_full"] <= TARGET_RATIO, f"{s['tracked_over_full']:.2f}"),
            (f"{SYNC} upload <= {TARGET_UPLOAD} x the changed bytes", s["upload_over_changed"] <= TARGET_UPLOAD,
             f"{s['upload_over_changed']:.2f}"),
            (f"{SYNC} writes <= {TARGET_UPLOAD} x the changed bytes",
             a["written"] + a["zeroed"] <= TARGET_UPLOAD * s["changed_bytes"],
             f"{(a['written'] + a['zeroed']) / s['changed_bytes']:.2f}")]
