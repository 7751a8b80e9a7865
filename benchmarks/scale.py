"""One worker against a group of two on the same machine, with the historian.

``./dev bench --only scale --rates 1000,2000`` runs, at each rate, three set-ups in turn,
each from clean server state (Mosquitto and PostgreSQL started anew under
``.run/bench``, stopped at the end):

- ``single``: one worker;
- ``shared``: two workers in one ``--shared-group`` (the broker hands each message to one
  of them in turn);
- ``members``: two workers in one group, partitioned by site (``--member 0/2`` and
  ``1/2``: each receives every source message and handles its own sites').

The load is benchmarks/load.py's (200 VENs, each its own site, 48 samples a message, a
process of its own). The run waits for every message's ``soc/last`` on the bus and
every row in the historian; loss is counted after that drain (a run not drained is
reported as such, its workers stopped, which writes what they hold, and started again so
the broker redelivers what they had not acknowledged). CPU comes from ``/proc`` per
process tree: each worker, the broker, the database, and the machine in all; and the
bytes a stored row takes on disk (the sample table's partitions with their indexes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.cpu import Meter
from benchmarks.load import start as start_load
from benchmarks.worker import (
    ENERGYBUS,
    SAMPLES_PER_MESSAGE,
    _BusMeter,
    _fetch,
    _percentiles,
    _wait_drained,
    _Worker,
    fresh_services,
    load_report,
    stop_services,
)

SETUPS = {"single": 1, "shared": 2, "members": 2}


def _run(setup: str, rate: int, seconds: float, drain: float) -> dict[str, object]:
    started = fresh_services("mosquitto", "postgres")
    mqtt, pg = started["mosquitto"], started["postgres"]
    tag = f"s{rate}{setup}"
    count_sql = "SELECT count(*) FROM energybus.measurements WHERE site LIKE $1"
    try:
        subprocess.run(
            [*ENERGYBUS, "historian", "init", "--dsn", pg.url], check=True, capture_output=True
        )
        with tempfile.TemporaryDirectory() as tmp:
            workers: list[_Worker] = []
            size = SETUPS[setup]
            for index in range(size):
                folder = Path(tmp) / f"w{index}"
                folder.mkdir()
                config = folder / "site.toml"
                config.write_text(
                    f'[worker]\ndata_dir = "{folder}/data"\n'
                    f'[mqtt]\nport = {mqtt.port}\nclient_id = "bench-{tag}-{index}"\n'
                    f'[historian]\ndsn = "{pg.url}"\n[adapters.ven]\n'
                )
                args = [] if size == 1 else ["--shared-group", tag]
                if setup == "members":
                    args += ["--member", f"{index}/{size}"]
                workers.append(_Worker(config, folder / "worker.log", args))
            components = {"broker": mqtt.pid, "database": pg.pid}
            for index, worker in enumerate(workers):
                components[f"worker_{index}"] = worker.start()
            # Every VEN is its own site: ven-<tag>-<n>.
            with _BusMeter(mqtt.port, "+") as meter:
                load = start_load(mqtt.port, rate, seconds, tag)
                cpu = Meter(components)
                cpu.start()
                begun = time.monotonic()
                report, sent, published = load_report(load, seconds)
                expected = sent * SAMPLES_PER_MESSAGE

                def progress() -> int:
                    rows = int(_fetch(pg.url, count_sql, f"ven-{tag}-%")[0][0])
                    return min(meter.count * SAMPLES_PER_MESSAGE, rows)

                drained, waited = _wait_drained(progress, expected, drain)
                wall = time.monotonic() - begun
                cores = cpu.stop(wall)
                cores["load_generator"] = round(float(report["cpu_seconds"]) / wall, 3)
                if not drained:
                    for worker in workers:
                        worker.stop()
                        worker.start()
                    _wait_drained(progress, expected, 120, quiet=10)
                for worker in workers:
                    worker.stop()
                on_bus = meter.count
                bus_latency = _percentiles(meter.latencies)
        stored = int(_fetch(pg.url, count_sql, f"ven-{tag}-%")[0][0])
        row = _fetch(
            pg.url,
            "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
            " (ORDER BY extract(epoch FROM ingested_at - observed_at))"
            " FROM energybus.measurements WHERE site LIKE $1 AND metric_name = 'soc'",
            f"ven-{tag}-%",
        )[0][0]
        # On disk: the sample table's partitions with their key and BRIN indexes, after
        # a VACUUM so that the visibility map and free space map are counted as they stay.
        _fetch(pg.url, "VACUUM energybus.measurement_samples")
        on_disk = _fetch(
            pg.url,
            "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
            " WHERE inhparent = 'energybus.measurement_samples'::regclass",
        )[0][0]
    finally:
        stop_services()
    workers_cores = sum(v for k, v in cores.items() if k.startswith("worker_"))
    return {
        "figure": "VEN metering messages, one worker against a group of two, historian on",
        "setup": setup,
        "workers": size,
        "target_messages_per_second": rate,
        "messages_sent": sent,
        "messages_per_second": round(sent / published),
        "samples_per_second": round(expected / published),
        "drained_s": round(waited, 2) if drained else None,
        "not_drained_after_s": None if drained else round(waited, 1),
        "lost_messages_on_bus": max(sent - on_bus, 0),
        "rows_stored": stored,
        "lost_rows": max(expected - stored, 0),
        "duplicate_rows": max(stored - expected, 0),
        "bus_p50_s": bus_latency[0],
        "bus_p99_s": bus_latency[1],
        "db_p50_s": round(row[0], 4) if row else None,
        "db_p99_s": round(row[1], 4) if row else None,
        "cores": cores,
        "workers_cpu_us_per_sample": round(workers_cores * wall / expected * 1e6, 2),
        "broker_cpu_us_per_sample": round(cores["broker"] * wall / expected * 1e6, 2),
        "database_cpu_us_per_row": round(cores["database"] * wall / expected * 1e6, 2),
        "bytes_per_stored_row": round(int(on_disk) / stored, 1) if stored else None,
    }


def bench_scale(
    rates: list[int], seconds: float, drain: float, setups: list[str]
) -> list[dict[str, object]]:
    unknown = set(setups) - set(SETUPS)
    if unknown:
        raise SystemExit(f"unknown set-ups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    results = []
    for rate in rates:
        for setup in setups:
            results.append(_run(setup, rate, seconds, drain))
            print(json.dumps({"benchmark": "scale", **results[-1]}), file=sys.stderr)
    return results
