"""The library's imports form no circle, counting imports inside functions (a circle held open
by a deferred import is still a circle: the two modules cannot be read or tested apart)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "yuanlfa"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the library modules it imports anywhere in its body. Importing a module of
    another package also runs that package's ``__init__``: an edge to each such package (none
    to the importer's own packages, which Python initializes before the importer)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if name in packages else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets.add(base)
                # ``from pkg import sub`` imports the submodule ``pkg.sub``.
                targets.update(
                    f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files
                )
        edges = set()
        for target in targets:
            if target not in files:
                continue
            bits = target.split(".")
            for k in range(2, len(bits) + 1):
                edges.add(".".join(bits[:k]))
        # A module's own packages are initialized before it runs: no edge back to them.
        bits = name.split(".")
        edges -= {".".join(bits[:k]) for k in range(1, len(bits) + 1)}
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[frozenset[str]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_deferred_imports() -> None:
    graph = import_graph()
    # yuanlfa.model.registry imports its built-in variants by name inside a function; the
    # trainer's import of the balancer for pipeline_blocks: auto is inside a function too.
    assert "yuanlfa.planner.balance" in graph["yuanlfa.train.pipeline"]
    assert "yuanlfa.config" in graph["yuanlfa.layout.splits"]


def test_no_import_circles() -> None:
    found = circles(import_graph())
    assert not found, f"import circles: {[sorted(c) for c in found]}"
