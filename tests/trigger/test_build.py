"""The function as it is deployed: its build directory started on its own with the FDK (the
repository not importable), answering real Object Storage events over the FDK's socket;
and the dependency arrow: the core imports nothing of the function."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from function_trigger import local_runner
from function_trigger.build import FILES, MARKER, build
from tests.conftest import ROOT
from tests.trigger.conftest import event, put, runs_for

TIMEOUT = 60.0
# Started as the function process's first statement: it exits before serving if the repository is importable.
NOT_THE_REPOSITORY = ("import importlib.util, sys\n"
                      "if importlib.util.find_spec('diskimport') or importlib.util.find_spec('function_trigger'):\n"
                      "    sys.exit('the repository is importable in the function process')\n")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_core_imports_nothing_of_the_function():
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "diskimport").rglob("*.py"))
                 for name in sorted(imported_modules(path)) if name.split(".")[0] == "function_trigger"]
    assert offenders == []


def test_the_contract_uses_the_standard_library_only():
    outside = {name for name in imported_modules(ROOT / "diskimport" / "contract.py")
               if name.split(".")[0] not in sys.stdlib_module_names | {"__future__"}}
    assert outside == set()


def test_the_build_directory_holds_the_function_and_the_contract(tmp_path):
    out = build(tmp_path / "function")
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "contract.py", MARKER])
    assert (out / "contract.py").read_text() == (ROOT / "diskimport" / "contract.py").read_text()
    (out / "options.py").write_text("# left over from an older build\n")
    assert not (build(out) / "options.py").exists()  # a rebuild replaces the directory
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a build")
    with pytest.raises(FileExistsError):
        build(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()


@pytest.fixture(scope="module")
def function_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("build") / "function")


def test_the_function_process_cannot_import_the_repository(function_dir, tmp_path):
    command, env = local_runner.function_process(function_dir, tmp_path, {})
    found = subprocess.run([*command, "-c", "import diskimport"], env=env, cwd=function_dir, capture_output=True,
                           text=True)
    assert found.returncode != 0 and "No module named 'diskimport'" in found.stderr
    found = subprocess.run([*command, "-c", "import contract, trigger; print(trigger.parse_options.__module__)"],
                           env=env, cwd=function_dir, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "contract"  # the trigger took the contract beside it


@pytest.fixture
def standalone(function_dir, config, tmp_path, monkeypatch) -> Iterator[tuple[httpx.Client, Path]]:
    """The built function served by the FDK in its own isolated Python; yields a client of its
    socket and the function's log."""
    monkeypatch.setattr(local_runner, "FDK_MAIN", NOT_THE_REPOSITORY + local_runner.FDK_MAIN)
    log = tmp_path / "function.log"
    with open(log, "wb") as output:
        proc, socket = local_runner.start_fdk(function_dir, tmp_path / "fn", config, output)
    client = local_runner.socket_client(socket, TIMEOUT)
    try:
        yield client, log
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)


def log_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("prefect_api", ["sqlite"], indirect=True)  # the database is not what this tests
def test_the_built_function_answers_events_on_its_own(standalone, prefect_api, localoci, object_storage, bucket):
    client, log = standalone
    bad = f"{uuid.uuid4().hex}.qcow2"
    raw = event(localoci.namespace, bucket, bad, put(object_storage, localoci, bucket, bad, {"ad_number": "7"}))
    # Invoked as Events invokes it, the FDK answers a 400 as 200 (it passes 200, 502, 504 only) ...
    status, body = local_runner.call(client, raw, TIMEOUT)
    answer = json.loads(body)
    assert (status, answer["decision"], answer["code"]) == (200, "refused", "invalid-ad-number"), answer
    # ... through API Gateway the function's own status arrives.
    status, body = local_runner.call(client, raw, TIMEOUT, headers={"Fn-Intent": "httprequest"})
    assert (status, json.loads(body)["code"]) == (400, "invalid-ad-number")
    assert runs_for(prefect_api, {bad}) == []

    good = f"{uuid.uuid4().hex}.vmdk"
    etag = put(object_storage, localoci, bucket, good, {"vpus": "20"})
    status, body = local_runner.call(client, event(localoci.namespace, bucket, good, etag), TIMEOUT)
    answer = json.loads(body)
    assert (status, answer["decision"], answer["created"]) == (200, "started", True), answer
    [run] = runs_for(prefect_api, {good})
    assert run["id"] == answer["flow_run_id"]
    assert run["idempotency_key"] == f"{localoci.namespace}/{bucket}/{good}@{etag}"
    assert run["parameters"]["vpus"] == 20

    logged = {line["object"].rsplit("/", 1)[-1]: line for line in log_lines(log)}
    assert logged[bad]["code"] == "invalid-ad-number" and logged[good]["flow_run_id"] == run["id"]


@pytest.mark.parametrize("prefect_api", ["sqlite"], indirect=True)  # the function calls no API here: one server
def test_the_function_starts_again_where_a_killed_one_left_its_sockets(function_dir, config, tmp_path):
    sockets = tmp_path / "fn"
    first, _ = local_runner.start_fdk(function_dir, sockets, config, subprocess.DEVNULL)
    first.kill()
    first.wait(timeout=10)
    assert list(sockets.glob("*.sock"))  # what a killed FDK leaves
    again, socket = local_runner.start_fdk(function_dir, sockets, config, subprocess.DEVNULL)
    try:
        assert socket.exists() and again.poll() is None
    finally:
        again.terminate()
        again.wait(timeout=10)
