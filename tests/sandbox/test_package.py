"""The sandbox stays an independent implementation: Flask, Werkzeug and stdlib only."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import stora_sandbox

ALLOWED = {"flask", "werkzeug", "stora_sandbox"} | set(sys.stdlib_module_names)


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_sandbox_imports_only_flask_werkzeug_and_stdlib() -> None:
    package = Path(stora_sandbox.__file__).parent
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 10
    for module in modules:
        extra = imported_roots(module) - ALLOWED - {"__future__"}
        assert not extra, f"{module.name} imports {sorted(extra)}"


def test_templates_ship_with_the_package() -> None:
    templates = Path(stora_sandbox.__file__).parent / "templates"
    assert {p.name for p in templates.glob("*.html")} >= {"consent.html", "error.html"}
