"""Which failures count as a lost worker VM (the import starts again on a new one)."""

from __future__ import annotations

import socket

import paramiko
from paramiko.ssh_exception import NoValidConnectionsError

from diskimport.errors import FilesystemErrors, ImageRejected, is_worker_lost


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def test_ssh_refused_reset_or_cut_off_is_a_lost_worker():
    assert is_worker_lost(NoValidConnectionsError({("127.0.0.46", 22): ConnectionRefusedError()}))
    assert is_worker_lost(paramiko.SSHException("Error reading SSH protocol banner"))
    assert is_worker_lost(EOFError())
    assert is_worker_lost(ConnectionResetError())
    assert is_worker_lost(_caused(RuntimeError("the transfer ended"), BrokenPipeError()))
    assert is_worker_lost(OSError("Socket is closed"))  # paramiko, sending on a transport that died


def test_refusals_and_other_failures_are_not():
    assert not is_worker_lost(ImageRejected("backing_file", "names a backing file"))
    assert not is_worker_lost(_caused(FilesystemErrors("filesystem-errors", "ext4"), EOFError()))
    assert not is_worker_lost(ValueError("a bug"))
    assert not is_worker_lost(socket.gaierror())
