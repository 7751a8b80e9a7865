"""The worker over TLS against plain TCP: what locking the services down costs.

``./dev bench --only tls --rates 500,1000,2000`` runs, at each rate, the worker with the
historian on (benchmarks/worker.py's ``historian`` mode: the same load, bus meter, drain
rules and figures) twice, each from clean server state under ``.run/bench``:

- ``plain``: Mosquitto over TCP taking anonymous clients, PostgreSQL trusting loopback;
- ``tls``: both in tools/services.py's secure mode. The worker, the load generator and the
  bus meter each connect to Mosquitto over TLS with a client certificate and log in as a
  user of their own, which an ACL allows only its own topics; the worker writes
  PostgreSQL over TLS (``sslmode=verify-full``) with a SCRAM password, and so do the
  benchmark's own count queries (benchmarks/access.py).

The plain run of a rate comes first, the TLS run right after it, so that both meet the
machine in about the same state. Besides benchmarks/worker.py's figures each run says how
loaded the machine was (the 1-minute load average before and after, and ``elsewhere``:
the cores the rest of the machine used meanwhile), and the TLS run its ratios to the
plain run of the same rate (``tls_over_plain``, benchmarks/tables.py's ``tls_ratios``):
worker CPU per sample, delivered rate, broker CPU per source message, database CPU per
row and the load generator's CPU per message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.access import Access, plain, secure
from benchmarks.tables import tls_ratios
from benchmarks.worker import ENERGYBUS, RUN, _run_one, fresh_services, stop_services

TRANSPORTS = ("plain", "tls")


def _historian_init(access: Access) -> None:
    """The schema, made by ``energybus historian init`` through the same connection
    settings the worker gets (the DSN from the environment, never the command line)."""
    done = subprocess.run(
        [*ENERGYBUS, "historian", "init"], env=access.env("worker"), capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"historian init failed: {done.stdout}{done.stderr}")


def _run(transport: str, rate: int, seconds: float, drain: float, run: Path) -> dict[str, Any]:
    started = fresh_services("mosquitto", "postgres", run=run, secure=transport == "tls")
    mqtt, pg = started["mosquitto"], started["postgres"]
    site = f"b{rate}-{transport}"
    try:
        if transport == "tls":
            access = secure(mqtt, pg, site=site, client_id=f"bench-{site}")
        else:
            access = plain(mqtt, pg)
        _historian_init(access)
        before = os.getloadavg()[0]
        result: dict[str, Any] = _run_one("historian", rate, seconds, drain, access, None, site)
        after = os.getloadavg()[0]
    finally:
        stop_services(run)
    cores = result["cores"]
    # The machine may be shared: what the rest of it used is not this run's.
    ours = sum(v for k, v in cores.items() if k != "machine")
    cores["elsewhere"] = round(max(cores["machine"] - ours, 0.0), 3)
    return {
        **result,
        "figure": "VEN metering messages, the worker with the historian, TLS against plain TCP",
        "transport": transport,
        "load_average_1m": {"before": round(before, 2), "after": round(after, 2)},
    }


def bench_tls(
    rates: list[int],
    seconds: float,
    drain: float,
    transports: list[str],
    run: Path = RUN,
) -> list[dict[str, Any]]:
    unknown = set(transports) - set(TRANSPORTS)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; known: {', '.join(TRANSPORTS)}")
    results: list[dict[str, Any]] = []
    for rate in rates:
        plain_run = None
        for transport in [t for t in TRANSPORTS if t in transports]:
            result = _run(transport, rate, seconds, drain, run)
            if transport == "plain":
                plain_run = result
            elif plain_run is not None:
                result["tls_over_plain"] = tls_ratios(plain_run, result)
            results.append(result)
            print(json.dumps({"benchmark": "tls", **result}), file=sys.stderr)
    return results
