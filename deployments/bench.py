"""``make bench``: how fast an upload becomes a checked volume, against the floor and the reference.

For each benchmark image (see :mod:`deployments.bench_images`), in one run on the local stack:

- **ours**: upload it to the import bucket and time the import the upload event starts,
  from the event to the flow run's completion (the volume is ready, verified, checked);
- **floor**: the larger of the object's size over the worker's network limit and a bare
  local ``qemu-img convert`` of the same file onto a fresh volume file (for a compressed
  raw image, a bare decompress piped into ``dd conv=sparse`` onto it, which is what a raw
  convert does);
- **reference**: :mod:`deployments.reference`, the sequential pipeline, same worker shape.

And the way back (``export-qcow2-8g``): the volume the ``qcow2-8g`` import made, exported again
to a qcow2 object by the ``export-volume`` deployment, timed from the run's creation to its
completion, against the volume's data (its backing file's allocated bytes) over the worker's
network, which the local OCI holds the worker's uploads to as it does its reads.

The local OCI enforces the cloud model (:data:`MODEL`) while the benchmark runs. The last
line of output is one JSON object; the exit status is 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from deployments import local_stack
from deployments.bench_cutover import CUTOVER, bench_cutover, cutover_lines, cutover_targets, ensure_cutover_disk
from deployments.bench_guest import GUEST, bench_guest, ensure_guest, guest_lines, guest_targets
from deployments.bench_pool import BURST, POOL, POOL_SOURCE, bench_burst, bench_pool, burst_lines, burst_targets, \
    pool_lines, pool_targets
from deployments.bench_sync import SYNC, bench_sync, ensure_sync_disks, sync_lines, sync_targets
from deployments.bench_images import DECOMPRESSORS, MACHINE, SPECS, ImageSpec, ensure_image, ensure_machine
from deployments.demo import inventory, run_result, run_started_by_upload, stack_clients, start_import, upload, \
    wait_for_run

MB = 1_000_000
MODEL = {
    "object_read_bytes_per_s_per_connection": 100 * MB,
    "worker_network_bytes_per_s_per_ocpu": 125 * MB,
    "worker_ocpus": 2,
}
WORKER_LIMIT = MODEL["worker_network_bytes_per_s_per_ocpu"] * MODEL["worker_ocpus"]
# The export row: it exports the volume its source image's import made.
EXPORT, EXPORT_SOURCE = "export-qcow2-8g", "qcow2-8g"
EXPORT_DEPLOYMENT = "export-volume/default"
EXPORT_BUCKET = "bench-exports"  # no object events: an exported image must not start an import


def admin(env: dict[str, str], method: str, path: str, body: Any = None) -> Any:
    reply = httpx.request(method, f"{env['LOCALOCI_ENDPOINT']}/_localoci/{path}", json=body, timeout=30)
    reply.raise_for_status()
    return reply.json() if reply.content else None


def apply_model(env: dict[str, str]) -> dict[str, Any]:
    """Make the local OCI enforce the model; return the settings to restore afterwards."""
    caps = ("objectReadBytesPerSecondPerConnection", "workerBytesPerSecondPerOcpu")
    before = {key: value for key, value in admin(env, "GET", "bandwidth").items() if key in caps}  # not the counts
    admin(env, "POST", "bandwidth", {
        "objectReadBytesPerSecondPerConnection": MODEL["object_read_bytes_per_s_per_connection"],
        "workerBytesPerSecondPerOcpu": MODEL["worker_network_bytes_per_s_per_ocpu"]})
    return before


def measure_ours(env: dict[str, str], spec: ImageSpec, path: Path,
                 keep_volume: bool = False) -> tuple[dict[str, Any], str]:
    """Upload, then time the import the upload event starts. Returns the numbers and the object name
    (and, with ``keep_volume``, the imported volume's id as ``volume_id``, left for the caller to delete)."""
    object_name = f"bench/{spec.name}-{int(time.time())}.{spec.suffix}"
    admin(env, "DELETE", "metrics")
    etag = upload(env, path, object_name, spec.metadata)
    event_time = dt.datetime.now(dt.timezone.utc)
    started = run_started_by_upload(env, object_name, etag, timeout=300)
    run = wait_for_run(env, started.id, timeout=3600)
    if not run.state.is_completed():
        raise RuntimeError(f"the import of {object_name} ended {run.state.name}: {run.state.message}")
    summary = run_result(env, run)
    # Ready: detached, tagged imported, performance and backup policy set (the worker's
    # termination and the run's bookkeeping come after).
    seconds = (dt.datetime.fromisoformat(summary["ready_at"]) - event_time).total_seconds()
    key = f"{env['OCI_NAMESPACE']}/{env['IMPORT_BUCKET']}/{object_name}"
    metrics = admin(env, "GET", "metrics")
    written = _allocated_bytes(env, summary["volume_id"])
    if not keep_volume:
        _delete_volume(env, summary["volume_id"])
    return {
        "seconds": round(seconds, 3), "steps": summary["steps"],
        "bytes_read": metrics["objectBytesRead"].get(key, 0), "read_requests": metrics["objectReadRequests"].get(key, 0),
        "bytes_written": written, "peak_rss_mb": summary["peak_rss_mb"],
        "transfer_seconds": summary["transfer_seconds"], "write_phases": summary.get("write_phases", {}),
        **({"volume_id": summary["volume_id"]} if keep_volume else {}),
    }, object_name


def _allocated_bytes(env: dict[str, str], volume_id: str) -> int:
    """What the volume's backing file holds: its data, not its holes."""
    backing = next(v["backingFile"] for v in inventory(env)["volumes"] if v["id"] == volume_id)
    return os.stat(backing).st_blocks * 512


def _delete_volume(env: dict[str, str], volume_id: str) -> None:
    import oci

    _, config = stack_clients(env)
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    blockstorage.delete_volume(volume_id)


def measure_floor(env: dict[str, str], spec: ImageSpec, path: Path, volume_dir: Path) -> dict[str, Any]:
    """The data's own limit: the network time of the object, or a bare local convert, whichever is longer."""
    from diskimport.cloud import volume_size_gb

    network = path.stat().st_size / WORKER_LIMIT
    target = volume_dir / f"bench-floor-{spec.name}.img"
    with open(target, "wb") as f:
        f.truncate(volume_size_gb(spec.virtual_size) * 1024**3)
    try:
        start = time.monotonic()
        if spec.compression:
            decompress = " ".join(DECOMPRESSORS[spec.compression])
            subprocess.run(["sh", "-c", f'{decompress} "$1" | dd of="$2" bs=4M iflag=fullblock conv=sparse,notrunc '
                            "status=none", "sh", str(path), str(target)], check=True, capture_output=True)
        else:
            subprocess.run(["qemu-img", "convert", "-f", spec.fmt, "-O", "raw", "-n", "--target-is-zero", "-W",
                            "-m", "16", str(path), str(target)], check=True, capture_output=True)
        convert = time.monotonic() - start
    finally:
        target.unlink(missing_ok=True)
    return {"seconds": round(max(network, convert), 3), "network_s": round(network, 3), "convert_s": round(convert, 3)}


def measure_reference(env: dict[str, str], spec: ImageSpec, object_name: str) -> dict[str, Any]:
    from blocks import ImportSettings, OCICredentials, WorkerShape
    from deployments.reference import run_reference

    with local_stack.prefect_api(env["PREFECT_API_URL"]):
        credentials = OCICredentials.load(local_stack.BLOCKS["credentials"])
        shape = WorkerShape.load(local_stack.BLOCKS["worker"])
        settings = ImportSettings.load(local_stack.BLOCKS["settings"])
    if shape.ocpus != MODEL["worker_ocpus"]:
        raise RuntimeError(f"the worker block has {shape.ocpus} OCPUs; the model says {MODEL['worker_ocpus']}")
    admin(env, "DELETE", "metrics")
    result = run_reference(credentials, shape, settings, env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], object_name,
                           spec.fmt)
    key = f"{env['OCI_NAMESPACE']}/{env['IMPORT_BUCKET']}/{object_name}"
    result["bytes_read"] = admin(env, "GET", "metrics")["objectBytesRead"].get(key, 0)
    return result


