"""Everything the server imports at run time is installed by `make run`: a module that came
only with the test extra (httpx once did) works in the tests and fails on a real installation,
where site messages then stayed queued with ModuleNotFoundError."""

from __future__ import annotations

import ast
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement

PACKAGE = Path(__file__).resolve().parents[2] / "imageshare"


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _runtime_closure() -> set[str]:
    """The distributions a plain install of imageshare brings, with what they require (and
    what the extras they are asked with, e.g. uvicorn[standard], bring)."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [("imageshare", frozenset())]
    while todo:
        name, extras = todo.pop()
        try:
            wanted = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in wanted:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is not None and not any(
                    marker.evaluate({"extra": extra}) for extra in {"", *extras}):
                continue  # only with an extra not asked for (imageshare[test]), or elsewhere
            dist = _normal(requirement.name)
            if dist not in seen:
                seen.add(dist)
                todo.append((requirement.name, frozenset(requirement.extras)))
    return seen


def _imported_modules() -> dict[str, Path]:
    """The top-level modules imported anywhere in the package (also inside functions)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path)
    return found


def test_every_module_the_server_imports_comes_with_a_plain_install():
    closure = _runtime_closure()
    providers = packages_distributions()
    missing = []
    for module, path in _imported_modules().items():
        if module == "imageshare" or module in sys.stdlib_module_names:
            continue
        dists = {_normal(d) for d in providers.get(module, [])}
        if not dists & closure:
            missing.append(f"{module} ({path.relative_to(PACKAGE.parent)}): from "
                           f"{sorted(dists) or 'nothing installed'}")
    assert not missing, "imported at run time but not a runtime dependency: " + "; ".join(
        missing)
