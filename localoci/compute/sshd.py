"""A worker instance's body: a real OpenSSH ``sshd`` on the instance's loopback address.

Each instance gets a directory holding its host keys, ``authorized_keys`` (from the
launch metadata's ``ssh_authorized_keys``) and an ``sshd_config``. Host keys come from
the cloud-init ``ssh_keys`` of the launch ``user_data`` when present, so a client that
generated them can pin them; otherwise sshd gets fresh keys.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from ..errors import invalid_parameter

# cloud-init's ssh_keys names: <type>_private / <type>_public
HOST_KEY_TYPES = ("rsa", "ecdsa", "ed25519")


def sshd_binary() -> str:
    path = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(path):
        raise RuntimeError("OpenSSH sshd is not installed (Debian package openssh-server)")
    return path


def parse_user_data(user_data_b64: str | None) -> dict[str, Any]:
    """The cloud-config document in launch ``user_data`` (base64), or ``{}``."""
    if not user_data_b64:
        return {}
    try:
        text = base64.b64decode(user_data_b64, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_parameter("metadata.user_data must be base64-encoded text.") from None
    if not text.startswith("#cloud-config"):
        return {}
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise invalid_parameter(f"metadata.user_data is not valid cloud-config YAML: {exc}") from None
    return doc if isinstance(doc, dict) else {}


def host_keys_from_cloud_config(doc: dict[str, Any]) -> dict[str, str]:
    """``{type: private key PEM}`` from cloud-config ``ssh_keys``."""
    keys = doc.get("ssh_keys") or {}
    if not isinstance(keys, dict):
        raise invalid_parameter("cloud-config ssh_keys must be a mapping.")
    found = {}
    for key_type in HOST_KEY_TYPES:
        private = keys.get(f"{key_type}_private")
        if private:
            if "PRIVATE KEY" not in str(private):
                raise invalid_parameter(f"cloud-config ssh_keys.{key_type}_private is not a private key.")
            found[key_type] = str(private)
    return found


class SshdHost:
    """The sshd of one instance, rooted at ``directory``."""

    def __init__(self, directory: Path, address: str, port: int, user: str | None = None,
                 memory_gb: float | None = None) -> None:
        self.directory = Path(directory)
        self.address = address
        self.port = port
        self.user = user or getpass.getuser()
        self.memory_gb = memory_gb
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def pid_path(self) -> Path:
        return self.directory / "sshd.pid"

    @property
    def home(self) -> Path:
        return self.directory / "home"

    def prepare(self, authorized_keys: str, host_keys: dict[str, str], instance_id: str) -> None:
        """Write keys and config for a new instance."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not host_keys:
            key = self.directory / "ssh_host_ed25519_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            host_key_paths = [key]
        else:
            host_key_paths = []
            for key_type, pem in host_keys.items():
                key = self.directory / f"ssh_host_{key_type}_key"
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(pem if pem.endswith("\n") else pem + "\n")
                host_key_paths.append(key)
        (self.directory / "authorized_keys").write_text(authorized_keys.strip() + "\n" if authorized_keys.strip() else "")
        lines = [
            f"ListenAddress {self.address}:{self.port}",
            *[f"HostKey {p}" for p in host_key_paths],
            f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
            f"PidFile {self.pid_path}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",
            "MaxStartups 100:30:200",
            "MaxSessions 50",
            "ClientAliveInterval 15",
            "Subsystem sftp internal-sftp",
            # A fresh VM's home holds no shell start-up files: sessions must not run this host's.
            f"SetEnv LOCALOCI_INSTANCE_ID={instance_id} HOME={self.home}",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
        ]
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 15.0) -> None:
        """Start sshd and return once it accepts connections."""
        self.kill_stale()
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        log = open(self.directory / "sshd.log", "ab")
        argv = [sshd_binary(), "-D", "-f", str(self.config_path), "-E", str(self.directory / "sshd.log")]
        self.process = process = subprocess.Popen(
            self._own_memory(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not process:  # stop() ran meanwhile, on another thread
                raise RuntimeError("sshd was stopped while it started")
            if process.poll() is not None:
                raise RuntimeError(f"sshd exited with {process.returncode}: {self.log_tail()}")
            try:
                with socket.create_connection((self.address, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on {self.address}:{self.port} within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.directory / "sshd.log").read_text()[-2000:]
        except FileNotFoundError:
            return ""

    def _own_memory(self, argv: list[str]) -> list[str]:
        """Run ``argv`` with a /dev/shm of the instance's own, where the host allows it (root).

        A VM's memory (its tmpfs) dies with it: files a worker keeps there vanish when the
        instance crashes or is terminated, however its processes were killed. sshd runs in a
        mount namespace of its own with a fresh tmpfs, as large as the shape's memory, on
        /dev/shm; the namespace and the tmpfs go when its last process does.
        """
        if os.geteuid() != 0 or not shutil.which("unshare"):
            return argv
        size = f"{int(self.memory_gb)}g" if self.memory_gb else "50%"
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount -t tmpfs -o "size=$1,mode=1777" tmpfs /dev/shm && shift && exec "$@"',
                "sh", size, *argv]

    def stop(self) -> None:
        """Stop sshd and every session it spawned."""
        self._kill(signal.SIGTERM)

    def crash(self) -> None:
        """Kill sshd and its sessions at once, as a host failure would."""
        self._kill(signal.SIGKILL)

    def _kill(self, sig: signal.Signals) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            # sshd puts each connection in a session of its own, so a signal to its
            # process group misses them: find the whole tree first.
            tree = [proc.pid, *descendants(proc.pid)]
            for pid in tree:
                _signal(pid, sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _signal(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            for pid in descendants(proc.pid):
                _signal(pid, signal.SIGKILL)
            if sig == signal.SIGKILL:
                # A killed session may still be exiting (its memory, the instance's tmpfs, still
                # held) when the signal returns: the instance is down once every process has gone.
                _wait_gone(tree[1:], timeout=30)
        self.kill_stale()

    def kill_stale(self) -> None:
        """Kill an sshd that an earlier local OCI process left for this instance."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            cmdline = b""
        if str(self.config_path).encode() in cmdline:
            for victim in [pid, *descendants(pid)]:
                _signal(victim, signal.SIGKILL)
        self.pid_path.unlink(missing_ok=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None



def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` in the process tree."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has: it holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pids: list[int], timeout: float) -> None:
    """Wait until none of ``pids`` is alive (each was sent SIGKILL), at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    waiting = [pid for pid in pids if _alive(pid)]
    while waiting and time.monotonic() < deadline:
        time.sleep(0.01)
        waiting = [pid for pid in waiting if _alive(pid)]


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
