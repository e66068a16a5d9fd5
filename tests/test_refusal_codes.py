"""Every refusal code the product can raise is in the registry (:mod:`diskimport.refusals`),
every registered code is raised somewhere, and every one is in ``docs/refusals.md``.

The codes are found by reading the source, not by running it: each call of a refusal class
(a subclass of :class:`~diskimport.contract.Refusal`, the worker programs' ``Refused``, the
trigger's ``Decision("refused", ...)``) and the code it is given, followed back through
the variables and parameters it comes from to the literals written at their call sites.
A code the reading cannot follow to a literal must be one of :data:`PASS_THROUGH`, else
the test fails naming the place: a new way to make a code is a decision, not an accident.
oslo.utils' safety check names are read from its ``format_inspector`` the same way.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from diskimport import refusals
from diskimport.images.inspection import INSPECTOR_TO_QEMU

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("diskimport", "flows", "blocks", "function_trigger")
DOCS = ROOT / "docs" / "refusals.md"

# The worker programs run alone on the worker VM (no diskimport there): their refusals are an
# exception of their own, whose code they report in a "failed" event, and which
# diskimport.worker_vm.transfer turns into an ImageRejected with that code.
WORKER_REFUSED = "Refused"
WORKER_REFUSED_AS = "ImageRejected"

# Code expressions that are not literals, each with where its codes are found instead.
PASS_THROUGH = {
    "exc.code": "a refusal caught and raised or answered again with its own code",
    "str(failed['code'])": "a worker program's code, read from its event: its raise sites are scanned",
    "iter(exc.failures)": "oslo's failed safety checks by name: read from oslo's source",
}


@dataclass(frozen=True)
class Raised:
    """One code one place in the source raises, and the refusal class a user sees it as."""

    code: str
    refused_by: str | None
    place: str  # path:line


@dataclass(frozen=True)
class _Function:
    node: ast.FunctionDef | ast.AsyncFunctionDef
    path: Path
    method: bool  # called as obj.name(...): the first parameter is not passed positionally


def _call_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _argument(call: ast.Call, position: int | None, name: str) -> ast.expr | None:
    """The argument ``call`` passes for the parameter ``name`` at ``position`` (None: keyword-only)."""
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    positional = [a for a in call.args if not isinstance(a, ast.Starred)]
    return positional[position] if position is not None and position < len(positional) else None


def _code_argument(call: ast.Call) -> ast.expr | None:
    """The code a refusal class is called with; None when it is called with its message alone."""
    keywords = {k.arg for k in call.keywords}
    if "code" in keywords or len(call.args) > 1 or (call.args and "message" in keywords):
        return _argument(call, 0, "code")
    return None


class _Source:
    """The product's modules, parsed, with the functions each node is inside of."""

    def __init__(self, paths: list[Path]) -> None:
        self.trees = {path: ast.parse(path.read_text(), str(path)) for path in paths}
        self.enclosing: dict[ast.AST, _Function] = {}
        self.calls: list[tuple[Path, ast.Call]] = []
        for path, tree in self.trees.items():
            self._index(tree, path, None, in_class=False)

    def _index(self, node: ast.AST, path: Path, function: _Function | None, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = _Function(child, path, in_class and not any(
                    isinstance(d, ast.Name) and d.id == "staticmethod" for d in child.decorator_list))
            elif isinstance(child, ast.Call):
                self.calls.append((path, child))
            if function is not None:
                self.enclosing[child] = function
            self._index(child, path, inner, isinstance(child, ast.ClassDef))

    def place(self, path: Path, node: ast.AST) -> str:
        return f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"

    def classes(self) -> dict[str, ast.ClassDef]:
        return {node.name: node for tree in self.trees.values() for node in ast.walk(tree)
                if isinstance(node, ast.ClassDef)}


def _default_code(cls: ast.ClassDef) -> str | None:
    for statement in cls.body:
        if (isinstance(statement, ast.Assign) and [ast.unparse(t) for t in statement.targets] == ["default_code"]
                and isinstance(statement.value, ast.Constant)):
            return statement.value.value
    return None


class _Scan:
    """Follows each refusal's code expression back to the literals it can be."""

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.raised: list[Raised] = []
        self.unfollowed: list[str] = []  # path:line: expression
        self.code_parameters: set[tuple[int, str, str | None]] = set()  # (id of the def, parameter, class)
        self.pending: list[tuple[_Function, str, str | None]] = []

    def follow(self, expr: ast.expr, path: Path, refused_by: str | None) -> None:
        """Record the codes ``expr`` (a code argument in ``path``) can be."""
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            self.raised.append(Raised(expr.value, refused_by, self.source.place(path, expr)))
        elif isinstance(expr, ast.IfExp):
            self.follow(expr.body, path, refused_by)
            self.follow(expr.orelse, path, refused_by)
        elif isinstance(expr, ast.Call) and _call_name(expr) == "next" and len(expr.args) == 2:
            self.follow(expr.args[0], path, refused_by)
            self.follow(expr.args[1], path, refused_by)
        elif isinstance(expr, ast.Name) and self._follow_name(expr, path, refused_by):
            pass
        elif ast.unparse(expr) not in PASS_THROUGH:
            self.unfollowed.append(f"{self.source.place(path, expr)}: {ast.unparse(expr)}")

    def _follow_name(self, name: ast.Name, path: Path, refused_by: str | None) -> bool:
        """A variable: what the enclosing function assigns it, or, for a parameter, its default
        and what every call of the function passes. False when it is neither."""
        function = self.source.enclosing.get(name)
        if function is None:
            return False
        found = False
        for node in ast.walk(function.node):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name.id for t in targets):
                    self.follow(node.value, path, refused_by)
                    found = True
        arguments = function.node.args
        parameters = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        if any(p.arg == name.id for p in parameters):
            key = (id(function.node), name.id, refused_by)
            if key not in self.code_parameters:
                self.code_parameters.add(key)
                self.pending.append((function, name.id, refused_by))
            found = True
        return found

    def follow_parameters(self) -> None:
        """Each code parameter: its default, and the argument each call of its function passes."""
        while self.pending:
            function, parameter, refused_by = self.pending.pop()
            arguments = function.node.args
            positional = [*arguments.posonlyargs, *arguments.args]
            names = [p.arg for p in positional]
            defaults = dict(zip(names[len(names) - len(arguments.defaults):], arguments.defaults))
            defaults.update({p.arg: d for p, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None})
            if parameter in defaults:
                self.follow(defaults[parameter], function.path, refused_by)
            position = names.index(parameter) - function.method if parameter in names else None
            private = function.node.name.startswith("_")
            for path, call in self.source.calls:
                if _call_name(call) != function.node.name or (private and path != function.path):
                    continue
                argument = _argument(call, position, parameter)
                if argument is not None:
                    self.follow(argument, path, refused_by)


