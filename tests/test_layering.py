"""The control plane's layering (README, Layout): no import cycle, and nothing below imports upward.

Read from the source with ``ast``, so every import counts: those inside functions
too (a lazy import hides a cycle, it does not remove it); only imports under
``if TYPE_CHECKING:`` are left out, as they never run.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "python" / "meshfed"

# Lowest first. A unit is a top-level module or subpackage of meshfed; it may import
# its own layer's units (without a cycle) and any layer below, never one above.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset(
        {
            "meshfed",
            "_core",
            "errors",
            "addresses",
            "aio",
            "sqlite",
            "validation",
            "logs",
            "zonelock",
            "defaults",
            "clock",
            "database",
            "heap",
            "places",
        }
    ),
    frozenset({"supervisor", "runstate", "audit"}),
    frozenset({"trust", "catalog"}),
    frozenset({"policy", "gateway", "store"}),
    frozenset({"telemetry"}),  # reads the gateway's typed stats document (meshfed.gateway.stats)
    frozenset({"zone"}),
    frozenset({"federation"}),
    frozenset({"controller", "diagnose", "leadership", "replica"}),
    frozenset({"api", "runtime", "demo", "gateway_replica"}),
    frozenset({"cli", "__main__"}),
)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        if "_proto" in path.parts:  # generated stubs
            continue
        parts = ["meshfed", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    modules["meshfed._core"] = PACKAGE / "_core.pyi"
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # `from pkg import sub` depends on the submodule, not on everything pkg's __init__ imports.
            subs = {f"{module}.{alias.name}" for alias in node.names} & modules.keys()
            found.update(subs or {module})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {module for module in found if module in modules and module != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items() if path.suffix == ".py"}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "meshfed"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_no_module_imports_another_that_imports_it_back() -> None:
    assert _cycles(_graph()) == []


def test_no_cycle_between_packages() -> None:
    units: dict[str, set[str]] = defaultdict(set)
    for module, imported in _graph().items():
        units[_unit(module)].update(_unit(other) for other in imported if _unit(other) != _unit(module))
    assert _cycles(units) == []


def test_nothing_below_imports_upward() -> None:
    layer_of = {unit: level for level, layer in enumerate(LAYERS) for unit in layer}
    graph = _graph()
    unplaced = sorted({_unit(module) for module in graph} - layer_of.keys())
    assert unplaced == [], f"place these in LAYERS: {unplaced}"
    upward = sorted(
        f"{module} -> {other}"
        for module, imported in graph.items()
        for other in imported
        if layer_of[_unit(other)] > layer_of[_unit(module)]
    )
    assert upward == []


def test_the_check_sees_a_cycle_and_an_upward_import() -> None:
    # The checks above pass on an empty answer; this proves they can fail.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "meshfed.cli" in _graph()["meshfed.__main__"]
