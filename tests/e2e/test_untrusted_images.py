"""End to end through the deployed flow: untrusted images and object names. A module of its own,
so a test worker runs it beside the others, on the session's shared stack."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from deployments import demo, local_stack
from tests.diskimport import test_hostile_images as hostile
from tests.e2e.conftest import admin, image_of, live_inventory, run_import


# -- Untrusted images: each hostile image fails its run with its own reason, before any
# resource exists, and a nested image is caught after the write.

@pytest.fixture(scope="module")
def hostile_runs(stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    started = {}
    for case, (build, code) in hostile.CORPUS.items():
        path, claimed = build(tmp_path_factory.mktemp(case))
        object_name = f"hostile/{case}/{path.name}"
        etag, run = run_import(stack, path, object_name, {"format": claimed} if claimed else None)
        started[case] = {"etag": etag, "run": run, "code": code}
    for item in started.values():
        item["final"] = demo.wait_for_run(stack, item["run"].id)
    return started


@pytest.mark.parametrize("case", list(hostile.CORPUS))
def test_hostile_upload_fails_its_run_with_its_code_and_creates_nothing(case, hostile_runs, stack):
    item = hostile_runs[case]
    state = item["final"].state
    assert state.is_failed(), f"{case}: {state.name}"
    assert f"ImageRejected: {item['code']}: " in (state.message or ""), state.message
    with local_stack.prefect_api(stack["PREFECT_API_URL"]), get_client(sync_client=True) as client:
        summaries = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["import-refused"]), flow_run_id=ArtifactFilterFlowRunId(any_=[item["run"].id])))
    assert [f"code: `{item['code']}`" in str(a.data) for a in summaries] == [True]
    ever = admin(stack, "GET", "inventory?all=true")
    assert not [r for kind in ("instances", "volumes") for r in ever[kind]
                if r["freeformTags"].get("import-etag") == item["etag"]]


def test_nested_image_is_refused_after_the_write_and_cleaned_up(stack, tmp_path):
    inner = tmp_path / "inner.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(inner), "1G"], check=True, capture_output=True)
    outer = tmp_path / "outer.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(inner), str(outer)], check=True)
    etag, run = run_import(stack, outer, "hostile/nested.qcow2")
    final = demo.wait_for_run(stack, run.id)
    assert final.state.is_failed() and "nested-image: " in (final.state.message or ""), final.state.message
    left = live_inventory(stack)
    assert not [r for kind in ("instances", "volumes") for r in left[kind]
                if r["freeformTags"].get("import-etag") == etag]


def test_hostile_object_names_import_and_run_no_other_command(stack, disks, tmp_path):
    image = image_of(disks["gpt"], "qcow2", tmp_path / "disk.qcow2")
    marker = tmp_path / "pwned"
    names = [
        "it's \"quoted\".qcow2",
        f"semi;colon; touch {marker};.qcow2",
        f"$(touch {marker}).qcow2",
        f"`touch {marker}`.qcow2",
        "back\\slash\\name.qcow2",
        "percent%20%2e%2E%25.qcow2",
        "ünïcødé 日本語 disk.qcow2",
        "  leading and trailing spaces  .qcow2",
    ]
    started = {name: run_import(stack, image, name) for name in names}
    for name, (etag, run) in started.items():
        final = demo.wait_for_run(stack, run.id)
        assert final.state.is_completed(), f"{name!r}: {final.state.message}"
        summary = demo.run_result(stack, final)
        assert summary["object"] == name
        volume = next(v for v in live_inventory(stack)["volumes"] if v["id"] == summary["volume_id"])
        assert volume["freeformTags"]["import-object"] == name
    assert not marker.exists(), "an object name was executed as a command"
