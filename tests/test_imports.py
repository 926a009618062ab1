"""No import cycles between the modules of `pfb_train`, counting imports inside functions too (a
function-level import that dodges a cycle at load time is still a cycle in the design).

The graph is read from the source with `ast`, nothing is imported. Edges, at module granularity:
- `import pfb_train.a.b` and `from pfb_train.a import b` (b a submodule) point at `pfb_train.a.b`;
  `from pfb_train.a import name` (a name defined in a's `__init__`) points at the package `pfb_train.a`.
- Importing a submodule of a package from outside that package also runs the package's `__init__`
  first, so it points at the package too. From inside the package it does not: the package's
  `__init__` has started already whenever one of its submodules runs. So a package `__init__` that
  imports its own submodules is no cycle with them, unless one imports a name of the `__init__` back.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
from pathlib import Path

import pfb_train

PACKAGE = "pfb_train"


def all_modules() -> dict[str, Path]:
    """{dotted name: source file} of the package and every module below it."""
    found = {PACKAGE: Path(pfb_train.__file__)}
    for info in pkgutil.walk_packages(pfb_train.__path__, prefix=f"{PACKAGE}."):
        spec = importlib.util.find_spec(info.name)
        found[info.name] = Path(spec.origin)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(name: str, path: Path, modules: dict) -> set[str]:
    """The pfb_train modules that module `name` (file `path`) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level - 1` steps above this one
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    edges = set()
    for target in targets:
        if target != PACKAGE and not target.startswith(f"{PACKAGE}."):
            continue
        while target not in modules:  # `import pfb_train.a.b.c` where c is a name: the module holding it
            target = target.rpartition(".")[0]
        own = set(_ancestors(name)) | {name}
        # The target's package __init__s run first, unless this module is inside them already.
        edges.update(p for p in [*_ancestors(target), target] if p not in own)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules (first == last), or None. Depth-first search with three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_a_cycle_and_package_inits():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "pfb_train.selection.registry" in graph["pfb_train.selection"]  # __init__ -> its submodules
    assert "pfb_train.data" in graph["pfb_train.engine"]  # `from pfb_train.data import set_loader_epoch`
