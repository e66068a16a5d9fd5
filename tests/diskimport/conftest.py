from __future__ import annotations

from pathlib import Path

import pytest

from diskimport.sample_disk import build_disk

FILES = {"a.txt": b"alpha\n", "b.bin": bytes(range(256)) * 1024}


@pytest.fixture(scope="session")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("core") / "gpt.raw"
    build_disk(raw, FILES, table="gpt")
    return raw
