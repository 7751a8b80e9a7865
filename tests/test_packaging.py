"""The package installs as one tree: energybus and its sub-packages, each from its folder."""

from __future__ import annotations

from pathlib import Path

import pytest

import energybus
from tests.helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ["adapters", "mappings", "historian", "cli", "worker"]


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "tests", Path("/")])
def test_imports_work_from_anywhere(cwd: Path) -> None:
    code = "import energybus, " + ", ".join(f"energybus.{p}" for p in SUBPACKAGES) + "\n"
    code += "print(energybus.__version__)"
    assert run_python(code, cwd=cwd).strip() == energybus.__version__


def test_subpackages_come_from_their_folders() -> None:
    import importlib

    for name in SUBPACKAGES:
        module = importlib.import_module(f"energybus.{name}")
        assert module.__file__ is not None
        assert Path(module.__file__).parent == ROOT / name


def test_public_api_is_exported() -> None:
    assert len(energybus.__all__) == len(set(energybus.__all__))
    for name in energybus.__all__:
        assert hasattr(energybus, name), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = energybus.nope


def test_type_checkers_see_every_lazy_name() -> None:
    """The TYPE_CHECKING imports must list exactly the lazily exported names."""
    import ast

    tree = ast.parse((ROOT / "energybus" / "__init__.py").read_text())
    seen: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for statement in node.body:
                assert isinstance(statement, ast.ImportFrom)
                for alias in statement.names:
                    seen[alias.name] = str(statement.module)
    assert seen == energybus._EXPORTS


def test_import_energybus_loads_no_submodule_until_used() -> None:
    code = (
        "import sys, energybus\n"
        "print(sorted(m for m in sys.modules if m.startswith('energybus.')))\n"
        "energybus.Renderer\n"
        "print('energybus.render' in sys.modules)\n"
    )
    assert run_python(code).splitlines() == ["['energybus._version']", "True"]


def test_the_lowest_constraints_are_the_declared_floors() -> None:
    """constraints/lowest.txt pins every direct dependency at its floor, so the lowest
    run tests exactly what pyproject.toml promises (lint tools excepted: they run at the
    newest only)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    declared = [*project["dependencies"], *(req for extra in extras for req in extra)]
    floors = {}
    for requirement in declared:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
        assert match is not None, f"{requirement!r} has no lower bound"
        floors[match.group(1).lower()] = match.group(2)
    pins = dict(
        line.split("==")
        for line in (ROOT / "constraints" / "lowest.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )

    def version(text: str) -> tuple[int, ...]:
        parts = [int(part) for part in text.split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return tuple(parts)

    lint = {"ruff", "mypy", "asyncpg-stubs"}
    expected = {k: version(v) for k, v in floors.items() if k not in lint}
    assert expected == {k: version(v) for k, v in pins.items()}
