"""The worker's programs (diskimport.agent) as what a worker can run: Python 3.6 syntax, the
standard library only, small modules; and the archive shipped to it, run in isolated mode
(``python3 -I``: no project on the path, no environment) from outside the project.

No Python 3.6 runs here: its syntax is checked by the parser (``feature_version``), and what
its library lacks (``os.preadv``) by the decoding test that removes it (test_vmdk_stream).
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from diskimport.worker_vm.agent_archive import ARCHIVE_NAME, PACKAGE, agent_archive, build

MiB = 1024 * 1024
MODULES = sorted(PACKAGE.glob("*.py"))
MAX_LINES = 500


def test_the_package_has_the_programs_modules():
    names = {path.stem for path in MODULES}
    assert {"__init__", "__main__", "stream", "upload", "fetch", "window", "decompress", "vmdk", "device",
            "nbd", "events"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_every_module_parses_as_python_3_6(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 6))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_every_module_imports_only_the_standard_library_and_its_own_package(path):
    outside = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            outside += [alias.name for alias in node.names if alias.name.split(".")[0] not in sys.stdlib_module_names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module.split(".")[0] not in sys.stdlib_module_names:
                outside.append(node.module)
            if node.level > 1:  # above the package: not in the archive
                outside.append("." * node.level + (node.module or ""))
    assert not outside, f"{path.name} imports {outside}"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_every_module_is_under_500_lines(path):
    assert len(path.read_text().splitlines()) < MAX_LINES


def test_the_archive_is_the_same_bytes_for_the_same_sources_and_holds_every_module():
    assert agent_archive() is agent_archive()  # built once per process
    assert build() == agent_archive()
    with zipfile.ZipFile(io.BytesIO(agent_archive())) as archive:
        names = archive.namelist()
    assert names == ["__main__.py"] + [f"agent/{path.name}" for path in MODULES]


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / ARCHIVE_NAME
    path.write_bytes(agent_archive())
    return path


def isolated(archive: Path, *args: str, **kwargs: Any) -> subprocess.Popen:
    """``python3 -I`` running the archive, from a directory outside the project, with a bare environment."""
    return subprocess.Popen(["python3", "-I", str(archive), *args], cwd=archive.parent,
                            env={"PATH": os.environ["PATH"]}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def test_the_archive_runs_isolated_and_names_its_programs(archive):
    process = isolated(archive, "--help")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stream" in out and "upload" in out
    process = isolated(archive, "unknown", "config.json")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "usage" in err


def test_the_archives_upload_runs_isolated_and_refuses_a_config_without_its_endpoint(archive):
    config = archive.parent / "upload.json"
    config.write_text(json.dumps({"path": "/nonexistent"}))
    process = isolated(archive, "upload", str(config))
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert json.loads(out.splitlines()[-1]) == {"event": "failed", "code": "bad-config",
                                                "message": "the configuration has no endpoint"}


def test_the_archives_stream_runs_isolated_and_fetches_the_object(localoci, uploaded, image, staging, archive):
    config = Path(staging) / "stream.json"
    config.write_text(json.dumps({
        "url": uploaded["url"], "etag": uploaded["etag"], "size": uploaded["size"],
        "path": f"{staging}/image", "socket": f"{staging}/nbd.sock", "stop_file": f"{staging}/stop",
        "directory": staging, "connections": 2, "chunk_bytes": MiB}))
    process = isolated(archive, "stream", str(config))
    try:
        events = []
        for line in process.stdout:
            events.append(json.loads(line))
            if events[-1]["event"] in ("fetched", "failed"):
                break
        assert events[0]["event"] == "ready" and events[-1]["event"] == "fetched", events
        Path(staging, "stop").write_text("stop")
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
        process.communicate()
    assert Path(staging, "image").read_bytes() == image.read_bytes()
