"""The worker benchmark as a picture: p99 latency and delivered rate against offered rate.

    python -m benchmarks.plot benchmarks/results/worker.jsonl benchmarks/worker.png

Reads the JSON lines ``./dev bench --only worker --out FILE`` wrote and draws, for each
mode (energybus with the historian, energybus bus only, Node-RED), the p99 latency of a
message's ``soc/last`` on the bus (and of its row, with the historian) and the rate the
subscriber saw. A run that lost messages or did not drain is drawn hollow. Needs the
``bench`` extra (matplotlib).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STYLE = {
    "historian": ("energybus, historian on", "tab:blue"),
    "bus": ("energybus, bus only", "tab:green"),
    "nodered": ("Node-RED, bus only", "tab:red"),
}


def load(path: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("benchmark") == "worker"
    ]


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (latency, rate) = plt.subplots(1, 2, figsize=(12, 4.8))
    cores = results[0].get("machine_cores") if results else None
    for mode, (label, color) in STYLE.items():
        runs = sorted(
            (r for r in results if r["mode"] == mode), key=lambda r: r["target_messages_per_second"]
        )
        if not runs:
            continue
        offered = [r["target_messages_per_second"] for r in runs]
        p99 = [r["bus_p99_s"] for r in runs]
        delivered = [r["delivered_messages_per_second"] for r in runs]
        latency.plot(offered, p99, "-", color=color, label=f"{label}: bus")
        if mode == "historian":
            latency.plot(
                offered, [r["db_p99_s"] for r in runs], "--", color=color, label=f"{label}: row"
            )
        rate.plot(offered, delivered, "-", color=color, label=label)
        for x, y, d, r in zip(offered, p99, delivered, runs, strict=True):
            good = bool(r["sustained"])
            face = color if good else "white"
            latency.plot([x], [y], "o", color=color, markerfacecolor=face)
            rate.plot([x], [d], "o", color=color, markerfacecolor=face)
    latency.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    latency.set_yscale("log")
    latency.set_xlabel("offered VEN messages/s (48 samples each)")
    latency.set_ylabel("p99 latency, s (log)")
    latency.set_title("p99 latency (hollow: lost, not drained or p99 ≥ 1 s)")
    latency.legend(fontsize=8)
    top = max((r["target_messages_per_second"] for r in results), default=1)
    rate.plot([0, top], [0, top], ":", color="grey", linewidth=1, label="offered")
    rate.set_xlabel("offered VEN messages/s")
    rate.set_ylabel("messages/s delivered (first publish to last arrival)")
    rate.set_title("delivered rate (hollow: not sustained)")
    rate.legend(fontsize=8)
    fig.suptitle(f"energybus worker vs Node-RED, all on one {cores}-core machine")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m benchmarks.plot RESULTS.jsonl OUT.png")
    plot(load(Path(sys.argv[1])), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
