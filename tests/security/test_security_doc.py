"""docs/security.md stays true: every checklist row is there and every test it names
exists."""

from __future__ import annotations

import ast
import re

from tests.conftest import ROOT

DOC = (ROOT / "docs" / "security.md").read_text()
ROWS = re.findall(r"^\| (OA-\d+) \|(.+)$", DOC, re.M)
REFERENCES = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", DOC)


def test_every_checklist_row_is_there_once_and_names_a_test():
    assert [row for row, _ in ROWS] == [f"OA-{n}" for n in range(1, 25)]
    for row, rest in ROWS:
        assert re.search(r"`tests/[\w/]+\.py::\w+`|secret canary", rest), row


def test_every_named_test_exists():
    assert len(REFERENCES) > 40
    missing = []
    for path, name in set(REFERENCES):
        tree = ast.parse((ROOT / path).read_text())
        names = {node.name for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        if name not in names:
            missing.append(f"{path}::{name}")
    assert missing == []
