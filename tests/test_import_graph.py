"""The import graph of the minima package has no cycle, and the evaluate runner names no task.

The graph is read from the source with ``ast``: every ``import``/``from ... import`` of a minima module,
at module level and inside functions (those run too, later), except under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def package_modules(pkg_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package) for every .py file under ``pkg_dir``."""
    out = {}
    for f in sorted(pkg_dir.rglob("*.py")):
        parts = list(f.relative_to(pkg_dir.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (f, is_pkg)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Import statements anywhere in ``node``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def import_graph(pkg_dir: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from a import b`` counts a.b when it is a module)."""
    mods = package_modules(pkg_dir)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        targets: set[str] = set()
        for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level-1 packages
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                targets.add(full if full in mods else base)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_minima_has_no_import_cycle():
    graph = import_graph(ROOT / "minima")
    assert len(graph) > 50 and "minima.evaluate.tasks.base" in graph["minima.evaluate.tasks.mmlu"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_cycles_through_function_imports(tmp_path):
    """A cycle closed by a function-level relative import is found; one under TYPE_CHECKING is not a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n")
    (pkg / "sub" / "b.py").write_text("import pkg.a\n")
    (pkg / "c.py").write_text("from pkg import a\n")
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.a"]


def test_evaluate_runner_names_no_task():
    """core.py sends requests and aggregates; every task-specific branch lives in the task's own file."""
    from minima.evaluate.tasks import KINDS, TASKS

    assert len(TASKS) >= 18 and {t.kind for t in TASKS.values()} <= set(KINDS)
    source = (ROOT / "minima" / "evaluate" / "core.py").read_text(encoding="utf-8")
    named = [n for n in TASKS if re.search(rf"\b{re.escape(n)}\b", source, flags=re.IGNORECASE)]
    assert named == [], f"minima/evaluate/core.py names tasks {named}"
