"""Per-run SSH keys: the client key the worker accepts and the host key the client pins."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import paramiko
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


@dataclass(frozen=True)
class SshKeyPair:
    private_openssh: str
    public_openssh: str

    @classmethod
    def generate(cls) -> "SshKeyPair":
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        return cls(private.decode(), public.decode())

    def pkey(self) -> paramiko.PKey:
        return paramiko.Ed25519Key.from_private_key(io.StringIO(self.private_openssh))


def cloud_init_host_keys(host_key: SshKeyPair) -> str:
    """Launch ``user_data`` (base64 cloud-config) that installs ``host_key`` as the worker's host key."""
    doc = {
        "ssh_deletekeys": True,
        "ssh_keys": {"ed25519_private": host_key.private_openssh, "ed25519_public": host_key.public_openssh},
    }
    return base64.b64encode(("#cloud-config\n" + yaml.safe_dump(doc)).encode()).decode()
