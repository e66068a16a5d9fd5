"""``make bench``'s guest row: how long the guest inspection and adaptation add to a machine import.

A Debian machine built from Debian's packages as it leaves VMware (``tests/debian_guests.py``:
initramfs without virtio, root and fstab by device, a static address pinned to the old card,
console on tty0; cached under ``.local/bench/images/guest``) is imported as a bootable machine
without a launch, twice in one run: with ``adapt_guest`` ``off`` (the guest is inspected only)
and ``auto`` (inspected, adapted with its own update-initramfs, inspected again). The row
prints both imports' times and the steps that inspection and adaptation took (the boot check
is not part of either: nothing is launched). Target: under 30 s for the two on this machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from deployments import demo

GUEST = "guest-adaptation"
BUCKET = "bench-guests"
TARGET_SECONDS = 30.0


def ensure_guest(image_dir: Path) -> Path:
    """The machine's boot disk as a qcow2 (built once)."""
    from tests import debian_guests

    target = image_dir / "guest" / f"debian-vmware-{debian_guests.recipe()}.qcow2"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        raw = debian_guests.bios_machine(work / "disk.raw", work).disk
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(target) + ".partial"], check=True)
        Path(str(target) + ".partial").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _bucket(env: dict[str, str]) -> None:
    import oci

    client, _ = demo.stack_clients(env)
    try:
        client.create_bucket(env["OCI_NAMESPACE"], oci.object_storage.models.CreateBucketDetails(
            name=BUCKET, compartment_id=env["COMPARTMENT_ID"]))
    except oci.exceptions.ServiceError as exc:
        if exc.status != 409:
            raise


def _one(env: dict[str, str], manifest: str, mode: str) -> dict[str, Any]:
    run = demo.start_import(env, manifest, bucket=BUCKET, deployment="import-machine/default", bootable=True,
                            launch=False, adapt_guest=mode, force=True)
    final = demo.wait_for_run(env, run.id, timeout=3600)
    if not final.state.is_completed():
        raise RuntimeError(f"the {mode} import of {manifest} ended {final.state.name}: {final.state.message}")
    summary = demo.run_result(env, final)
    steps = summary["disks"][0]["steps"]  # the boot disk's own steps: inspect-guest, adapt-guest
    guest = summary["boot"]["guest"] or {}
    return {"seconds": round((final.end_time - final.start_time).total_seconds(), 3),
            "inspect_s": round(steps.get("inspect-guest", 0.0), 3), "adapt_s": round(steps.get("adapt-guest", 0.0), 3),
            "changes": len((guest.get("adaptation") or {}).get("changes") or []),
            "verdicts": {v["mode"]: [v["boots"], v["reachable"]] for v in guest.get("verdicts") or []},
            "summary": summary}


def bench_guest(env: dict[str, str], disk: Path) -> dict[str, Any]:
    """The machine imported with adapt_guest off, then auto; what inspection and adaptation took."""
    _bucket(env)
    client, _ = demo.stack_clients(env)
    name = f"bench/{disk.name}"
    demo.upload(env, disk, name, bucket=BUCKET)
    manifest = disk.parent / "debian-vmware.machine.json"
    manifest.write_text(json.dumps({"name": "debian-vmware", "disks": [name]}))
    demo.upload(env, manifest, "bench/debian-vmware.machine.json", bucket=BUCKET)
    results = {}
    try:
        for mode in ("off", "auto"):
            results[mode] = _one(env, "bench/debian-vmware.machine.json", mode)
            _remove_volumes(env, results[mode].pop("summary"))
    finally:
        for obj in (name, "bench/debian-vmware.machine.json"):
            client.delete_object(env["OCI_NAMESPACE"], BUCKET, obj)
    added = results["auto"]["inspect_s"] + results["auto"]["adapt_s"]
    return {"off": results["off"], "auto": results["auto"], "added_s": round(added, 3)}


def _remove_volumes(env: dict[str, str], summary: dict[str, Any]) -> None:
    import oci

    _, config = demo.stack_clients(env)
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    if summary.get("volume_group_id"):
        blockstorage.delete_volume_group(summary["volume_group_id"])
    boot = (summary.get("boot") or {}).get("boot_volume_id")
    if boot:
        blockstorage.delete_boot_volume(boot)


def guest_lines(g: dict[str, Any]) -> list[str]:
    off, auto = g["off"], g["auto"]
    return [f"{GUEST}: machine import without launch, adapt_guest off {off['seconds']:.1f} s (inspection "
            f"{off['inspect_s']:.1f} s), auto {auto['seconds']:.1f} s (inspection {auto['inspect_s']:.1f} s, "
            f"adaptation {auto['adapt_s']:.1f} s, {auto['changes']} changes); virtio verdict before "
            f"{off['verdicts'].get('PARAVIRTUALIZED')}, after {auto['verdicts'].get('PARAVIRTUALIZED')}"]


def guest_targets(g: dict[str, Any]) -> list[tuple[str, bool, str]]:
    return [(f"{GUEST} inspection + adaptation < {TARGET_SECONDS:.0f} s", g["added_s"] < TARGET_SECONDS,
             f"{g['added_s']:.1f} s"),
            (f"{GUEST} boots and answers on virtio once adapted", g["auto"]["verdicts"].get("PARAVIRTUALIZED") == [True, True],
             str(g["auto"]["verdicts"].get("PARAVIRTUALIZED")))]
