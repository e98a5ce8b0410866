"""The audit event catalogue: every action the code records is catalogued with its ATNA form,
the trail refuses any other, and docs/audit-events.md cannot drift.

The code's call sites are found by walking the source: every ``AuditEvent(...)`` and the
action it is given, followed back through parameters, local names, constants and f-strings to
the literal strings that reach it.
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from imageshare.audit.events import CATALOGUE, PARTICIPANT_OBJECTS, markdown
from imageshare.audit.trail import AuditEvent
from imageshare.domain.actors import cli_actor
from imageshare.domain.errors import UnknownAuditEvent

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "imageshare"

# Route parameters checked against a fixed list before they reach an action (the walk cannot
# follow a value the framework passes in): (function, parameter) -> the values it may take.
ROUTE_VALUES = {("change_user", "change"): {"disable", "enable"}}


class _Source:
    """The package's syntax trees with the links the walk needs."""

    def __init__(self) -> None:
        self.trees = {p: ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}
        self.parent: dict[ast.AST, ast.AST] = {}
        self.constants: dict[str, list[ast.expr]] = {}
        for tree in self.trees.values():
            for node in ast.walk(tree):
                for child in ast.iter_child_nodes(node):
                    self.parent[child] = node
            for stmt in tree.body:
                if isinstance(stmt, ast.Assign):
                    for target in stmt.targets:
                        if isinstance(target, ast.Name):
                            self.constants.setdefault(target.id, []).append(stmt.value)
        self.calls = [(p, n) for p, t in self.trees.items() for n in ast.walk(t)
                      if isinstance(n, ast.Call)]
        # Modules imported by name in each file: `select.select(...)` is not a method call.
        self.modules = {p: {a.asname or a.name for n in ast.walk(t) if isinstance(n, ast.Import)
                            for a in n.names} for p, t in self.trees.items()}

    def function_of(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return None

    def _arguments_at(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, name: str
                      ) -> list[ast.expr]:
        """Every expression passed for parameter ``name`` of ``fn`` anywhere in the package
        (direct calls, and ``partial(fn, ...)`` / ``run_in_threadpool(fn, ...)``)."""
        positional = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        is_method = bool(positional) and positional[0] in ("self", "cls")
        index = positional.index(name) - is_method if name in positional else None
        found = []
        for path, call in self.calls:
            func, args = call.func, list(call.args)
            qualified = (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                         and func.value.id in self.modules[path])
            direct = (not qualified and isinstance(func, ast.Attribute)
                      and func.attr == fn.name) or (
                not is_method and isinstance(func, ast.Name) and func.id == fn.name)
            passed = bool(args) and (
                (isinstance(args[0], ast.Attribute) and args[0].attr == fn.name)
                or (isinstance(args[0], ast.Name) and args[0].id == fn.name))
            if not direct and not passed:
                continue
            if passed and not direct:
                args = args[1:]
            chosen = next((k.value for k in call.keywords if k.arg == name), None)
            if chosen is None and index is not None and index < len(args) and not any(
                    isinstance(a, ast.Starred) for a in args[:index + 1]):
                chosen = args[index]
            if chosen is not None:
                found.append(chosen)
        return found

    def values(self, expr: ast.expr | None, depth: int = 0) -> tuple[set[str], list[str]]:
        """The strings ``expr`` can be, and what could not be followed."""
        if expr is None or depth > 8:
            return set(), [ast.unparse(expr) if expr is not None else "<missing>"]
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            return {expr.value}, []
        if isinstance(expr, ast.IfExp):
            a, ua = self.values(expr.body, depth)
            b, ub = self.values(expr.orelse, depth)
            return a | b, ua + ub
        if isinstance(expr, ast.JoinedStr):
            parts, unresolved = [], []
            for v in expr.values:
                if isinstance(v, ast.Constant):
                    parts.append({str(v.value)})
                else:
                    s, u = self.values(v.value, depth + 1)  # type: ignore[attr-defined]
                    parts.append(s)
                    unresolved += u
            return {"".join(x) for x in itertools.product(*parts)}, unresolved
        if isinstance(expr, ast.Name):
            return self._name_values(expr, depth)
        return set(), [ast.unparse(expr)]

    def _name_values(self, expr: ast.Name, depth: int) -> tuple[set[str], list[str]]:
        fn = self.function_of(expr)
        found: set[str] = set()
        unresolved: list[str] = []
        followed = False
        if fn is not None:
            if (fn.name, expr.id) in ROUTE_VALUES:
                return set(ROUTE_VALUES[(fn.name, expr.id)]), []
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == expr.id for t in node.targets):
                    s, u = self.values(node.value, depth + 1)
                    found |= s
                    unresolved += u
                    followed = True
            params = {a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs}
            if expr.id in params:
                passed = self._arguments_at(fn, expr.id)
                if not passed:
                    unresolved.append(f"{fn.name}({expr.id}) is never called with a value")
                for arg in passed:
                    s, u = self.values(arg, depth + 1)
                    found |= s
                    unresolved += u
                followed = True
        if not followed and expr.id in self.constants:
            for value in self.constants[expr.id]:
                s, u = self.values(value, depth + 1)
                found |= s
                unresolved += u
            followed = True
        if not followed:
            unresolved.append(expr.id)
        return found, unresolved


