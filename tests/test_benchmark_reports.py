"""The worker benchmarks' reports: the Markdown tables of RESULTS.md and the plot, made
from a results file as the benchmark writes it; and a short run of ``--only tls`` whose
figures those tables take."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.plot import load, plot
from benchmarks.tables import tls_table, worker_table
from benchmarks.tls import bench_tls

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


def test_the_tls_table_pairs_each_rate_and_carries_the_ratios_measured() -> None:
    """RESULTS.md's table of the TLS runs, from their results file: the plain run then the
    TLS run of each rate, and on the TLS row its ratios to that plain run."""
    runs = [json.loads(line) for line in (RESULTS.parent / "tls.jsonl").read_text().splitlines()]
    rows = _cells(tls_table(runs))
    assert len(rows) == len(runs)
    assert [r[1] for r in rows] == ["plain", "tls"] * (len(runs) // 2)
    by = {(r["target_messages_per_second"], r["transport"]): r for r in runs}
    for row in rows[1::2]:
        plain, tls = by[int(row[0]), "plain"], by[int(row[0]), "tls"]
        worker = tls["engine_cpu_us_per_sample"] / plain["engine_cpu_us_per_sample"]
        delivered = tls["delivered_messages_per_second"] / plain["delivered_messages_per_second"]
        assert row[-2:] == [f"{worker:.3f}", f"{delivered:.3f}"]


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


@pytest.mark.services
def test_a_short_tls_run_measures_both_transports_into_its_table(run_dir: Path) -> None:
    """Two seconds at 50 messages/s, plain then locked down, each on services of its own
    (not the session's: the benchmark starts from clean server state)."""
    bench_run = run_dir / "bench-tls"
    results = bench_tls([50], 2.0, 30.0, ["plain", "tls"], run=bench_run)
    plain, tls = results
    assert (plain["transport"], tls["transport"]) == ("plain", "tls")
    for r in results:
        assert r["drained_s"] is not None and r["zero_loss"]
        assert r["rows_stored"] == r["messages_sent"] * 48 > 0
        assert r["engine_cpu_us_per_sample"] > 0 and r["broker_cpu_us_per_message"] > 0
    ratio = tls["tls_over_plain"]["worker_cpu_per_sample"]
    assert ratio == round(tls["engine_cpu_us_per_sample"] / plain["engine_cpu_us_per_sample"], 3)
    # The second run was the locked-down one, and every client of it logged in as its
    # own user over TLS: the broker took no one else.
    mosquitto = bench_run / "mosquitto"
    assert "require_certificate true" in (mosquitto / "mosquitto.conf").read_text()
    logins = {
        line.rsplit("u'", 1)[1].split("'")[0]
        for line in (mosquitto / "mosquitto.log").read_text().splitlines()
        if "New client connected" in line
    }
    assert logins == {"bench-worker", "bench-load", "bench-meter"}

    rows = _cells(tls_table(list(reversed(results))))
    assert [(r[0], r[1]) for r in rows] == [("50", "plain"), ("50", "tls")]
    assert rows[0][-2:] == ["-", "-"]  # the ratios are the TLS row's
    assert rows[1][-2] == f"{ratio:.3f}"
