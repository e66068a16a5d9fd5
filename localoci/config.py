"""An OCI SDK/CLI configuration for the local OCI: an API signing key and a config file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PROFILE = "DEFAULT"
USER_ID = "ocid1.user.oc1..localoci"


def ensure_client_config(data_dir: Path, tenancy_id: str, region: str = "local-1") -> Path:
    """Write ``<data-dir>/oci/config`` and its key once; return the config path."""
    directory = Path(data_dir) / "oci"
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "oci_api_key.pem"
    config_path = directory / "config"
    if not key_path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.md5(der).hexdigest()
    fingerprint = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    text = (
        f"[{PROFILE}]\nuser={USER_ID}\nfingerprint={fingerprint}\ntenancy={tenancy_id}\n"
        f"region={region}\nkey_file={key_path}\n"
    )
    if not config_path.exists() or config_path.read_text() != text:
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return config_path