def _delete_object(env: dict[str, str], object_name: str) -> None:
    client, _ = stack_clients(env)
    client.delete_object(env["OCI_NAMESPACE"], env["IMPORT_BUCKET"], object_name)


def settle(drop_caches: bool = True) -> None:
    """Start a measurement on a quiet machine: no writeback left over from the one before (the
    reference writes gigabytes through the page cache), and, where the benchmark may (as root),
    no page cache either, which the kernel would otherwise be reclaiming during the next run.
    (The floor keeps the cache: its bare convert reads the image file like a warm local copy.)"""
    os.sync()
    if not drop_caches:
        return
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the sync alone


def bench_image(env: dict[str, str], spec: ImageSpec, path: Path, volume_dir: Path,
                with_reference: bool, keep_volume: bool = False) -> dict[str, Any]:
    """The image's row; with ``keep_volume``, its imported volume's id as ``volume_id`` (kept)."""
    settle()
    ours, object_name = measure_ours(env, spec, path, keep_volume)
    try:
        settle(drop_caches=False)
        floor = measure_floor(env, spec, path, volume_dir)
        if with_reference and not spec.compression:
            settle()
        # the reference pipeline reads plain images only
        reference = measure_reference(env, spec, object_name) if with_reference and not spec.compression else None
    except BaseException:
        if keep_volume:
            _delete_volume(env, ours["volume_id"])
        raise
    finally:
        _delete_object(env, object_name)
    size = path.stat().st_size
    result = {
        "ours_s": ours["seconds"], "floor_s": floor["seconds"],
        "reference_s": reference["seconds"] if reference else None,
        "ours_over_floor": round(ours["seconds"] / floor["seconds"], 3),
        "reference_over_ours": round(reference["seconds"] / ours["seconds"], 3) if reference else None,
        "object_bytes": size, "virtual_bytes": spec.virtual_size, "bytes_read": ours["bytes_read"],
        "read_requests": ours["read_requests"], "bytes_written": ours["bytes_written"],
        "peak_rss_mb": ours["peak_rss_mb"], "steps": ours["steps"], "transfer_s": ours["transfer_seconds"], "write_phases": ours["write_phases"],
        "floor": floor, "reference": reference,
    }
    if keep_volume:
        result["volume_id"] = ours["volume_id"]
    return result