def scan_product() -> tuple[list[Raised], list[str]]:
    """Every code the product's source raises, and the code expressions it could not follow."""
    paths = sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py"))
    source = _Source(paths)
    classes = source.classes()
    refusal_classes = {"Refusal"}
    while True:
        grown = refusal_classes | {name for name, cls in classes.items()
                                   if {ast.unparse(b).rsplit(".", 1)[-1] for b in cls.bases} & refusal_classes}
        if grown == refusal_classes:
            break
        refusal_classes = grown
    assert WORKER_REFUSED in classes, (f"no class {WORKER_REFUSED} in {', '.join(PRODUCT)}: the worker programs' "
                                       "refusal has another name now; set WORKER_REFUSED to it")
    seen_as = {name: name for name in refusal_classes} | {WORKER_REFUSED: WORKER_REFUSED_AS}
    scan = _Scan(source)
    for path, call in source.calls:
        name = _call_name(call)
        if name in seen_as:
            code = _code_argument(call)
            if code is not None:
                scan.follow(code, path, seen_as[name])
            elif (default := _default_code(classes[name])) is not None:
                scan.raised.append(Raised(default, seen_as[name], source.place(path, call)))
            else:
                scan.unfollowed.append(f"{source.place(path, call)}: {name} without a code")
        elif name == "Decision" and ast.unparse(_argument(call, 0, "decision") or ast.Constant(None)) == "'refused'":
            code = _argument(call, 2, "code")
            if code is not None:
                scan.follow(code, path, None)
    scan.follow_parameters()
    return scan.raised, scan.unfollowed


