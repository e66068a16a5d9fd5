"""Every supported format and partition table imports, and the volume reads back as the source."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from deployments import demo
from tests.e2e.conftest import Disk, image_of, live_inventory, run_import

CASES = {
    # name: (format, qemu-img -o options, partition table)
    "qcow2-gpt": ("qcow2", None, "gpt"),
    "vmdk-monolithicsparse-dos": ("vmdk", "subformat=monolithicSparse", "dos"),
    "vmdk-streamoptimized-gpt": ("vmdk", "subformat=streamOptimized", "gpt"),
    "vhdx-dos": ("vhdx", None, "dos"),
    "vpc-gpt": ("vpc", None, "gpt"),
    "vdi-dos": ("vdi", None, "dos"),
    "raw-gpt": ("raw", None, "gpt"),
}
SUFFIX = {"qcow2": "qcow2", "vmdk": "vmdk", "vhdx": "vhdx", "vpc": "vhd", "vdi": "vdi", "raw": "raw"}


@pytest.fixture(scope="module")
def imports(stack: dict[str, str], disks: dict[str, Disk], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Start every case at once through the one stack, then wait for all of them."""
    tmp = tmp_path_factory.mktemp("images")
    started = {}
    for case, (fmt, options, table) in CASES.items():
        image = image_of(disks[table], fmt, tmp / f"{case}.{SUFFIX[fmt]}", options)
        object_name = f"formats/{case}.{SUFFIX[fmt]}"
        etag, run = run_import(stack, image, object_name)
        started[case] = {"image": image, "etag": etag, "run": run, "object": object_name, "table": table}
    for case, item in started.items():
        run = demo.wait_for_run(stack, item["run"].id, timeout=900)
        item["final"] = run
        item["summary"] = demo.run_result(stack, run)
    return started


@pytest.mark.parametrize("case", list(CASES))
def test_image_imports_and_volume_holds_the_source_disk(case: str, imports: dict[str, Any], stack, disks) -> None:
    item = imports[case]
    run = item["final"]
    assert run.state.is_completed(), f"{case}: {run.state.name}: {run.state.message}"
    summary = item["summary"]
    assert summary["format"] == CASES[case][0]
    volume = next(v for v in live_inventory(stack)["volumes"] if v["id"] == summary["volume_id"])
    assert volume["freeformTags"]["import-state"] == "imported"
    assert volume["freeformTags"]["import-etag"] == item["etag"]
    assert volume["vpusPerGB"] == 10
    # The volume's bytes are the source disk's guest-visible bytes (and zeros beyond).
    source_raw: Path = disks[item["table"]].raw
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source_raw),
                               volume["backingFile"]], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    checks = {c["filesystem"]: c["status"] for c in summary["filesystems"]}
    assert checks == {"ext4": "clean", "xfs": "clean", "vfat": "clean"}


def test_no_worker_attachment_or_par_is_left(imports: dict[str, Any], stack) -> None:
    inventory = live_inventory(stack)
    assert inventory["instances"] == []
    assert inventory["attachments"] == []
    assert inventory["pars"] == []


def test_reimport_of_same_etag_returns_existing_volume(imports: dict[str, Any], stack) -> None:
    item = imports["qcow2-gpt"]
    volumes_before = {v["id"] for v in live_inventory(stack)["volumes"]}
    run = demo.start_import(stack, item["object"], etag=item["etag"])
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_completed(), final.state.message
    result = demo.run_result(stack, final)
    assert result["reused"] is True and result["volume_id"] == item["summary"]["volume_id"]
    assert {v["id"] for v in live_inventory(stack)["volumes"]} == volumes_before