def bench_export(env: dict[str, str], volume_id: str) -> dict[str, Any]:
    """Export the volume to a qcow2 object with the ``export-volume`` deployment, timed from the
    run's creation to the object being committed and checked, against the volume's data over the worker's network. The
    object and its ``.sha256`` are deleted afterwards."""
    import oci

    client, _ = stack_clients(env)
    namespace = env["OCI_NAMESPACE"]
    try:
        client.get_bucket(namespace, EXPORT_BUCKET)
    except oci.exceptions.ServiceError as exc:
        if exc.status != 404:
            raise
        client.create_bucket(namespace, oci.object_storage.models.CreateBucketDetails(
            name=EXPORT_BUCKET, compartment_id=env["COMPARTMENT_ID"]))
    object_name = f"bench/{EXPORT}-{int(time.time())}.qcow2"
    data = _allocated_bytes(env, volume_id)
    settle()
    admin(env, "DELETE", "metrics")
    run = start_import(env, object_name, bucket=EXPORT_BUCKET, deployment=EXPORT_DEPLOYMENT, volume_id=volume_id,
                       format="qcow2")
    try:
        run = wait_for_run(env, run.id, timeout=3600)
        if not run.state.is_completed():
            raise RuntimeError(f"the export of {volume_id} ended {run.state.name}: {run.state.message}")
        summary = run_result(env, run)
        [disk] = summary["disks"]
    finally:
        for name in (object_name, f"{object_name}.sha256"):
            try:
                client.delete_object(namespace, EXPORT_BUCKET, name)
            except oci.exceptions.ServiceError as exc:
                if exc.status != 404:
                    raise
    # ready: the object committed and checked (the worker VM's termination comes after), as an
    # import row counts to its volume being ready
    seconds = (dt.datetime.fromisoformat(summary["ready_at"]) - run.created).total_seconds()
    floor = data / WORKER_LIMIT
    return {"ours_s": round(seconds, 3), "floor_s": round(floor, 3), "ours_over_floor": round(seconds / floor, 3),
            "volume_data_bytes": data, "object_bytes": disk["object_bytes"], "parts": disk["parts"],
            "steps": disk["seconds"]}


