"""No import cycles inside the naclip package (module-level and function-level imports alike)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "naclip"
# The CLI modules are being moved into a naclip/cli/ package on another branch (issue #12), which removes
# their cycle; they are left out here until then.
PENDING = ("naclip.cli", "naclip.eval.cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The naclip modules ``path`` imports anywhere (``from naclip import io`` is ``naclip.io``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
            found |= subs if len(subs) == len(node.names) else ({node.module} & mods.keys()) | subs
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that returns to its start), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["naclip"], ids=str)
def test_no_import_cycles(package):
    mods = {m: p for m, p in _modules().items() if m.startswith(package) and m not in PENDING}
    graph = {m: _imports(p, mods) - {m} for m, p in mods.items()}
    assert "naclip.precision" in graph["naclip.hub"]  # the dtype parser no longer lives in segmenter
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
