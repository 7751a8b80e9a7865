"""The package installs as one tree: energybus plus its adapters, mappings, historian, cli."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import energybus

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = ["adapters", "mappings", "historian", "cli"]


@pytest.mark.parametrize("cwd", [ROOT, ROOT / "tests", Path("/")])
def test_imports_work_from_anywhere(cwd: Path) -> None:
    code = "import energybus, " + ", ".join(f"energybus.{p}" for p in SUBPACKAGES) + "\n"
    code += "print(energybus.__version__)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == energybus.__version__


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
