"""The ``naclip`` package imports cleanly in any order and its import graph has no cycles.

Every module is imported in a fresh interpreter, in sorted and in reverse order (a cycle or a hidden order
dependence fails one of them); the import graph read with ``ast`` (top-level and function-level imports
alike) must have no cycle except :data:`KNOWN_CYCLES`, which are being removed on other branches.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Cycles other engineers are removing right now; empty since the dtype parser moved to ``naclip.precision``
#: (no more ``naclip.hub`` <-> ``naclip.segmenter``).
KNOWN_CYCLES: list[frozenset[str]] = []


def package_modules(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file below ``package_dir`` (packages by their
    ``__init__``)."""
    mods = {}
    for f in sorted(package_dir.rglob("*.py")):
        parts = list(f.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _package_of(name: str, mods: dict[str, Path]) -> str:
    return name if mods[name].name == "__init__.py" else name.rpartition(".")[0]


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules of ``mods`` it imports}``, from every ``import`` / ``from ... import`` anywhere in
    the file (relative imports resolved); ``from pkg import name`` points at ``pkg.name`` when that is a
    module, else at ``pkg``. Parent packages run on import but are not edges (as in pydeps and
    import-linter)."""
    graph = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = _package_of(name, mods).split(".")
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.update({sub} if sub in mods else {base} & mods.keys())
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def _write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return package_modules(root / "pkg")


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({"pkg/a.py": "import pkg.b\n", "pkg/b.py": "import pkg.c\n", "pkg/c.py": ""}, [],
                     id="chain"),
        pytest.param({"pkg/a.py": "def f():\n    from pkg import b\n", "pkg/b.py": "from pkg.a import f\n"},
                     [{"pkg.a", "pkg.b"}], id="lazy-import-cycle"),
        pytest.param({"pkg/sub/__init__.py": "from .x import y\n", "pkg/sub/x.py": "from ..sub import z\n"},
                     [{"pkg.sub", "pkg.sub.x"}], id="relative-cycle"),
        pytest.param({"pkg/__init__.py": "from pkg.a import A\n", "pkg/a.py": "from pkg.b import B\n",
                      "pkg/b.py": "import os\n"}, [], id="init-reexport"),
    ],
)  # fmt: skip
def test_cycle_finder(tmp_path: Path, files: dict[str, str], expected: list[set[str]]) -> None:
    files = {"pkg/__init__.py": "", **files}
    assert sorted(map(sorted, cycles(import_graph(_write_package(tmp_path, files))))) == sorted(
        map(sorted, expected)
    )


def test_no_import_cycles_in_naclip() -> None:
    graph = import_graph(package_modules(ROOT / "naclip"))
    assert "naclip.cli.eval" in graph["naclip.eval.__main__"]  # the graph sees the package's imports
    new = [sorted(c) for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, f"import cycles in naclip: {new}"


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_every_module_imports_in_a_fresh_interpreter(order: str) -> None:
    names = sorted(package_modules(ROOT / "naclip"))
    names = names if order == "sorted" else names[::-1]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
