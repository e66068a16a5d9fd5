"""Syncs end to end on the shared stack: two uploads of one object with opc-meta-sync, the second
written onto the first's volume through the upload trigger and a real flow run, then rolled back
by the rollback-sync deployment; a third version pushed by the delta client (oci-disk-delta) and
applied by the trigger's run. The import core's syncs and deltas are tested in
tests/diskimport/test_sync.py and test_delta.py."""

from __future__ import annotations

import io
import os
import subprocess
import uuid

import oci

from deployments import demo, local_stack
from diskimport import sample_disk
from diskimport.delta import client as delta_client
from tests.e2e.conftest import live_inventory, resources_of


def test_a_new_version_uploaded_with_sync_is_written_onto_the_same_volume(stack, disks, tmp_path):
    """Two uploads of one object with opc-meta-sync: the second (a file of its FAT filesystem rewritten,
    one added, with mtools) is written onto the first's volume, only what differs, and checks clean."""
    raw = tmp_path / "synced.raw"
    subprocess.run(["cp", "--sparse=always", str(disks["gpt"].raw), str(raw)], check=True)
    fat = f"{raw}@@{(1 + sample_disk.SIZES_MIB['ext4'] + sample_disk.SIZES_MIB['xfs']) * sample_disk.MiB}"
    object_name = f"uploads/{uuid.uuid4().hex[:8]}-synced.qcow2"
    etags, summaries = [], []
    for version in range(2):
        if version:
            for name in ("notes.txt", "added.bin"):
                (tmp_path / name).write_bytes(os.urandom(256 * 1024))
                subprocess.run(["mcopy", "-o", "-i", fat, str(tmp_path / name), f"::/{name}"], check=True)
        image = sample_disk.convert(raw, tmp_path / f"synced-{version}.qcow2", "qcow2")
        etags.append(demo.upload(stack, image, object_name, {"sync": "true"}))
        final = demo.wait_for_run(stack, demo.run_started_by_upload(stack, object_name, etags[-1]).id)
        assert final.state.is_completed(), final.state.message
        summaries.append(demo.run_result(stack, final))
    first, second = summaries
    assert first["synced_from"] is None
    assert (second["volume_id"], second["synced_from"]) == (first["volume_id"], etags[0])
    account = second["synced"]
    assert 512 * 1024 <= account["written"] + account["zeroed"] <= 2 * sample_disk.MiB
    assert account["compared"] >= raw.stat().st_size - sample_disk.MiB
    assert {c["status"] for c in second["filesystems"]} == {"clean"}
    assert [v["id"] for v in resources_of(stack, etags[1])["volumes"]] == [first["volume_id"]]
    assert resources_of(stack, etags[1])["instances"] == []

    # A third version pushed by the delta client: only the changed blocks go up, over the second
    # version's import (whose manifest that sync recorded), and the trigger's run applies them.
    (tmp_path / "third.bin").write_bytes(os.urandom(512 * 1024))
    subprocess.run(["mcopy", "-o", "-i", fat, str(tmp_path / "third.bin"), "::/third.bin"], check=True)
    client, _ = demo.stack_clients(stack)
    pushed = delta_client.push(client, stack["OCI_NAMESPACE"], stack["IMPORT_BUCKET"], object_name, raw,
                               tmp_path / "work", out=io.StringIO())
    assert pushed["base_import"] == second["import_id"] and pushed["image_bytes"] < 2 * sample_disk.MiB
    etags.append(pushed["etag"])
    final = demo.wait_for_run(stack, demo.run_started_by_upload(stack, object_name, etags[-1]).id)
    assert final.state.is_completed(), final.state.message
    third = demo.run_result(stack, final)
    assert (third["volume_id"], third["synced_from"]) == (first["volume_id"], etags[1])
    assert 512 * 1024 <= third["synced"]["written"] + third["synced"]["zeroed"] <= pushed["changed_bytes"]
    assert third["verified_bytes"] < 4 * sample_disk.MiB  # only what the delta held was read back
    assert {c["status"] for c in third["filesystems"]} == {"clean"}

    # Rolled back by its deployment: the version before the sync, on a volume restored from its backup.
    from prefect.deployments import run_deployment

    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        started = run_deployment("rollback-sync/default", parameters={"volume_id": first["volume_id"]}, timeout=0)
    final = demo.wait_for_run(stack, started.id)
    assert final.state.is_completed(), final.state.message
    rolled = demo.run_result(stack, final)
    assert (rolled["etag"], rolled["undone_etag"]) == (etags[1], etags[2])
    [restored] = [v for v in resources_of(stack, etags[1])["volumes"] if v["id"] != first["volume_id"]]
    assert restored["id"] == rolled["restored_volume_id"] != first["volume_id"]
    assert restored["freeformTags"]["import-state"] == "imported"


