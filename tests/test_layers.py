"""Layers import only downward: the contract at the bottom, the mapping data on it, then
the sources' translation (adapters) beside the sinks (historian), which know nothing of
each other, then the worker that joins them (and beside it the simulators, which play
source platforms), then the CLI. A type two layers share
belongs in the lower one (a command record is the contract's, not the adapters'); this
test keeps the rule from eroding."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# folder -> (installed package, layer)
LAYERS = {
    "energybus": ("energybus", 0),
    "mappings": ("energybus.mappings", 1),
    "adapters": ("energybus.adapters", 2),
    "historian": ("energybus.historian", 2),
    "worker": ("energybus.worker", 3),
    "simulators": ("energybus.simulators", 3),
    "cli": ("energybus.cli", 4),
}


def _owner(module: str) -> str | None:
    """The package of ``module`` among the layers (the longest that contains it)."""
    owners = [p for p, _ in LAYERS.values() if module == p or module.startswith(p + ".")]
    return max(owners, key=len) if owners else None


def import_graph() -> dict[str, set[str]]:
    """Which package (by folder) imports which, from every module's import statements."""
    graph: dict[str, set[str]] = {}
    for folder, (package, _) in LAYERS.items():
        targets = graph.setdefault(package, set())
        for path in (ROOT / folder).rglob("*.py"):
            here = [package, *path.relative_to(ROOT / folder).parts[:-1]]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    base = here[: len(here) - node.level + 1] if node.level else []
                    names = [".".join([*base, *([node.module] if node.module else [])])]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    owner = _owner(name)
                    if owner is not None and owner != package:
                        targets.add(owner)
    return graph


def test_no_layer_imports_its_own_level_or_one_above_it() -> None:
    layer = dict(LAYERS.values())
    upward = [
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        for target in targets
        if layer[target] >= layer[source]
    ]
    assert upward == []


def test_the_contract_imports_no_other_layer() -> None:
    assert import_graph()["energybus"] == set()
