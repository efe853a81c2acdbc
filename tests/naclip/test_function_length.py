"""No function in ``naclip`` is longer than :data:`MAX_LINES` lines of code, read with ``ast``.

A function's length runs from its first decorator (or ``def``) to its last line, minus its docstring; nested
functions count inside their parent too. No file is exempt.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 60


def function_lengths(source: str) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, length)`` of every function and method in ``source``."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}."
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                length = child.end_lineno - start + 1
                first = child.body[0]
                doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                if doc and isinstance(first.value.value, str):
                    length -= first.end_lineno - first.lineno + 1
                out.append((name[:-1], start, length))
            visit(child, name)

    visit(ast.parse(source), "")
    return out


def _body(n: int) -> str:
    return "".join(f"    x{i} = {i}\n" for i in range(n))


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param("def f():\n" + _body(3), [("f", 1, 4)], id="plain"),
        pytest.param('def f():\n    """Doc\n    more."""\n' + _body(2), [("f", 1, 3)], id="doc-skipped"),
        pytest.param("@dec\n@dec2(1)\ndef f():\n" + _body(1), [("f", 1, 4)], id="decorators-count"),
        pytest.param("class A:\n    def m(self):\n        def g():\n            pass\n        return g\n",
                     [("A.m", 2, 4), ("A.m.g", 3, 2)], id="method-and-nested"),
    ],
)  # fmt: skip
def test_function_lengths(source: str, expected: list[tuple[str, int, int]]) -> None:
    assert function_lengths(source) == expected


def test_no_function_in_naclip_is_longer_than_the_limit() -> None:
    files = sorted((ROOT / "naclip").rglob("*.py"))
    assert any(p.parent.name == "cli" for p in files)  # the package was found
    too_long = [
        f"{p.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for p in files
        for name, line, length in function_lengths(p.read_text(encoding="utf-8"))
        if length > MAX_LINES
    ]
    assert not too_long, f"functions over {MAX_LINES} lines (split them): {too_long}"