def _recorded_actions() -> tuple[dict[str, set[str]], list[str]]:
    source = _Source()
    actions: dict[str, set[str]] = {}
    unresolved: list[str] = []
    for path, call in source.calls:
        if not (isinstance(call.func, ast.Name) and call.func.id == "AuditEvent"):
            continue
        where = f"{path.relative_to(ROOT)}:{call.lineno}"
        action = call.args[1] if len(call.args) > 1 else next(
            (k.value for k in call.keywords if k.arg == "action"), None)
        found, missing = source.values(action)
        unresolved += [f"{where}: {m}" for m in missing]
        for value in found:
            actions.setdefault(value, set()).add(where)
    return actions, unresolved


def test_every_action_the_code_records_is_in_the_catalogue() -> None:
    actions, unresolved = _recorded_actions()
    assert not unresolved, f"actions the walk cannot follow: {unresolved}"
    assert len(actions) > 50, "the walk found too few call sites to be trusted"
    missing = {a: sorted(w) for a, w in actions.items() if a not in CATALOGUE}
    assert not missing, f"recorded but not catalogued: {missing}"


def test_every_catalogued_action_is_recorded_somewhere() -> None:
    actions, _ = _recorded_actions()
    # exchange.request.declined: the declined state is set by a site's answer (kept for it).
    unused = set(CATALOGUE) - set(actions) - {"exchange.request.declined"}
    assert not unused, f"catalogued but never recorded: {sorted(unused)}"


def test_every_event_names_its_atna_codes_and_known_participant_objects() -> None:
    for event in CATALOGUE.values():
        assert event.event_id.system == "DCM" and event.event_id.code.startswith("1101")
        assert event.action_code in "CRUDE"
        assert event.description.endswith(".")
        assert set(event.objects) <= set(PARTICIPANT_OBJECTS), event.action
        if event.event_type is not None:
            assert event.event_type.code.startswith("1101"), event.action


def test_the_trail_refuses_an_action_outside_the_catalogue_and_writes_nothing(archive) -> None:
    before = len(list(archive.audit.events()))
    with pytest.raises(UnknownAuditEvent):
        archive.audit.record([
            AuditEvent(cli_actor(), "audit.read", "success"),
            AuditEvent(cli_actor(), "study.peek", "success"),
        ])
    assert len(list(archive.audit.events())) == before


def test_audit_events_page_is_generated_from_the_catalogue() -> None:
    documented = (ROOT / "docs" / "audit-events.md").read_text()
    assert documented == markdown(), \
        "regenerate: imageshare audit events --markdown > docs/audit-events.md"
    printed = subprocess.run([sys.executable, "-m", "imageshare", "audit", "events",
                              "--markdown"], capture_output=True, text=True, timeout=60)
    assert (printed.returncode, printed.stdout) == (0, documented), printed.stderr
    assert "docs/audit-events.md" in (ROOT / "README.md").read_text()
