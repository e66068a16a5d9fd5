"""The SSH session to a worker VM (fabric), with the worker's host key pinned.

The host key is generated for the run and injected through cloud-init, so the client
knows it before the first connection: an unknown host key is never accepted.
Commands are argument lists, quoted with :func:`shlex.join`; nothing is pasted into a
shell string.
"""

from __future__ import annotations

import shlex
import threading
import time
from typing import Sequence

import fabric
import paramiko

from .commands import CommandFailed, CommandResult, LineCallback, LineSplitter
from ..keys import SshKeyPair


class WorkerUnreachable(Exception):
    """The worker did not accept an SSH session with the pinned host key in time."""


class WorkerSession:
    def __init__(self, address: str, port: int, user: str, client_key: SshKeyPair, host_key: SshKeyPair,
                 sudo: bool = False, connect_timeout: float = 10.0) -> None:
        self.address = address
        self.port = port
        self.user = user
        self.sudo = sudo
        self._client_key = client_key
        self._host_key = host_key
        self._connect_timeout = connect_timeout
        self._conn: fabric.Connection | None = None
        # Several writes may share one session: commands open channels of their own, but the
        # connection and its one SFTP channel are made and used one thread at a time.
        self._lock = threading.RLock()

    def _connection(self) -> fabric.Connection:
        with self._lock:
            return self._connection_locked()

    def _connection_locked(self) -> fabric.Connection:
        if self._conn is None:
            conn = fabric.Connection(
                self.address, user=self.user, port=self.port, connect_timeout=self._connect_timeout,
                connect_kwargs={"pkey": self._client_key.pkey(), "look_for_keys": False, "allow_agent": False},
                config=fabric.Config(overrides={"run": {"in_stream": False}, "load_ssh_configs": False}),
            )
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
            pinned = self._host_key.pkey()
            host = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
            conn.client.get_host_keys().add(host, pinned.get_name(), pinned)
            self._conn = conn
        return self._conn

    def connect(self, timeout: float = 300.0) -> None:
        """Open the session, retrying while the worker boots; refuse any other host key."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._connection().open()
                return
            except paramiko.BadHostKeyException:
                raise
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if "known_hosts" in str(exc):  # RejectPolicy: the host presented an unpinned key
                    raise
                last = exc
            self.close()
            time.sleep(1.0)
        raise WorkerUnreachable(f"no SSH session to {self.user}@{self.address}:{self.port} within {timeout:.0f}s: {last}")

    def run(self, argv: Sequence[str], *, timeout: float | None = None,
            on_output: LineCallback | None = None) -> CommandResult:
        command = shlex.join(argv)
        if self.sudo:
            command = "sudo -n " + command
        kwargs = {"hide": True, "warn": True, "timeout": timeout}
        if on_output is not None:
            kwargs["out_stream"] = LineSplitter(on_output)
        result = self._connection().run(command, **kwargs)
        return CommandResult(tuple(argv), result.exited, result.stdout, result.stderr)

    def read_bytes(self, argv: Sequence[str], *, timeout: float | None = None) -> bytes:
        """A command's standard output as bytes, read in large pieces on a channel of its own.

        ``run`` suits text: fabric reads output a kilobyte at a time, which takes seconds
        for the megabytes of a disk's head; this reads what the channel holds at once.
        """
        command = shlex.join(argv)
        if self.sudo:
            command = "sudo -n " + command
        transport = self._connection().client.get_transport()
        if transport is None or not transport.is_active():
            self._connection().open()
            transport = self._connection().client.get_transport()
        channel = transport.open_session()
        try:
            channel.settimeout(timeout)
            channel.exec_command(command)
            chunks = []
            while data := channel.recv(1 << 20):
                chunks.append(data)
            stderr = channel.makefile_stderr("rb").read().decode("utf-8", "replace")
            status = channel.recv_exit_status()
        finally:
            channel.close()
        if status != 0:
            raise CommandFailed(CommandResult(tuple(argv), status, "", stderr))
        return b"".join(chunks)

    def put_private_file(self, content: str | bytes, remote_path: str) -> None:
        """Write a file only the worker user can read (for secrets such as a PAR URL)."""
        self.write_private_ranges(remote_path, [(0, content.encode() if isinstance(content, str) else content)])

    def write_private_ranges(self, remote_path: str, pieces: Sequence[tuple[int, bytes]]) -> None:
        """Create a file only the worker user can read, holding ``pieces`` at their offsets."""
        with self._lock:
            sftp = self._connection().sftp()
            with sftp.open(remote_path, "w") as f:
                f.chmod(0o600)
                f.set_pipelined(True)
                for offset, data in pieces:
                    f.seek(offset)
                    f.write(data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "WorkerSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
