"""iSCSI attachments: the worker logs in to the volume's target before the write and out after.

Paravirtualized attachments need none of this; an iSCSI attachment's device appears only
after ``iscsiadm`` logs in to the target the attachment names (``iqn``, ``ipv4``, ``port``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .commands import CommandFailed, CommandRunner


@dataclass(frozen=True)
class IscsiTarget:
    iqn: str
    ipv4: str
    port: int

    @property
    def portal(self) -> str:
        return f"{self.ipv4}:{self.port}"

    @property
    def device(self) -> str:
        """The stable by-path name of the target's first LUN."""
        return f"/dev/disk/by-path/ip-{self.portal}-iscsi-{self.iqn}-lun-1"


def _checked(runner: CommandRunner, argv: list[str], what: str) -> None:
    result = runner.run(argv)
    if result.returncode != 0:
        raise CommandFailed(result, what)


def login(runner: CommandRunner, target: IscsiTarget, timeout: float = 120.0) -> str:
    """Register the node, log in with automatic startup, wait for the device; return its path."""
    node = ["iscsiadm", "-m", "node", "-T", target.iqn, "-p", target.portal]
    _checked(runner, [*node, "-o", "new"], "iscsiadm node new")
    _checked(runner, [*node, "-o", "update", "-n", "node.startup", "-v", "automatic"], "iscsiadm node update")
    _checked(runner, [*node, "-l"], "iscsiadm login")
    deadline = time.monotonic() + timeout
    while runner.run(["test", "-b", target.device]).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"iSCSI device {target.device} did not appear within {timeout:.0f}s")
        time.sleep(1)
    return target.device


def logout(runner: CommandRunner, target: IscsiTarget) -> None:
    """Log out and forget the node (before the volume is detached)."""
    node = ["iscsiadm", "-m", "node", "-T", target.iqn, "-p", target.portal]
    _checked(runner, [*node, "-u"], "iscsiadm logout")
    _checked(runner, [*node, "-o", "delete"], "iscsiadm node delete")