def _import_by_upload(env: dict[str, str], path: Path, object_name: str) -> tuple[float, dict[str, Any], str]:
    """Upload ``path``; the seconds from its upload event to the import being ready, the result, the ETag."""
    etag = upload(env, path, object_name)
    event_time = dt.datetime.now(dt.timezone.utc)
    run = wait_for_run(env, run_started_by_upload(env, object_name, etag, timeout=300).id, timeout=3600)
    if not run.state.is_completed():
        raise RuntimeError(f"the import of {object_name} ended {run.state.name}: {run.state.message}")
    summary = run_result(env, run)
    return (dt.datetime.fromisoformat(summary["ready_at"]) - event_time).total_seconds(), summary, etag


def bench_machine(env: dict[str, str], ova: Path, disks: list[Path]) -> dict[str, Any]:
    """The machine imported from its OVA on one worker VM, against the OVA's size over the
    worker's network and against its three disks uploaded and imported one after another."""
    import oci

    _, config = stack_clients(env)
    blockstorage = oci.core.BlockstorageClient(config, service_endpoint=env["LOCALOCI_ENDPOINT"])
    stamp = int(time.time())
    settle()
    admin(env, "DELETE", "metrics")
    object_name = f"bench/{MACHINE}-{stamp}.ova"
    seconds, summary, etag = _import_by_upload(env, ova, object_name)
    key = f"{env['OCI_NAMESPACE']}/{env['IMPORT_BUCKET']}/{object_name}"
    bytes_read = admin(env, "GET", "metrics")["objectBytesRead"].get(key, 0)
    workers = [i for i in admin(env, "GET", "inventory?all=true")["instances"]
               if i["freeformTags"].get("import-etag") == etag]
    blockstorage.delete_volume_group(summary["volume_group_id"])
    for disk in summary["disks"]:
        _delete_volume(env, disk["volume_id"])
    _delete_object(env, object_name)
    separate = []
    for i, path in enumerate(disks, 1):
        settle()
        name = f"bench/{MACHINE}-disk{i}-{stamp}.vmdk"
        one, result, _ = _import_by_upload(env, path, name)
        separate.append(round(one, 3))
        _delete_volume(env, result["volume_id"])
        _delete_object(env, name)
    floor = ova.stat().st_size / WORKER_LIMIT
    return {"ours_s": round(seconds, 3), "floor_s": round(floor, 3), "ours_over_floor": round(seconds / floor, 3),
            "separate_s": separate, "separate_total_s": round(sum(separate), 3),
            "ours_over_separate": round(seconds / sum(separate), 3), "worker_vms": len(workers),
            "object_bytes": ova.stat().st_size, "bytes_read": bytes_read, "steps": summary["steps"],
            "disks": [{k: d[k] for k in ("position", "format", "virtual_size", "fetched_bytes", "digest_checked",
                                         "seconds")}
                      for d in summary["disks"]]}


