"""The worker benchmarks' JSON lines as the Markdown tables of benchmarks/RESULTS.md:
``--only worker``'s, and ``--only tls``'s with each TLS run against the plain one.

python -m benchmarks.tables benchmarks/results/worker.jsonl
python -m benchmarks.tables benchmarks/results/tls.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

MODES = {"historian": "energybus + historian", "bus": "energybus, bus only", "nodered": "Node-RED"}


def _s(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def worker_table(results: list[dict[str, Any]]) -> str:
    head = (
        "| offered msg/s | engine | delivered msg/s | drained | lost (bus / rows) "
        "| p50 / p99 bus s | p99 row s | engine cores | broker | database | load gen "
        "| machine | engine µs/sample | DB µs/row | RSS MB | sustained |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in sorted(
        results, key=lambda r: (r["target_messages_per_second"], list(MODES).index(r["mode"]))
    ):
        cores = r["cores"]
        engine = cores.get("worker", cores.get("nodered"))
        drained = (
            f"in {r['drained_s']} s" if r["drained_s"] is not None
            else f"not drained in {r['not_drained_after_s']} s"
        )  # fmt: skip
        if r["restarted_to_drain"]:
            drained += ", after a restart"
        rows.append(
            f"| {r['target_messages_per_second']} | {MODES[r['mode']]} "
            f"| {_s(r['delivered_messages_per_second'])} | {drained} "
            f"| {r['lost_messages_on_bus']} / {_s(r['lost_rows'])} "
            f"| {_s(r['bus_p50_s'], 3)} / {_s(r['bus_p99_s'], 3)} | {_s(r['db_p99_s'], 3)} "
            f"| {_s(engine)} | {_s(cores['broker'])} | {_s(cores['database'])} "
            f"| {_s(cores['load_generator'])} | {_s(cores['machine'])} "
            f"| {_s(r['engine_cpu_us_per_sample'])} | {_s(r['database_cpu_us_per_row'])} "
            f"| {_s(r['worker_peak_rss_mb'], 1)} | {'yes' if r['sustained'] else 'no'} |"
        )
    return head + "\n".join(rows) + "\n"


RATIOS = {
    "worker_cpu_per_sample": "engine_cpu_us_per_sample",
    "delivered_messages_per_second": "delivered_messages_per_second",
    "broker_cpu_per_message": "broker_cpu_us_per_message",
    "database_cpu_per_row": "database_cpu_us_per_row",
    "load_generator_cpu_per_message": "load_generator_cpu_us_per_message",
}
"""The TLS run's figures divided by the plain run's, by name: what the lock-down costs
(above 1 for CPU) and what it takes off the throughput (below 1 for the delivered rate)."""


def tls_ratios(plain: dict[str, Any], tls: dict[str, Any]) -> dict[str, float | None]:
    """TLS ÷ plain for each of :data:`RATIOS`, None where either figure is missing or 0."""
    ratios: dict[str, float | None] = {}
    for name, field in RATIOS.items():
        over, under = tls.get(field), plain.get(field)
        ratios[name] = round(over / under, 3) if over and under else None
    return ratios


def tls_table(results: list[dict[str, Any]]) -> str:
    """A row per run, the plain run then the TLS run of each rate; the TLS row carries
    its ratios to the plain one of the same invocation (``tls_over_plain``)."""
    head = (
        "| offered msg/s | transport | delivered msg/s | drained | lost (bus / rows) "
        "| p50 / p99 bus s | p99 row s | worker cores | broker | database | load gen "
        "| elsewhere | machine | worker µs/sample | broker µs/msg | DB µs/row "
        "| load gen µs/msg | sustained | TLS ÷ plain: worker µs/sample | TLS ÷ plain: delivered |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    order = ("plain", "tls")
    for r in sorted(
        results,
        key=lambda r: (r["target_messages_per_second"], order.index(r["transport"])),
    ):
        cores = r["cores"]
        drained = (
            f"in {r['drained_s']} s" if r["drained_s"] is not None
            else f"not drained in {r['not_drained_after_s']} s"
        )  # fmt: skip
        if r["restarted_to_drain"]:
            drained += ", after a restart"
        ratios = r.get("tls_over_plain") or {}
        rows.append(
            f"| {r['target_messages_per_second']} | {r['transport']} "
            f"| {_s(r['delivered_messages_per_second'])} | {drained} "
            f"| {r['lost_messages_on_bus']} / {_s(r['lost_rows'])} "
            f"| {_s(r['bus_p50_s'], 3)} / {_s(r['bus_p99_s'], 3)} | {_s(r['db_p99_s'], 3)} "
            f"| {_s(cores['worker'])} | {_s(cores['broker'])} | {_s(cores['database'])} "
            f"| {_s(cores['load_generator'])} | {_s(cores.get('elsewhere'))} "
            f"| {_s(cores['machine'])} | {_s(r['engine_cpu_us_per_sample'])} "
            f"| {_s(r['broker_cpu_us_per_message'])} | {_s(r['database_cpu_us_per_row'])} "
            f"| {_s(r['load_generator_cpu_us_per_message'])} "
            f"| {'yes' if r['sustained'] else 'no'} "
            f"| {_s(ratios.get('worker_cpu_per_sample'), 3)} "
            f"| {_s(ratios.get('delivered_messages_per_second'), 3)} |"
        )
    return head + "\n".join(rows) + "\n"


TABLES = {"worker": worker_table, "tls": tls_table}


def main() -> None:
    path = Path(sys.argv[1])
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for benchmark, table in TABLES.items():
        runs = [r for r in results if r.get("benchmark") == benchmark]
        if runs:
            print(table(runs), end="")


if __name__ == "__main__":
    main()
