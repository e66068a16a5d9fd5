"""The worker pool's SSH keys, kept as Prefect secret blocks (encrypted in Prefect's database)
until the import that takes a pooled VM takes them out (diskimport/pool.py)."""

from __future__ import annotations

import json

from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from diskimport.pool import KEY_PREFIX


class SecretBlockKeys:
    """:class:`diskimport.pool.KeyStore` on Prefect ``Secret`` blocks named ``import-pool-<token>``."""

    def put(self, name: str, value: str) -> None:
        Secret(value=value).save(name, overwrite=True)

    def get(self, name: str) -> str | None:
        try:
            value = Secret.load(name).get()
        except (ValueError, ObjectNotFound):
            return None
        return value if isinstance(value, str) else json.dumps(value)  # Secret.get() parses JSON

    def names(self) -> list[str]:
        with get_client(sync_client=True) as client:
            documents = client.read_block_documents_by_type("secret", include_secrets=False)
        return [d.name for d in documents if d.name and d.name.startswith(KEY_PREFIX)]

    def delete(self, name: str) -> None:
        try:
            Secret.delete(name)
        except (ValueError, ObjectNotFound):
            pass
