"""The package's layering: no module of `fusion` imports, directly or through others, one that imports it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fusion"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(name: str, tree: ast.AST, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere (top level or inside functions), with the
    packages Python initialises on the way (``import fusion.a.b`` runs ``fusion/a/__init__.py`` first)."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets.add(node.module)
            targets |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    found = set()
    for target in targets:
        parts = target.split(".")
        found |= {".".join(parts[:n]) for n in range(2, len(parts) + 1)} & modules
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imported(name, ast.parse(path.read_text()), set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "closed"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "fusion.pipeline" in graph["fusion.fit"]  # the graph is really read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["fusion.config"] = graph["fusion.config"] | {"fusion.recipe"}  # recipe -> config -> recipe
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"fusion.config", "fusion.recipe"} <= set(cycle)


def test_settings_come_from_the_leaf_not_from_the_recipe_loader():
    graph = import_graph()
    assert graph["fusion.config"] == set()  # a leaf: every layer reads its settings from it
    assert graph["fusion.schema"] <= {"fusion.errors"}
    layers = ("fusion.modules", "fusion.data", "fusion.stages", "fusion.methods")
    assert [m for m in graph if m.startswith(layers) and "fusion.recipe" in graph[m]] == []
    assert [m for m in graph if m.startswith("fusion.data") and any(d.startswith("fusion.modules") for d in graph[m])] \
        == []  # data/ knows nothing of modules/