def oslo_check_names() -> set[str]:
    """The safety checks oslo's inspectors of the accepted formats run, by name (a failed one is
    the refusal's code): read from format_inspector's source, as some are added while it parses."""
    spec = importlib.util.find_spec("oslo_utils.imageutils.format_inspector")
    assert spec is not None and spec.origin is not None
    module = ast.parse(Path(spec.origin).read_text())
    classes = {node.name: node for node in module.body if isinstance(node, ast.ClassDef)}

    def checks(cls: ast.ClassDef) -> set[str]:
        own = {call.args[0].value for call in ast.walk(cls) if isinstance(call, ast.Call)
               and _call_name(call) == "SafetyCheck" and call.args and isinstance(call.args[0], ast.Constant)}
        inherited = [checks(classes[b.id]) for b in cls.bases if isinstance(b, ast.Name) and b.id in classes]
        return own.union(*inherited)

    def name(cls: ast.ClassDef) -> object:
        return next((s.value.value for s in cls.body if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)
                     and [ast.unparse(t) for t in s.targets] == ["NAME"]), None)

    accepted = [cls for cls in classes.values() if name(cls) in INSPECTOR_TO_QEMU]
    assert {name(cls) for cls in accepted} == set(INSPECTOR_TO_QEMU), "an accepted format has no oslo inspector"
    return set().union(*(checks(cls) for cls in accepted))


@pytest.fixture(scope="module")
def scanned() -> tuple[dict[str, list[Raised]], list[str]]:
    raised, unfollowed = scan_product()
    by_code: dict[str, list[Raised]] = defaultdict(list)
    for site in raised:
        by_code[site.code].append(site)
    for name in oslo_check_names():
        by_code[name].append(Raised(name, "ImageRejected", "oslo.utils format_inspector"))
    return dict(by_code), unfollowed


def test_the_scan_finds_the_codes_it_must(scanned):
    by_code, _ = scanned
    assert len(by_code) >= 60
    for code, refused_by in [("object-not-found", "InvalidRequest"), ("ova-digest-mismatch", "ImageRejected"),
                             ("vmdk-stream-invalid", "ImageRejected"), ("invalid-ad-number", "InvalidRequest"),
                             ("tar-not-one-image", "ImageRejected"), ("worker-disk-full", "ImageRejected"),
                             ("invalid-event", "EventRefused"), ("object-gone", None),
                             ("backing_file", "ImageRejected"), ("mbr", "ImageRejected"),
                             ("machine-did-not-boot", "BootFailed")]:
        assert refused_by in {site.refused_by for site in by_code.get(code, [])}, code


def test_every_code_expression_is_followed_to_its_literals(scanned):
    _, unfollowed = scanned
    assert not unfollowed, ("these refusals' codes are not literals the scan can follow; write the code as a "
                            "literal (or a parameter given literals), or add the expression to PASS_THROUGH "
                            "saying where its codes are found:\n" + "\n".join(unfollowed))


def test_every_raised_code_is_registered(scanned):
    by_code, _ = scanned
    missing = [f"{code} ({', '.join(site.place for site in by_code[code])})"
               for code in sorted(by_code) if code not in refusals.CODES]
    assert not missing, "raised but not in diskimport/refusals.py:\n" + "\n".join(missing)


def test_every_registered_code_is_raised(scanned):
    by_code, _ = scanned
    stale = sorted(set(refusals.CODES) - set(by_code))
    assert not stale, "in diskimport/refusals.py but raised nowhere:\n" + "\n".join(stale)


def test_each_code_is_registered_with_the_class_that_raises_it(scanned):
    by_code, _ = scanned
    wrong = [f"{site.code}: {site.refused_by} at {site.place}, registered as {refusals.CODES[site.code].refused_by}"
             for sites in by_code.values() for site in sites
             if site.code in refusals.CODES and site.refused_by != refusals.CODES[site.code].refused_by]
    assert not wrong, "registered with another class than the one raised:\n" + "\n".join(wrong)


def test_every_registered_code_is_in_the_docs():
    page = DOCS.read_text()
    absent = [code for code in refusals.CODES if f"| `{code}` |" not in page]
    assert not absent, "not in docs/refusals.md:\n" + "\n".join(absent)
    assert page == refusals.markdown(), ("docs/refusals.md is not what the registry writes: "
                                         "uv run python -m diskimport.refusals docs/refusals.md")


def test_codes_are_kebab_case_or_oslo_names():
    oslo = oslo_check_names()
    odd = [code for code in refusals.CODES
           if code not in oslo and not all(part.isalnum() and part.islower() for part in code.split("-"))]
    assert not odd, "neither kebab-case nor an oslo check name:\n" + "\n".join(odd)
