"""End to end through the deployed flow: disks laid out like real guests (tests/guest_disks.py) in
several formats and containers. A module of its own, so a test worker runs it beside the others,
on the session's shared stack; whole machines are in test_machines.py."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from deployments import demo
from tests import guest_disks
from tests.e2e.conftest import SUFFIX, Disk, image_of, live_inventory, resources_of, run_import


# The module fixture's slow part (every guest layout built and imported) runs once, within the first
# test's time budget: under the whole suite on two cores it has taken about 8 minutes.
pytestmark = pytest.mark.timeout(1800)

# -- Disks laid out like real guests go end to end in several formats: the good ones bit-exact
# with every place reported as the check of the disk alone reports it, the damaged ones
# failing with the place named and nothing left behind.

GUESTS: dict[str, tuple[Callable[[Path], guest_disks.GuestDisk], str, str | None]] = {
    "oracle-linux-qcow2": (guest_disks.oracle_linux, "qcow2", None),
    "oracle-linux-fixed-vhd": (guest_disks.oracle_linux, "vpc", "subformat=fixed"),
    "windows-vhdx": (guest_disks.windows, "vhdx", None),
    "windows-stream-vmdk": (guest_disks.windows, "vmdk", "subformat=streamOptimized"),
    "btrfs-root-vdi": (guest_disks.btrfs_root, "vdi", None),
    "whole-device-ext4-raw": (guest_disks.whole_device_ext4, "raw", None),
    "mbr-logical-qcow2": (guest_disks.mbr_logical, "qcow2", None),
    # compressed and packed uploads: decompressed on the worker as they stream in
    "oracle-linux-raw-zst": (guest_disks.oracle_linux, "raw", None),
    "windows-raw-gz": (guest_disks.windows, "raw", None),
    "btrfs-root-qcow2-xz": (guest_disks.btrfs_root, "qcow2", None),
    "whole-device-ext4-raw-tar-gz": (guest_disks.whole_device_ext4, "raw", None),
}
DAMAGED: dict[str, tuple[Callable[[Path], guest_disks.GuestDisk], str, str | None, str]] = {
    "oracle-linux-damaged-root-qcow2": (functools.partial(guest_disks.oracle_linux, damaged_root="agf"), "qcow2",
                                        None, "p3:ocivolume/root (xfs)"),
    "windows-damaged-ntfs-fixed-vhd": (functools.partial(guest_disks.windows, damaged_partition=2), "vpc",
                                       "subformat=fixed", "p2 (ntfs)"),
    "oracle-linux-damaged-root-raw-zst": (functools.partial(guest_disks.oracle_linux, damaged_root="agf"), "raw",
                                          None, "p3:ocivolume/root (xfs)"),
}
# How a case's image is uploaded when not as it is: the container after its name.
PACKED = {case: case.rsplit("-", 1)[1] for case in [*GUESTS, *DAMAGED] if case.endswith(("-zst", "-gz", "-xz"))}
PACKED["whole-device-ext4-raw-tar-gz"] = "tar.gz"


def packed(image: Path, container: str | None) -> Path:
    """``image`` compressed (zstd, gzip, xz) or in a tar.gz, as people upload disk dumps."""
    if container is None:
        return image
    if container == "tar.gz":
        target = image.with_name(image.name.rsplit(".", 1)[0] + ".tar.gz")
        subprocess.run(["tar", "-czf", str(target), "-C", str(image.parent), image.name], check=True)
        return target
    tool = {"zst": ["zstd", "-q", "-T0"], "gz": ["gzip", "-1"], "xz": ["xz", "-0", "-T0"]}[container]
    target = image.with_name(f"{image.name}.{container}")
    with open(target, "wb") as out:
        subprocess.run([*tool, "-c", str(image)], stdout=out, check=True)
    return target


@pytest.fixture(scope="module")
def guest_imports(stack, guests_built, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build each layout once, convert it, start every import at once, then wait for all."""
    tmp = tmp_path_factory.mktemp("guests")
    started = {}
    for case, (build, fmt, options, *_) in {**GUESTS, **DAMAGED}.items():
        disk = guests_built(build)
        image = packed(image_of(Disk(disk.path, "guest"), fmt, tmp / f"{case}.{SUFFIX[fmt]}", options),
                       PACKED.get(case))
        etag, run = run_import(stack, image, f"guests/{image.name}")
        started[case] = {"disk": disk, "etag": etag, "run": run}
    for item in started.values():
        item["final"] = demo.wait_for_run(stack, item["run"].id, timeout=900)
    return started


@pytest.mark.parametrize("case", list(GUESTS))
def test_a_guest_disk_imports_bit_exact_with_every_place_checked(case, guest_imports, stack):
    item = guest_imports[case]
    final = item["final"]
    assert final.state.is_completed(), f"{case}: {final.state.message}"
    summary = demo.run_result(stack, final)
    volume = next(v for v in live_inventory(stack)["volumes"] if v["id"] == summary["volume_id"])
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(item["disk"].path),
                               volume["backingFile"]], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    reported = {c["location"]: (c["filesystem"], c["status"]) for c in summary["filesystems"]}
    expected = {e.location: (e.filesystem, e.status) for e in item["disk"].expected}
    assert {k: reported.get(k) for k in expected} == expected, summary["filesystems"]


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_guest_disk_fails_naming_the_place_and_leaves_nothing(case, guest_imports, stack):
    item = guest_imports[case]
    state = item["final"].state
    assert state.is_failed(), f"{case}: {state.name}"
    assert "FilesystemErrors: filesystem-errors: " in (state.message or ""), state.message
    assert DAMAGED[case][3] in (state.message or ""), state.message
    assert resources_of(stack, item["etag"]) == {"instances": [], "volumes": []}