def machine_targets(m: dict[str, Any], latency: str = "none") -> list[tuple[str, bool, str]]:
    # with a tenancy's launch times (the oci profile) one worker VM instead of three counts fully
    separate = 0.5 if latency == "oci" else 0.8
    return [
        (f"{MACHINE} ours/floor <= 1.3", m["ours_over_floor"] <= 1.3, f"{m['ours_over_floor']:.2f}"),
        (f"{MACHINE} on one worker VM", m["worker_vms"] == 1, f"{m['worker_vms']} worker VMs"),
        (f"{MACHINE} <= {separate} x its disks imported one after another", m["ours_over_separate"] <= separate,
         f"{m['ours_over_separate']:.2f} ({m['ours_s']:.1f} s vs {m['separate_total_s']:.1f} s)"),
        (f"{MACHINE} bytes read <= object size", m["bytes_read"] <= m["object_bytes"],
         f"{m['bytes_read']:,} / {m['object_bytes']:,}"),
    ]


def targets(images: dict[str, dict[str, Any]], export: dict[str, Any] | None = None) -> list[tuple[str, bool, str]]:
    """The issue's targets, each with whether this run met it and the numbers behind it."""
    found: list[tuple[str, bool, str]] = []
    if export:
        found.append((f"{EXPORT} ours/floor <= 1.5", export["ours_over_floor"] <= 1.5,
                      f"{export['ours_over_floor']:.2f}"))
    q = images.get("qcow2-8g")
    if q:
        found.append(("qcow2-8g ours/floor <= 1.5", q["ours_over_floor"] <= 1.5, f"{q['ours_over_floor']:.2f}"))
        if q["reference_over_ours"] is not None:
            found.append(("qcow2-8g reference/ours >= 2", q["reference_over_ours"] >= 2,
                          f"{q['reference_over_ours']:.2f}"))
    v, r = images.get("vmdk-64g-sparse"), images.get("raw-1g-dense")
    if v and r:
        ratio = v["ours_s"] / r["ours_s"]
        found.append(("vmdk-64g-sparse <= 1.5 x raw-1g-dense", ratio <= 1.5, f"{ratio:.2f}"))
    s = images.get("small-50m")
    if s:
        found.append(("small-50m ready within 15 s of its upload event", s["ours_s"] <= 15, f"{s['ours_s']:.1f} s"))
    for name in ("raw-8g-zst", "raw-8g-gz"):
        c = images.get(name)
        if c:
            found.append((f"{name} ours/floor <= 1.5", c["ours_over_floor"] <= 1.5, f"{c['ours_over_floor']:.2f}"))
    for name, image in images.items():
        found.append((f"{name} bytes read == object size", image["bytes_read"] == image["object_bytes"],
                      f"{image['bytes_read']:,} / {image['object_bytes']:,}"))
    if s and q:
        ratio = q["peak_rss_mb"] / s["peak_rss_mb"]
        found.append(("peak orchestrator memory, largest vs smallest, within 20%", abs(ratio - 1) <= 0.2,
                      f"{q['peak_rss_mb']:.0f} MB vs {s['peak_rss_mb']:.0f} MB"))
    return found


