"""The package's shape (docs/architecture.md): rooms import only downward, the module graph
has no cycle, and the method never reaches for the orchestration stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sanitator"
# Lowest first: a room may import its own modules and any room before it, never one after.
ROOMS = ("core", "safety", "detect", "guard", "pipeline", "downstream", "attacks", "report",
         "cli")
ORCHESTRATION = ("prefect", "prefect_dask", "dask", "distributed", "mlflow")
# Rooms that hold the method and what it stands on: no Prefect, Dask or MLflow at all.
PURE_ROOMS = ("core", "safety", "detect", "guard", "attacks")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports_of(path) if m in known and m != name}
            for name, path in known.items()}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def test_every_module_lives_in_a_room():
    loose = [m for m in modules() if m != "sanitator" and room(m) is None]
    assert not loose, f"modules outside the rooms {ROOMS}: {loose}"


def test_rooms_import_only_downward():
    rank = {name: index for index, name in enumerate(ROOMS)}
    upward = [f"{importer} -> {imported}"
              for importer, targets in internal_graph().items() if room(importer)
              for imported in targets
              if room(imported) and rank[room(imported)] > rank[room(importer)]]
    assert not upward, "imports that go up a room:\n" + "\n".join(sorted(upward))


def test_the_module_graph_has_no_cycle():
    # parent -> child edges count too: a package face that imports a child which imports
    # the face back is a cycle (the shared names live in a child both import instead)
    graph = internal_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_method_never_imports_the_orchestration_stack():
    bad = [f"{name} imports {m}" for name, path in modules().items()
           if room(name) in PURE_ROOMS
           for m in imports_of(path) if m.split(".")[0] in ORCHESTRATION]
    bad += [f"{name} imports {m}" for name, path in modules().items()
            for m in imports_of(path) if m.split(".")[0] in ("prefect", "dask", "distributed")
            and room(name) != "cli"]
    assert not bad, "\n".join(bad)


def test_importing_every_module_loads_no_orchestration_for_the_scan():
    code = "\n".join([
        "import importlib, pkgutil, sys, sanitator",
        "import sanitator.detect.scan, sanitator.guard.monitor",
        f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({ORCHESTRATION!r}))",
        "assert not loaded, loaded",
        "for info in pkgutil.walk_packages(sanitator.__path__, 'sanitator.'):",
        "    importlib.import_module(info.name)",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
