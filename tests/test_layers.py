"""The package's layering, read from the source: no import cycle between modules or between
parts, and every part imports only the parts below it.

Every import counts: at module level, under TYPE_CHECKING and inside functions
(a cycle hidden in a function is still a cycle a newcomer has to untangle).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import lockgate

SRC = Path(lockgate.__file__).parent
PACKAGE = "lockgate"

# Lower layers never import higher ones (shared/DESIGN.md). The top-level modules
# (`lockgate.errors`, ...) sit below everything; the package's own `__init__` only names
# the engine's public API (lazily), so it sits right above the engine.
LAYERS: dict[str, int] = {
    "errors": 0, "stats": 0, "bodies": 1,
    "engine": 2,
    PACKAGE: 3,
    "store": 4,
    "gateway": 5,
    "observability": 6,
    "eval": 6,
    "lifecycle": 7,
    "server": 8,
    "bench": 8,
    "cli_admin": 9,
    "cli_autoscale": 9,
    "cli_alerts": 10,  # opens the store as cli_admin does (open_cli_store)
    "cli_schemas": 10,  # opens the store as cli_admin does (open_cli_store)
    "cli_eval_router": 10,  # reads the models config (lifecycle) and measures with eval
    "cli": 11,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool, mods: dict[str, Path]) -> set[str]:
    """The package's modules an import statement loads (the deepest existing one per name)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        names = [base] + [f"{base}.{a.name}" for a in node.names]
    found = set()
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name != module:
            found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _targets(module, node, path.name == "__init__.py", mods)
        graph.setdefault(module, set())
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_between_modules() -> None:
    assert _cycles(_graph()) == []


def test_no_import_cycle_between_parts() -> None:
    parts: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        for target in targets:
            if _part(module) != _part(target):
                parts[_part(module)].add(_part(target))
    assert _cycles(parts) == []


def test_every_part_imports_only_lower_layers() -> None:
    graph = _graph()
    unknown = sorted({_part(m) for m in graph} - set(LAYERS))
    assert unknown == [], f"give these parts a layer in LAYERS: {unknown}"
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                    if _part(m) != _part(t) and LAYERS[_part(m)] <= LAYERS[_part(t)])
    assert upward == []


def test_the_checker_sees_every_kind_of_import() -> None:
    """The walk must see imports under TYPE_CHECKING and inside functions, relative ones too."""
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from lockgate.server.app import build_app\n"
              "def f():\n    from ..gateway import auth\n    import lockgate.store.sqlite\n")
    mods = _modules()
    tree = ast.parse(source)
    seen = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            seen |= _targets("lockgate.engine.config", node, False, mods)
    assert {"lockgate.server.app", "lockgate.gateway.auth", "lockgate.store.sqlite"} <= seen
