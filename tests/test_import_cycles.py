"""No import cycles inside the package, counting every import statement wherever it stands.

An import inside a function (or under ``if TYPE_CHECKING:``) still ties two modules together:
a lazy import that only hides a cycle is still one. So the graph is read from the source with
``ast`` (nothing is imported), and every ``import`` / ``from … import`` in a module counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import deblur

PACKAGE_ROOT = Path(deblur.__file__).resolve().parent


def modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Every module under ``root``: dotted name -> (file, is a package's __init__)."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its file)."""
    known = modules(root, package)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, (path, is_package) in known.items():
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x, from ..io import storage
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # ``from deblur.io import codec`` imports the module deblur.io.codec
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                # ``import a.b.c`` also runs a and a.b; those are parents, not the import's
                # target: a package's __init__ importing its own modules is no cycle.
                if target in known and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    inside = set(component)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & inside))}" for m in component)


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE_ROOT, "deblur")
    assert len(graph) > 50, "the package's modules were not found"
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_describe(graph, c) for c in found)


def test_layers_config_on_the_ground_floor_and_job_below_run() -> None:
    graph = import_graph(PACKAGE_ROOT, "deblur")
    assert graph["deblur.errors"] == set()
    assert graph["deblur.config"] <= {"deblur.errors"}, graph["deblur.config"]
    upward = {(m, t) for m, targets in graph.items() if m.startswith("deblur.job.")
              for t in targets if t.startswith("deblur.run.")}
    assert not upward, f"job/ imports run/: {sorted(upward)}"


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    """The check itself: a lazy import, a relative one and a TYPE_CHECKING one all count."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    import pkg.d\n")
    (pkg / "d.py").write_text("import pkg.c as c\n")
    (pkg / "e.py").write_text("import pkg.a\n")  # imports into a cycle, is not in one
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.sub.b"] == {"pkg", "pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]
