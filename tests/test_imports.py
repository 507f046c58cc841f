"""The module structure of src/ptqlite: no import circles, no private names imported across modules.

Every import counts, including those inside functions and under TYPE_CHECKING: a circle that only lazy imports
close is still a circle for the reader. Run alone with `python -m pytest tests/test_imports.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ptqlite"
# (importing module, imported module, name): private names still imported across modules; an entry that no longer
# occurs fails below.
KNOWN_PRIVATE: set[tuple[str, str, str]] = set()


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, modules: dict[str, Path]) -> list[tuple[str, str | None, str]]:
    """(imported module, imported name or None, local name) for every import of a ptqlite module in `name`."""
    tree = ast.parse(modules[name].read_text(), str(modules[name]))
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None, a.asname or a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in modules:  # `from . import dynamic`: the module itself
                    found.append((submodule, None, alias.asname or alias.name))
                else:
                    found.append((target, alias.name, alias.asname or alias.name))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {target for target, _, _ in _imports(name, modules) if target != name} for name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in order:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], order[nxt])
        if low[node] == order[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in order:
            visit(node)
    return components


def test_the_import_graph_sees_every_module_and_known_edges():
    graph = _graph()
    assert "ptqlite.runtime" in graph and "ptqlite.passes.weight" in graph
    assert "ptqlite.runtime" in graph["ptqlite.report"]
    assert "ptqlite.autotune" in graph["ptqlite.passes.mixed_bit"]


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_names_imported_across_modules():
    modules = _modules()
    private = set()
    for name in modules:
        imported_modules = {}  # local name -> ptqlite module, for `module._name` uses
        for target, alias, local in _imports(name, modules):
            if alias is None:
                imported_modules[local] = target
            elif alias.startswith("_") and not alias.startswith("__"):
                private.add((name, target, alias))
        for node in ast.walk(ast.parse(modules[name].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                private.add((name, imported_modules[node.value.id], node.attr))
    assert private - KNOWN_PRIVATE == set()
    assert KNOWN_PRIVATE - private == set(), "a known private import is gone: remove it from KNOWN_PRIVATE"
