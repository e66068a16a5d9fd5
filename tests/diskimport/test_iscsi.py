"""iSCSI login/logout commands.

Named stand-in: no iSCSI target can run in this test environment (no kernel
initiator session is possible without the iscsi_tcp module and a target), so a
recording runner stands in for the worker and the test pins the exact iscsiadm
argument lists, their order, and the refusal when a step fails.
"""

from __future__ import annotations

from typing import Sequence

import pytest

from diskimport.worker_vm.commands import CommandFailed, CommandResult
from diskimport.worker_vm.iscsi import IscsiTarget, login, logout

TARGET = IscsiTarget("iqn.2015-12.com.oracleiaas:abc", "169.254.2.2", 3260)


class RecordingRunner:
    """Stand-in for a worker session: records argv, answers from a table."""

    def __init__(self, failing: str | None = None) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.failing = failing

    def run(self, argv: Sequence[str], *, timeout: float | None = None, on_output=None) -> CommandResult:
        argv = tuple(argv)
        self.calls.append(argv)
        code = 1 if self.failing and self.failing in argv else 0
        return CommandResult(argv, code, "", "iscsiadm: boom" if code else "")


def test_login_registers_the_node_logs_in_and_waits_for_the_by_path_device():
    runner = RecordingRunner()
    device = login(runner, TARGET)
    node = ("iscsiadm", "-m", "node", "-T", TARGET.iqn, "-p", "169.254.2.2:3260")
    assert runner.calls == [
        (*node, "-o", "new"),
        (*node, "-o", "update", "-n", "node.startup", "-v", "automatic"),
        (*node, "-l"),
        ("test", "-b", device),
    ]
    assert device == f"/dev/disk/by-path/ip-169.254.2.2:3260-iscsi-{TARGET.iqn}-lun-1"


def test_logout_logs_out_then_deletes_the_node():
    runner = RecordingRunner()
    logout(runner, TARGET)
    node = ("iscsiadm", "-m", "node", "-T", TARGET.iqn, "-p", "169.254.2.2:3260")
    assert runner.calls == [(*node, "-u"), (*node, "-o", "delete")]


def test_failed_login_raises_with_the_tool_output():
    with pytest.raises(CommandFailed, match="iscsiadm login.*boom"):
        login(RecordingRunner(failing="-l"), TARGET)
