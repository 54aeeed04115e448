"""The tree is the architecture (issue 23): no import circle between the package's subpackages (config,
ops, text, classifier, cache, sae, concepts, metrics, pipeline, report) and its top-level modules, counting
every import, function-level and TYPE_CHECKING ones included. Imports of the root package itself (the lazy
facade of ``import concept_ext``) are left out."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "concept_ext"


def _unit(module: str) -> str:
    """The unit a module belongs to: its subpackage (``concept_ext.sae``) or itself (``concept_ext.runstate``)."""
    parts = module.split(".")
    if len(parts) > 1 and (PKG / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def unit_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: [importing modules]} over every ``concept_ext`` import of every module."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("concept_ext"):
                if node.module == "concept_ext":  # "from concept_ext import ops": the named submodules
                    targets = [f"concept_ext.{a.name}" for a in node.names if (PKG / a.name).exists()
                               or (PKG / f"{a.name}.py").exists()]
                else:
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("concept_ext.")]
            for t in targets:
                a, b = _unit(name), _unit(t)
                if a != b and b != "concept_ext":
                    graph.setdefault(a, {}).setdefault(b, []).append(name)
    return graph


def _cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of units, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in graph.get(u, {}):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in list(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_no_import_circle_between_subpackages():
    graph = unit_graph()
    assert {"concept_ext.sae", "concept_ext.ops", "concept_ext.pipeline"} <= set(graph) | {
        v for deps in graph.values() for v in deps}, "the scan found no imports: is the package where expected?"
    cycle = _cycle(graph)
    if cycle:
        edges = [f"{a} -> {b} (in {sorted(set(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import circle between units:\n  " + "\n  ".join(edges))
