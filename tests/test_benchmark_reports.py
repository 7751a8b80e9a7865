"""The worker benchmark's reports: the Markdown table of RESULTS.md and the plot, made
from a results file as the benchmark writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.plot import load, plot
from benchmarks.tables import worker_table

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "worker.jsonl"


def test_the_table_has_a_row_per_run_in_rate_then_mode_order() -> None:
    runs = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    lines = worker_table(runs).splitlines()
    assert len(lines) == 2 + len(runs)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows[:3]] == [
        ("500", "energybus + historian"),
        ("500", "energybus, bus only"),
        ("500", "Node-RED"),
    ]
    lost = [r for r in rows if r[4] != "0 / 0" and r[4] != "0 / -"]
    assert all(row[-1] == "no" for row in lost)  # a run that lost anything is not sustained


# matplotlib 3.8 (the bench extra's floor) calls pyparsing names that pyparsing 3.3
# deprecates: its warnings, not the project's.
@pytest.mark.filterwarnings("ignore::DeprecationWarning:matplotlib")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:pyparsing")
def test_the_plot_is_drawn_from_the_results(tmp_path: Path) -> None:
    out = tmp_path / "worker.png"
    plot(load(RESULTS), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
