"""The house rules the code's layout keeps, read from the source: no silenced type errors, no
module reaching for another's private names, flows that only order steps.

Each test names every offender, so a change that breaks a rule says where.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("diskimport", "flows", "blocks", "deployments", "function_trigger", "localoci", "tests")
# The flow modules: their functions order steps; the shared task factory, the reporting and
# Prefect's run queries are the modules beside them that do the rest.
FLOW_MODULES = ("import_disk.py", "import_machine.py", "export_volume.py", "copy_to_region.py", "sweep.py")
MAX_FLOW_FUNCTION_LINES = 40


def python_files() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_the_tree_has_python_files_to_read():
    files = python_files()
    assert len(files) > 100 and ROOT / "diskimport" / "run.py" in files


def test_no_type_error_is_silenced():
    marker = "type: " + "ignore"  # spelled apart, so this file is not an offender itself
    offenders = [f"{path.relative_to(ROOT)}:{number}" for path in python_files()
                 for number, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert offenders == []


def private_imports(path: Path) -> list[str]:
    """``from x import _name`` and ``import x._name`` statements of one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            found += [f"{node.module}.{alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names
                      if any(part.startswith("_") and not part.startswith("__") for part in alias.name.split("."))]
    return found


def private_reach_ins(path: Path) -> list[str]:
    """``module._name`` where ``module`` is one of this project's modules the file imported."""
    tree = ast.parse(path.read_text(), str(path))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.asname or alias.name for alias in node.names if alias.name.startswith(PACKAGES)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGES):
            modules |= {alias.asname or alias.name for alias in node.names if alias.name[:1].islower()}
    return [f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
            and node.attr.startswith("_") and not node.attr.startswith("__")]


def test_no_module_imports_another_modules_private_names():
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in python_files() for name in private_imports(path)]
    assert offenders == []


def test_no_module_reaches_into_another_modules_private_names():
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in python_files() for name in private_reach_ins(path)]
    assert offenders == []


def test_the_private_name_checks_find_what_they_look_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom diskimport.run import _hidden\nfrom diskimport import cloud\n"
                      "import os.path\nfrom x import __version__\nos._exit(0)\ncloud._backoff()\n")
    assert private_imports(sample) == ["diskimport.run._hidden"]
    assert private_reach_ins(sample) == ["cloud._backoff"]


def test_every_flow_function_is_a_short_list_of_steps():
    long = []
    for name in FLOW_MODULES:
        path = ROOT / "flows" / name
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                lines = (body[-1].end_lineno or 0) - body[0].lineno + 1
                if lines >= MAX_FLOW_FUNCTION_LINES:
                    long.append(f"flows/{name}: {node.name} has {lines} lines")
    assert long == []


def test_flows_do_not_call_the_sdk():
    """The SDK is the core's: a flow that imports ``oci`` decides or does what a core step should."""
    offenders = []
    for path in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"flows/{path.name}: {m}" for m in modules if m == "oci" or m.startswith("oci.")]
    assert offenders == []


def test_the_flow_modules_named_here_exist():
    assert all((ROOT / "flows" / name).is_file() for name in FLOW_MODULES)
