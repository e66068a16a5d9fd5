"""``make bench``'s cutover row: the downtime of a warm migration's cutover.

The Debian machine as it leaves VMware (the guest row's disk, ``tests/debian_guests.py``; a raw
copy cached under ``.local/bench/images/cutover``) is pushed with ``oci-disk-delta`` and synced
(and the backup that import took ahead of the next sync is done, as it is once the warm phase is
over). Then, as an operator does with the source stopped: a 4 MiB file is written into its root
filesystem, the final push goes up, and the ``cutover`` deployment is started the moment the
push returns. It waits for the final sync, makes the boot volume, copies and adapts the guest,
launches it and watches for the login prompt. The row prints the downtime (from the final
upload's end to the login prompt) and where it went; the machine is then rolled back
(``rollback-cutover``) and removed. No target: the row measures.
"""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path
from typing import Any

from deployments import demo, local_stack
from deployments.bench_sync import backups_done, remove_backups_of

CUTOVER = "cutover"
MiB = 1024 * 1024


def ensure_cutover_disk(image_dir: Path) -> Path:
    """The guest row's Debian disk as a raw file the client reads (built once)."""
    from deployments.bench_guest import ensure_guest

    target = image_dir / "cutover" / "debian-vmware.raw"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    qcow2 = ensure_guest(image_dir)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow2), str(target) + ".partial"], check=True)
    Path(str(target) + ".partial").rename(target)
    return target


def _push(env: dict[str, str], client: Any, disk: Path, name: str, work: Path) -> dict[str, Any]:
    from diskimport.delta import client as delta_client

    return delta_client.push(client, env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], name, disk, work, out=io.StringIO())


def _deployment(env: dict[str, str], deployment: str, name: str) -> dict[str, Any]:
    from prefect.deployments import run_deployment

    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        started = run_deployment(deployment, parameters={"bucket": env["IMPORT_BUCKET"], "object_name": name,
                                                         "target_block": local_stack.BLOCKS["target"]}, timeout=0)
    final = demo.wait_for_run(env, started.id, timeout=3600)
    if not final.state.is_completed():
        raise RuntimeError(f"{deployment} of {name} ended {final.state.name}: {final.state.message}")
    return demo.run_result(env, final)


def bench_cutover(env: dict[str, str], cached: Path) -> dict[str, Any]:
    """First push and sync, the final push, the cutover started at once; its report, then the rollback."""
    import oci

    client, config = demo.stack_clients(env)
    compute = oci.core.ComputeClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    name = f"bench/{CUTOVER}-{int(time.time())}.qcow2"
    work = cached.parent / "work"
    work.mkdir(exist_ok=True)
    disk = work / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(cached), str(disk)], check=True)
    first = _push(env, client, disk, name, work)
    run = demo.wait_for_run(env, demo.run_started_by_upload(env, name, first["etag"], timeout=300).id, timeout=3600)
    synced = demo.run_result(env, run)
    backups_done(blockstorage, env["COMPARTMENT_ID"], synced["volume_id"])  # the warm phase is long over
    _last_writes(disk, work)
    final = _push(env, client, disk, name, work)
    cut = rolled = None
    try:
        cut = _deployment(env, "cutover/default", name)
        rolled = _deployment(env, "rollback-cutover/default", name)
    finally:
        _clean(env, client, compute, blockstorage, disk, name, cut, synced, (first["etag"], final["etag"]))
    return {"downtime_s": cut["downtime_seconds"], "final_changed_bytes": final["changed_bytes"],
            "final_uploaded_bytes": final["uploaded_bytes"], "machine": cut["machine"], "steps": cut["steps"],
            "rolled_back": rolled is not None}


def _last_writes(disk: Path, work: Path) -> None:
    """The source's last writes before it stopped: a 4 MiB file written into its root filesystem."""
    import json

    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, check=True).stdout)
    root = max(table["partitiontable"]["partitions"], key=lambda p: p["size"])
    payload = work / "last-words.bin"
    payload.write_bytes(bytes(range(256)) * (4 * MiB // 256))
    subprocess.run(["debugfs", "-w", "-R", f"write {payload} /root/last-words.bin",
                    f"{disk}?offset={root['start'] * 512}"], check=True, capture_output=True)
    payload.unlink()


def _clean(env: dict[str, str], client: Any, compute: Any, blockstorage: Any, disk: Path, name: str,
           cut: dict[str, Any] | None, synced: dict[str, Any], etags: tuple[str, str]) -> None:
    """Remove what the row made (the machine, the sync volume, its backups, the objects), saying
    what could not be removed rather than hiding the row's own failure."""
    import oci

    from diskimport import contract, delta

    disk.unlink(missing_ok=True)
    namespace, bucket = env["OCI_NAMESPACE"], env["IMPORT_BUCKET"]
    steps = [lambda: client.delete_object(namespace, bucket, name)]
    if cut is not None:
        steps.append(lambda: compute.terminate_instance(cut["machine"]["instance_id"], preserve_boot_volume=False))
    for etag in etags:
        manifest = delta.manifest_object(contract.import_id(namespace, bucket, name, etag))
        steps.append(lambda manifest=manifest: client.delete_object(namespace, bucket, manifest))
    steps.append(lambda: remove_backups_of(blockstorage, env["COMPARTMENT_ID"], synced["volume_id"]))
    steps.append(lambda: blockstorage.delete_volume(synced["volume_id"]))
    for remove in steps:
        try:
            remove()
        except oci.exceptions.ServiceError as exc:
            if exc.status != 404:
                print(f"{CUTOVER}: could not remove something it made: {exc.message}", flush=True)


def cutover_lines(c: dict[str, Any]) -> list[str]:
    m = c["machine"]
    return [f"{CUTOVER}: downtime {c['downtime_s']:.1f} s from the final upload's end to the login prompt "
            f"(final push {c['final_uploaded_bytes'] / MiB:.1f} MiB for {c['final_changed_bytes'] / MiB:.1f} MiB "
            f"changed; {m['firmware']}, {m['boot_volume_type']} disk, guest adapted: {m['adapted']}, booted in "
            f"{m['boot_seconds']:.1f} s); steps " + ", ".join(f"{k} {v:.1f}" for k, v in c["steps"].items())]


def cutover_targets(c: dict[str, Any]) -> list[tuple[str, bool, str]]:
    return [(f"{CUTOVER} machine booted and rolled back", c["machine"]["booted"] and c["rolled_back"],
             c["machine"]["boot_check"])]
