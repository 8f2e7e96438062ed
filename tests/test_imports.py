"""The import graph runs one way, library <- orchestration <- CLI, and has no cycle (imports inside functions
count: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "er_ray"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("er_ray"):
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("er_ray")]
            else:
                continue
            found = next((t for t in targets if t in modules and t != name), None)
            if found:
                graph[name].add(found)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    if module == "er_ray.cli":
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in ("attacks", "report", "orchestration") else "library"


def test_imports_never_point_up():
    allowed = {
        "library": {"library"},
        "attacks": {"library", "attacks"},
        "report": {"library", "report"},
        "orchestration": {"library", "attacks", "orchestration"},
        "cli": {"library", "attacks", "report", "orchestration"},
    }
    upward = [
        f"{a} -> {b}"
        for a, targets in _graph().items()
        for b in targets
        if _layer(b) not in allowed[_layer(a)] | {_layer(a)}
    ]
    assert not upward, upward


def test_there_is_no_import_cycle():
    graph, state, cycles = _graph(), {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt) :] + [node, nxt]) if nxt in path else nxt)
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, cycles
