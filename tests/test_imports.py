"""The package's import graph: no circle among voxelflow modules, and the model zoo
(``pipeline/models``) stays below the stages and the workspace.

Every ``import voxelflow...`` / ``from voxelflow... import ...`` counts, also one inside
a function (a lazy import still ties the two modules together), but not one under
``if TYPE_CHECKING:`` (annotations only, never executed); ``from package import
name`` points at the submodule ``package.name`` when there is one, else at the
package's ``__init__``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from conftest import ROOT

PACKAGE = "voxelflow"
NOT_PACKAGE = {".venv", ".git", "tests", "benchmarks", "docs", "build"}


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (imports for annotations only, never executed)."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """Module name -> the voxelflow modules it imports (anywhere in its code)."""
    files = []
    for folder, subfolders, names in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in NOT_PACKAGE and not d.startswith(".")]
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (module graphs are shallow)
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "voxelflow.pipeline.stages.features" in graph
    assert "voxelflow.pipeline.models.registry" in graph["voxelflow.pipeline.stages.features"]
    assert "voxelflow.cli" in graph and not any(n.startswith("voxelflow.tests") for n in graph)


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_models_import_neither_stages_nor_stores():
    graph = import_graph()
    models = [m for m in graph if m.startswith("voxelflow.pipeline.models")]
    assert len(models) >= 5
    for module in models:
        bad = sorted(m for m in reachable(graph, module)
                     if m.startswith(("voxelflow.pipeline.stages", "voxelflow.stores")))
        assert not bad, f"{module} imports {bad}"


def test_public_api_names_resolve():
    """Every name the package and its subpackages list in ``__all__`` exists."""
    import importlib

    for package in ("voxelflow", "voxelflow.stores", "voxelflow.pipeline.stages",
                    "voxelflow.pipeline.models", "voxelflow.pipeline.ridge",
                    "voxelflow.pipeline.design", "voxelflow.pipeline.study",
                    "voxelflow.pipeline.synthetic", "voxelflow.pipeline.execution"):
        module = importlib.import_module(package)
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, f"{package}: {missing}"