def print_table(images: dict[str, dict[str, Any]]) -> None:
    head = f"{'image':<16} {'object':>9} {'ours s':>7} {'floor s':>8} {'ref s':>7} {'ours/floor':>10} " \
           f"{'ref/ours':>8} {'read':>9} {'written':>9} {'rss MB':>7}"
    print(head)
    print("-" * len(head))
    for name, i in images.items():
        ref = f"{i['reference_s']:7.1f}" if i["reference_s"] is not None else f"{'-':>7}"
        ratio = f"{i['reference_over_ours']:8.2f}" if i["reference_over_ours"] is not None else f"{'-':>8}"
        print(f"{name:<16} {i['object_bytes'] / MB:8.0f}M {i['ours_s']:7.1f} {i['floor_s']:8.1f} {ref} "
              f"{i['ours_over_floor']:10.2f} {ratio} {i['bytes_read'] / MB:8.0f}M {i['bytes_written'] / MB:8.0f}M "
              f"{i['peak_rss_mb']:7.0f}")
    print()
    for name, i in images.items():
        print(f"{name}: ours " + ", ".join(f"{k} {v:.1f}" for k, v in i["steps"].items()))
        print(f"{name}: ours write-and-verify " + ", ".join(f"{k} {v:.1f}" for k, v in i["write_phases"].items()))
        if i["reference"]:
            print(f"{name}: reference " + ", ".join(f"{k} {v:.1f}" for k, v in i["reference"]["steps"].items()))
        print(f"{name}: floor network {i['floor']['network_s']:.1f} s, bare convert {i['floor']['convert_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="*", default=[s.name for s in SPECS] + [EXPORT, MACHINE, GUEST],
                        help=f"which images to run (default: all, the export, {EXPORT}, which implies "
                             f"{EXPORT_SOURCE}, the machine, {MACHINE}, and the guest inspection and "
                             f"adaptation, {GUEST}; only when named: the sync of a new version, {SYNC}, the "
                             f"cutover's downtime, {CUTOVER}, the worker pool's rows)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference pipeline")
    parser.add_argument("--latency", default="none",
                        help="the local OCI's latency profile (localoci/latency.py): none (its own 50 ms "
                             "transitions, the default) or oci (a tenancy's provisioning times, for what overlaps "
                             "with provisioning; the ratios against the floor then include minutes of launch)")
    args = parser.parse_args(argv)
    with_export = EXPORT in args.images
    with_pool, with_burst = POOL in args.images, BURST in args.images
    specs = [s for s in SPECS if s.name in args.images or (with_export and s.name == EXPORT_SOURCE)]
    pool_spec = next(s for s in SPECS if s.name == POOL_SOURCE)
    with_machine = MACHINE in args.images
    env = local_stack.up()
    base = local_stack.local_dir()
    image_dir = local_stack.ROOT / ".local" / "bench" / "images"
    print(f"model: {json.dumps(MODEL)}", flush=True)
    paths = {}
    for spec in specs:
        print(f"image {spec.name}: preparing", flush=True)
        paths[spec.name] = ensure_image(spec, image_dir)
    if with_machine:
        print(f"machine {MACHINE}: preparing", flush=True)
        ova, disks = ensure_machine(image_dir)
    with_guest = GUEST in args.images
    if with_guest:
        print(f"{GUEST}: preparing", flush=True)
        guest_disk = ensure_guest(image_dir)
    with_sync = SYNC in args.images
    if with_sync:
        print(f"{SYNC}: preparing", flush=True)
        sync_disks = ensure_sync_disks(image_dir)
    with_cutover = CUTOVER in args.images
    if with_cutover:
        print(f"{CUTOVER}: preparing", flush=True)
        cutover_disk = ensure_cutover_disk(image_dir)
    if with_pool or with_burst:
        paths.setdefault(POOL_SOURCE, ensure_image(pool_spec, image_dir))
    volume_dir = base / "localoci" / "volumes"  # the floor's volume file sits beside the real ones
    before = apply_model(env)
    latency_before = admin(env, "GET", "latency")
    profile = local_stack.apply_latency(env, args.latency)
    print(f"latency profile: {args.latency} {json.dumps(profile)}", flush=True)
    images: dict[str, dict[str, Any]] = {}
    machine: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    guest: dict[str, Any] | None = None
    synced: dict[str, Any] | None = None
    cut: dict[str, Any] | None = None
    pooled: dict[str, Any] | None = None
    burst: dict[str, Any] | None = None
    failed: list[tuple[str, bool, str]] = []

    def row(name: str, measure: Callable[[], Any]) -> Any:
        """One row's numbers, or None: a row that fails is reported and the others still run."""
        print(f"{name}: running", flush=True)
        try:
            return measure()
        except Exception as exc:  # noqa: BLE001 (the row's failure is the result)
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed.append((f"{name} ran", False, f"{type(exc).__name__}: {str(exc)[:300]}"))
            return None

    try:
        for spec in specs:
            keep = with_export and spec.name == EXPORT_SOURCE
            i = row(f"image {spec.name}", lambda: bench_image(env, spec, paths[spec.name], volume_dir,
                                                              not args.no_reference, keep))
            if i is None:
                continue
            images[spec.name] = i
            print(f"image {spec.name}: ours {i['ours_s']:.1f} s, floor {i['floor_s']:.1f} s, "
                  f"reference {i['reference_s']} s", flush=True)
            if keep:
                volume_id = i.pop("volume_id")
                try:
                    export = row(EXPORT, lambda: bench_export(env, volume_id))
                    if export:
                        print(f"{EXPORT}: ours {export['ours_s']:.1f} s, floor {export['floor_s']:.1f} s",
                              flush=True)
                finally:
                    _delete_volume(env, volume_id)
        if with_machine:
            machine = row(f"machine {MACHINE}", lambda: bench_machine(env, ova, disks))
        if with_guest:
            guest = row(GUEST, lambda: bench_guest(env, guest_disk))
        if with_sync:
            synced = row(SYNC, lambda: bench_sync(env, sync_disks))
        if with_cutover:
            cut = row(CUTOVER, lambda: bench_cutover(env, cutover_disk))
        if with_pool:
            pooled = row(POOL, lambda: bench_pool(
                env, paths[POOL_SOURCE], lambda path: measure_ours(env, pool_spec, path),
                lambda name: measure_reference(env, pool_spec, name), lambda name: _delete_object(env, name)))
        if with_burst:
            burst = row(BURST, lambda: bench_burst(env, paths[POOL_SOURCE]))
    finally:
        admin(env, "POST", "bandwidth", before)
        admin(env, "DELETE", "latency")
        for transition, seconds in latency_before.items():
            admin(env, "POST", "latency", {"transition": transition, "seconds": seconds})
        local_stack.set_boot_timeouts(env, latency_before)
    print()
    print_table(images)
    if export:
        print(f"\n{EXPORT}: ours {export['ours_s']:.1f} s, floor {export['floor_s']:.1f} s (the volume's "
              f"{export['volume_data_bytes'] / MB:.0f} MB of data over the worker's network), "
              f"{export['ours_over_floor']:.2f}; {export['object_bytes'] / MB:.0f} MB in {export['parts']} parts; "
              "steps " + ", ".join(f"{k} {v:.1f}" for k, v in export["steps"].items()))
    met = failed + targets(images, export)
    if machine:
        print(f"\n{MACHINE}: ours {machine['ours_s']:.1f} s (floor {machine['floor_s']:.1f} s, "
              f"{machine['ours_over_floor']:.2f}); its disks imported one after another "
              f"{' + '.join(f'{s:.1f}' for s in machine['separate_s'])} = {machine['separate_total_s']:.1f} s; "
              f"{machine['worker_vms']} worker VM(s); steps " + ", ".join(f"{k} {v:.1f}" for k, v in machine["steps"].items()))
        met += machine_targets(machine, args.latency)
    if guest:
        print("\n" + "\n".join(guest_lines(guest)))
        met += guest_targets(guest)
    if synced:
        print("\n" + "\n".join(sync_lines(synced)))
        met += sync_targets(synced)
    if cut:
        print("\n" + "\n".join(cutover_lines(cut)))
        met += cutover_targets(cut)
    if pooled:
        print("\n" + "\n".join(pool_lines(pooled)))
        met += pool_targets(pooled)
    if burst:
        print("\n" + "\n".join(burst_lines(burst)))
        met += burst_targets(burst)
    print()
    for name, ok, detail in met:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {detail}")
    print(json.dumps({"model": {**MODEL, "worker_network_bytes_per_s": WORKER_LIMIT}, "images": images,
                      "export": export, "machine": machine, "guest": guest, "sync": synced, "cutover": cut, "pool": pooled,
                      "burst": burst},
                     sort_keys=False))
    return 0 if all(ok for _, ok, _ in met) else 1


if __name__ == "__main__":
    sys.exit(main())
