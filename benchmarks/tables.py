"""The worker benchmark's JSON lines as the Markdown table of benchmarks/RESULTS.md.

python -m benchmarks.tables benchmarks/results/worker.jsonl
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


def main() -> None:
    path = Path(sys.argv[1])
    results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print(worker_table([r for r in results if r.get("benchmark") == "worker"]), end="")


if __name__ == "__main__":
    main()
