"""The house rules that no linter here checks: no library function longer than one screen (80 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

import headstart

MAX_LINES = 80  # a function one can read in one sitting; longer ones hide several responsibilities


def test_no_library_function_is_longer_than_80_lines() -> None:
    root = Path(headstart.__file__).parent
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_LINES:
                    long.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "split these functions: " + ", ".join(long)