def test_a_pushed_boot_disk_is_rehearsed_cut_over_and_rolled_back_by_their_deployments(stack, tmp_path):
    """The end of a warm migration through the deployments an operator runs: a BIOS boot disk pushed
    by the delta client and synced by the trigger's run; ``rehearse`` boots a clone of it;
    ``cutover``, started the moment the final push returns, waits for its sync, boots it, keeps it
    and reports the downtime; ``rollback-cutover`` stops it."""
    from prefect.deployments import run_deployment

    from tests import boot_disks

    disk = boot_disks.bios_disk(tmp_path / "bios.raw")
    object_name = f"uploads/{uuid.uuid4().hex[:8]}-machine.qcow2"
    client, _ = demo.stack_clients(stack)
    pushed = delta_client.push(client, stack["OCI_NAMESPACE"], stack["IMPORT_BUCKET"], object_name, disk,
                               tmp_path / "work", out=io.StringIO())
    final = demo.wait_for_run(stack, demo.run_started_by_upload(stack, object_name, pushed["etag"]).id)
    assert final.state.is_completed(), final.state.message
    volume_id = demo.run_result(stack, final)["volume_id"]
    parameters = {"bucket": stack["IMPORT_BUCKET"], "object_name": object_name,
                  "target_block": local_stack.BLOCKS["target"]}
    results = {}
    for deployment in ("rehearse/default", "cutover/default", "rollback-cutover/default"):
        if deployment == "cutover/default":  # the source stopped, its final push; the cutover started at once
            (tmp_path / "last.txt").write_text("the source's last word\n")
            subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{sample_disk.MiB}", str(tmp_path / "last.txt"),
                            "::/last.txt"], check=True)
            pushed = delta_client.push(client, stack["OCI_NAMESPACE"], stack["IMPORT_BUCKET"], object_name, disk,
                                       tmp_path / "work", out=io.StringIO())
        with local_stack.prefect_api(stack["PREFECT_API_URL"]):
            started = run_deployment(deployment, parameters=parameters, timeout=0)
        final = demo.wait_for_run(stack, started.id)
        assert final.state.is_completed(), (deployment, final.state.message)
        results[deployment] = demo.run_result(stack, final)
    rehearsed, cut, rolled = results.values()
    assert rehearsed["machine"]["booted"] and rehearsed["volume_id"] == volume_id
    assert cut["machine"]["booted"] and cut["downtime_seconds"] > 0
    assert (cut["etag"], cut["volume_id"]) == (pushed["etag"], volume_id)  # it waited for the final sync
    assert cut["machine"]["instance_id"] != rehearsed["machine"]["instance_id"]
    assert (rolled["volume_id"], rolled["instance_id"]) == (volume_id, cut["machine"]["instance_id"])
    machine = next(i for i in live_inventory(stack)["instances"] if i["id"] == cut["machine"]["instance_id"])
    assert machine["lifecycleState"] == "STOPPED"  # kept, for inspection
    # the stopped machine and its boot volume are the operator's: this test's are removed
    client = oci.core.ComputeClient(demo.stack_clients(stack)[1], service_endpoint=stack["LOCALOCI_ENDPOINT"])
    client.terminate_instance(machine["id"], preserve_boot_volume=False)
