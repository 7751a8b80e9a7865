"""The fault suite's rig, started once for its tests (tests/faults/rig.py), and its
table in the terminal summary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.faults.rig import REPORT, Rig, table
from tests.modbus import devices


@pytest.fixture(scope="module")
def rig(run_dir: Path) -> Iterator[Rig]:
    # Services of its own, on free ports: the suite stops and restarts them.
    base = run_dir / "faults"
    base.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        served = stack.enter_context(devices())
        yield Rig(stack, base, served)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT.rows:
        terminalreporter.section("fault suite")
        terminalreporter.write(table(REPORT.rows))
        terminalreporter.write_line(f"(written to {REPORT.path})")
