"""The small fleet of ``make test``: ten uploads on PostgreSQL and two hosts while one host dies
mid-write and the core APIs throttle; nothing is lost, doubled or left behind."""

from __future__ import annotations

import os

import pytest

from deployments import fleet, local_stack


@pytest.mark.skipif(local_stack.postgres_bindir() is None, reason="Debian's postgresql is not installed")
def test_a_small_fleet_through_faults_loses_nothing_and_leaves_nothing(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("fleet")
    previous = os.environ.get("LOCAL_DIR")
    try:
        report = fleet.run(uploads=10, faults=["host", "throttle"], base=base, timeout=1200)
    finally:
        os.environ["LOCAL_DIR"] = str(base)
        local_stack.down(purge=True)
        if previous is None:
            os.environ.pop("LOCAL_DIR", None)
        else:
            os.environ["LOCAL_DIR"] = previous
    fleet.print_report(report)
    assert report["lost_uploads"] == [], report
    assert report["duplicate_volumes"] == 0, report
    assert not any(report["left_after_sweep"].values()), report
    assert set(report["failed"]) <= {"backing_file"}, report  # the hostile upload, refused by its header
    assert " killed (" in report["faults"]["host"], report["faults"]
    # the dead host's runs were found by their silence (heartbeat automation), retried, and finished
    assert report["crashed_by_silence"] >= 1, report
    assert report["ok"]
