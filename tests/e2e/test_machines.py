"""End to end through the deployed flows: whole machines (an OVA, an OVF, a manifest; disks laid
out like real guests), imported, exported to images and imported again, and copied to the second
region. A module of its own, so a test worker runs it beside the guest disks' module, on the
session's shared stack (its objects and runs named apart)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from deployments import demo, local_stack
from diskimport.sample_disk import convert
from tests import guest_disks
from tests.e2e.conftest import (MANUAL_BUCKET, SUFFIX, Disk, admin, image_of, live_inventory, resources_of,
                               run_import)


# -- Whole machines: an OVA (its boot disk laid out like a real guest), an OVF with its disks
# beside it, and a machine manifest, each onto one volume per disk, written at once from one
# worker VM and kept in one volume group; a disk that does not match the manifest's digest
# fails naming it, a hostile disk is refused before anything exists.

# The module fixture's slow part (whole machines built and imported) runs once, within the first
# test's time budget: under the whole suite on two cores it has taken about 8 minutes.
pytestmark = pytest.mark.timeout(1800)

MACHINE = "import-machine/default"
MACHINE_DISKS = [guest_disks.oracle_linux, guest_disks.whole_device_ext4, guest_disks.mbr_logical]


@pytest.fixture(scope="module")
def machine_imports(stack, guests_built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tests.diskimport.test_hostile_images import backing_file
    from tests.diskimport.test_machine import make_ova, manifest_for, vmware_descriptor

    tmp = tmp_path_factory.mktemp("machines")
    guests = [guests_built(build) for build in MACHINE_DISKS]
    vmdks = []
    for i, guest in enumerate(guests):
        vmdk = convert(guest.path, tmp / f"web-01-disk{i + 1}.vmdk", "vmdk", "subformat=streamOptimized")
        vmdks.append((vmdk, guest.size // (1024 * 1024)))
    paths = [p for p, _ in vmdks]
    good_manifest = "SHA256(web-01.ovf)= __OVF__\n" + manifest_for(paths)
    cases: dict[str, Any] = {}
    work = tmp / "ova"
    work.mkdir()
    cases["ova"] = make_ova(work, "web-01", vmware_descriptor(vmdks), paths, manifest=good_manifest)
    wrong = manifest_for(paths).replace(manifest_for(paths[1:2]).split("= ")[1].strip(), "0" * 64)
    work = tmp / "digest"
    work.mkdir()
    cases["digest"] = make_ova(work, "web-01", vmware_descriptor(vmdks), paths, manifest=wrong)
    work = tmp / "hostile"
    work.mkdir()
    hostile_disk = backing_file(work)[0].rename(work / "web-01-disk2.qcow2")
    descriptor = vmware_descriptor([vmdks[0], (hostile_disk, 64)]).replace(
        'ovf:fileRef="file2" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"',
        'ovf:fileRef="file2"')
    cases["hostile"] = make_ova(work, "web-01", descriptor, [paths[0], hostile_disk])

    started = {}
    for case in ("ova", "digest", "hostile"):
        etag, run = run_import(stack, cases[case], f"machines/{case}/web-01.ova", deployment=MACHINE)
        started[case] = {"etag": etag, "run": run}
    # an OVF with its disks and manifest beside it
    ovf_dir = tmp / "ova"
    for path in [*paths, ovf_dir / "web-01.mf"]:
        demo.upload(stack, path, f"machines/ovf/{path.name}", bucket=MANUAL_BUCKET)
    etag, run = run_import(stack, ovf_dir / "web-01.ovf", "machines/ovf/web-01.ovf", deployment=MACHINE)
    started["ovf"] = {"etag": etag, "run": run}
    # a manifest naming disks uploaded in other formats
    names = []
    for i, guest in enumerate(guests):
        fmt = ("qcow2", "vhdx", "raw")[i]
        image = image_of(Disk(guest.path, "guest"), fmt, tmp / f"db-{i}.{SUFFIX[fmt]}")
        names.append(f"machines/manifest/{image.name}")
        demo.upload(stack, image, names[-1], bucket=MANUAL_BUCKET)
    manifest = tmp / "db-01.machine.json"
    manifest.write_text(json.dumps({"disks": names, "firmware": "UEFI_64"}))
    etag, run = run_import(stack, manifest, "machines/manifest/db-01.machine.json", deployment=MACHINE)
    started["manifest"] = {"etag": etag, "run": run}
    for item in started.values():
        item["final"] = demo.wait_for_run(stack, item["run"].id, timeout=900)
    return {"cases": started, "guests": guests, "ova": cases["ova"]}


@pytest.mark.parametrize("case,name", [("ova", "web-01"), ("ovf", "web-01"), ("manifest", "db-01")])
def test_a_machine_imports_every_disk_bit_exact_into_one_volume_group(case, name, machine_imports, stack):
    final = machine_imports["cases"][case]["final"]
    assert final.state.is_completed(), f"{case}: {final.state.message}"
    summary = demo.run_result(stack, final)
    assert summary["machine"]["name"] == name and len(summary["disks"]) == 3
    volumes = {v["id"]: v for v in live_inventory(stack)["volumes"]}
    group = admin(stack, "GET", "inventory")["volumeGroups"]
    group = next(g for g in group if g["id"] == summary["volume_group_id"])
    assert sorted(group["volumeIds"]) == sorted(d["volume_id"] for d in summary["disks"])
    for disk, guest in zip(summary["disks"], machine_imports["guests"]):
        volume = volumes[disk["volume_id"]]
        assert volume["freeformTags"]["import-disk"] == str(disk["position"])
        compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(guest.path),
                                   volume["backingFile"]], capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        reported = {c["location"]: (c["filesystem"], c["status"]) for c in disk["filesystems"]}
        expected = {e.location: (e.filesystem, e.status) for e in guest.expected}
        assert {k: reported.get(k) for k in expected} == expected, disk["filesystems"]
    assert all(d["digest_checked"] for d in summary["disks"]) == (case != "manifest")
    # each disk's own steps, one after another; the machine's steps count the disks' writes once,
    # as the time they took side by side, which overlapped
    for disk in summary["disks"]:
        assert list(disk["steps"]) == ["write", "check-volume", "detach"], disk["steps"]
        assert disk["seconds"] == pytest.approx(sum(disk["steps"].values()), abs=0.01)
    assert not set(summary["steps"]) & {"write", "check-volume", "detach"}, summary["steps"]
    side_by_side = [d["seconds"] for d in summary["disks"]]
    assert max(side_by_side) - 0.01 <= summary["steps"]["write-disks"] < sum(side_by_side), summary["steps"]
    assert resources_of(stack, machine_imports["cases"][case]["etag"])["instances"] == []


@pytest.mark.parametrize("case,code,named", [("digest", "ova-digest-mismatch", "'web-01-disk2.vmdk'"),
                                             ("hostile", "backing_file", "disk 2 (web-01-disk2.qcow2)")])
def test_a_machine_with_a_bad_disk_fails_naming_it_and_leaves_nothing(case, code, named, machine_imports, stack):
    item = machine_imports["cases"][case]
    state = item["final"].state
    assert state.is_failed(), f"{case}: {state.name}"
    assert f"ImageRejected: {code}: " in (state.message or "") and named in (state.message or ""), state.message
    assert resources_of(stack, item["etag"]) == {"instances": [], "volumes": []}
    if case == "hostile":  # refused from the headers: nothing was ever created
        ever = admin(stack, "GET", "inventory?all=true")
        assert not [r for kind in ("instances", "volumes") for r in ever[kind]
                    if r["freeformTags"].get("import-etag") == item["etag"]]


def test_a_machine_import_killed_mid_write_finishes_by_itself_with_one_set_of_volumes(machine_imports, stack):
    from tests.e2e.test_end_to_end import killed_mid_task_finishes_by_itself

    admin(stack, "POST", "bandwidth", {"objectReadBytesPerSecondPerConnection": 256 * 1024})
    etag, run = run_import(stack, machine_imports["ova"], "machines/killed/web-01.ova", deployment=MACHINE)
    final = killed_mid_task_finishes_by_itself(stack, run.id, "write-disk")
    assert final.state.is_completed(), final.state.message
    summary = demo.run_result(stack, final)
    after = resources_of(stack, etag)
    assert after["instances"] == []
    assert sorted(v["id"] for v in after["volumes"]) == sorted(d["volume_id"] for d in summary["disks"])
    assert len(after["volumes"]) == 3


def test_a_machine_imported_again_reuses_its_volumes_and_group(machine_imports, stack):
    first = demo.run_result(stack, machine_imports["cases"]["ova"]["final"])
    etag = machine_imports["cases"]["ova"]["etag"]
    run = demo.start_import(stack, "machines/ova/web-01.ova", bucket=MANUAL_BUCKET, deployment=MACHINE, etag=etag)
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    again = demo.run_result(stack, final)
    assert again["reused"] is True and again["volume_group_id"] == first["volume_group_id"]
    assert [d["volume_id"] for d in again["disks"]] == [d["volume_id"] for d in first["disks"]]
    assert all(d["reused"] for d in again["disks"])
    assert sorted(v["id"] for v in resources_of(stack, etag)["volumes"]) == \
        sorted(d["volume_id"] for d in first["disks"])


# -- The way back and sideways: the manifest's machine (real guest layouts, LVM included) exported
# to image objects and imported again, and copied to the second region, through the deployments.

EXPORT = "export-volume/default"
COPY = "copy-to-region/default"


def run_deployment(stack: dict[str, str], deployment: str, timeout: float = 900, **parameters: Any) -> Any:
    """Start a deployment by hand, as ``prefect deployment run`` does; the ended run."""
    from prefect.deployments import run_deployment as start

    with local_stack.prefect_api(stack["PREFECT_API_URL"]):
        run = start(deployment, parameters=parameters, timeout=0)
    return demo.wait_for_run(stack, run.id, timeout=timeout)


def same_volume(stack: dict[str, str], a: str, b: str) -> tuple[bool, str]:
    files = {v["id"]: v["backingFile"] for v in live_inventory(stack)["volumes"]}
    done = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", files[a], files[b]],
                          capture_output=True, text=True)
    return done.returncode == 0, done.stdout + done.stderr


def test_a_machine_exported_to_images_imports_again_bit_exact(machine_imports, stack):
    source = demo.run_result(stack, machine_imports["cases"]["manifest"]["final"])
    exported_run = run_deployment(stack, EXPORT, bucket=MANUAL_BUCKET, volume_group_id=source["volume_group_id"],
                                  format="qcow2", prefix="exports/")
    assert exported_run.state.is_completed(), exported_run.state.message
    exported = demo.run_result(stack, exported_run)
    assert exported["manifest"] == "exports/db-01.machine.json"
    assert [d["object"] for d in exported["disks"]] == [f"exports/db-01-disk{i}.qcow2" for i in range(3)]
    assert [d["volume_id"] for d in exported["disks"]] == [d["volume_id"] for d in source["disks"]]
    assert not [i for i in live_inventory(stack)["instances"] if i["freeformTags"].get("import-id")
                == exported["export_id"]]

    again_run = run_deployment(stack, MACHINE, bucket=MANUAL_BUCKET, object_name=exported["manifest"])
    assert again_run.state.is_completed(), again_run.state.message
    again = demo.run_result(stack, again_run)
    assert again["machine"]["name"] == "db-01"
    for before, after in zip(source["disks"], again["disks"]):
        ok, detail = same_volume(stack, before["volume_id"], after["volume_id"])
        assert ok, detail


def test_a_machine_copied_to_the_second_region_restores_with_identical_volumes(machine_imports, stack):
    source = demo.run_result(stack, machine_imports["cases"]["manifest"]["final"])
    final = run_deployment(stack, COPY, destination_region="local-2", volume_group_id=source["volume_group_id"])
    assert final.state.is_completed(), final.state.message
    copied = demo.run_result(stack, final)
    assert copied["destination_region"] == "local-2" and copied["machine"] == "db-01"
    inventory = live_inventory(stack)
    regions = {v["id"]: v.get("region") for v in inventory["volumes"]}
    group = next(g for g in inventory["volumeGroups"] if g["id"] == copied["volume_group_id"])
    assert group.get("region") == "local-2" and group["displayName"] == "db-01"
    assert sorted(group["volumeIds"]) == sorted(d["volume_id"] for d in copied["disks"])
    for before, after in zip(source["disks"], copied["disks"]):
        assert after["source_volume_id"] == before["volume_id"] and regions[after["volume_id"]] == "local-2"
        ok, detail = same_volume(stack, before["volume_id"], after["volume_id"])
        assert ok, detail
    backups = inventory["volumeBackups"] + inventory["bootVolumeBackups"]
    assert not [b for b in backups if b["displayName"].startswith(f"copy-{copied['copy_id'][:12]}")]
