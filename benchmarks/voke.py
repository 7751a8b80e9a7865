"""Voke ESM telemetry from RabbitMQ through the worker into the historian, beside the same
telemetry from a CPI plant over MQTT; and RabbitMQ restarted under load.

``./dev bench --only voke --rates 500,1000,2000`` starts Mosquitto, PostgreSQL and
RabbitMQ afresh under ``.run/bench`` (an org with its own user and vhost, and Voke's
queues), and at each rate runs, in turn:

- ``voke``: the load generator (benchmarks/load_plants.py, a process of its own)
  publishes signed VCP telemetry of 200 batteries to ``vcp.bench.event.telemetry``; the
  worker consumes it and writes the historian (and the bus);
- ``cpi``: the same values as signed CPI plant telemetry over MQTT, the worker the same.

Each message holds 8 values. After the load, the run waits for every row in
``energybus.measurements`` (``--drain`` seconds, else reported ``not_drained_after_s``,
the worker restarted and only then the rest counted as lost). CPU per component comes
from ``/proc`` (worker, Mosquitto, RabbitMQ, PostgreSQL, load generator); the figure to
compare is the worker's CPU per sample on each path.

``./dev bench --only voke-restart`` runs the load at ``--rates``' first rate for
``4 x --seconds`` and stops and starts RabbitMQ a third of the way in. The load generator
sends again what the broker did not confirm. Reported: samples sent, rows stored, lost,
rows stored twice (a query over the stored rows), the outage, and the time from the
broker's return until rows flow again.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.cpu import Meter
from benchmarks.worker import (
    ENERGYBUS,
    ROOT,
    RUN,
    _fetch,
    _peak_rss_mb,
    _wait_drained,
    _Worker,
    fresh_services,
    retire,
    stop_services,
)
from tools import services

VALUES_PER_MESSAGE = 8
COUNT_SQL = (
    "SELECT (SELECT count(*) FROM energybus.measurements WHERE site = $1)"
    " + (SELECT count(*) FROM energybus.counter_readings WHERE site = $1)"
)
"""Rows of a site in both historians (the Voke battery's charged energy is a counter)."""


def _rows(pg: services.Service, site: str) -> int:
    return int(_fetch(pg.url, COUNT_SQL, site)[0][0])


ORG = "bench"
MODES = ("voke", "cpi")
_SECRETS = {
    "ENERGYBUS_BENCH_KEY": f"bench-key-{uuid.uuid4().hex}",
    "ENERGYBUS_BENCH_SIGNING_KEY": f"bench-signing-{uuid.uuid4().hex}",
}
_TARGETS = "".join(f'B{i} = {{ template = "battery" }}\n' for i in range(1, 201))


def _config(mode: str, tmp: str, site: str, mqtt: services.Service, pg: services.Service,
            amqp: services.Service, metrics_port: int | None = None) -> str:  # fmt: skip
    metrics = f"metrics_port = {metrics_port}\n" if metrics_port is not None else ""
    head = (
        f'[worker]\ndata_dir = "{tmp}/data"\n{metrics}'
        f'[mqtt]\nport = {mqtt.port}\nclient_id = "bench-{site}"\n'
        f'[historian]\ndsn = "{pg.url}"\n'
    )
    if mode == "voke":
        return head + (
            f'[adapters.voke.orgs.{ORG}]\nuri = "amqp://127.0.0.1:{amqp.port}"\n'
            f'vhost = "{ORG}"\napi_key = "${{ENERGYBUS_BENCH_KEY}}"\n'
            'signing_keys = ["${ENERGYBUS_BENCH_SIGNING_KEY}"]\n'
            f'[adapters.voke.orgs.{ORG}.plants.P-1]\nsite = "{site}"\n'
            f"[adapters.voke.orgs.{ORG}.plants.P-1.targets]\n{_TARGETS}"
        )
    return head + (
        f'[adapters.cpi.plants.plant-1]\nsite = "{site}"\n'
        'secrets = ["${ENERGYBUS_BENCH_SIGNING_KEY}"]\n'
        f"[adapters.cpi.plants.plant-1.targets]\n{_TARGETS}"
    )


def _start(worker: _Worker, mode: str) -> int:
    pid = worker.start()
    if mode == "voke":
        deadline = time.monotonic() + 60
        while "consuming 4 queues" not in worker.log.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no AMQP connection: {worker.log.read_text()[-2000:]}")
            time.sleep(0.05)
    return pid


def _load(mode: str, port: int, rate: int, seconds: float, tag: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.load_plants",
         "--transport", "amqp" if mode == "voke" else "mqtt", "--port", str(port),
         "--rate", str(rate), "--seconds", str(seconds), "--tag", tag,
         "--org", ORG, "--vhost", ORG],
        stdout=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip


def _latency(pg: services.Service, site: str) -> tuple[float | None, float | None]:
    row = _fetch(
        pg.url,
        "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
        " (ORDER BY extract(epoch FROM ingested_at - observed_at))"
        " FROM energybus.measurements WHERE site = $1 AND metric_name = 'soc'",
        site,
    )[0][0]
    return (round(row[0], 4), round(row[1], 4)) if row else (None, None)


def _run_one(
    mode: str,
    rate: int,
    seconds: float,
    drain: float,
    started: dict[str, services.Service],
) -> dict[str, object]:
    mqtt, pg, amqp = started["mosquitto"], started["postgres"], started["rabbitmq"]
    site = f"p{rate}-{mode}-{int(time.time()) % 100000}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "site.toml"
        config.write_text(_config(mode, tmp, site, mqtt, pg, amqp))
        worker = _Worker(config, Path(tmp) / "worker.log")
        components = {
            "worker": _start(worker, mode),
            "mosquitto": mqtt.pid,
            "rabbitmq": amqp.pid,
            "database": pg.pid,
        }
        port = amqp.port if mode == "voke" else mqtt.port
        load = _load(mode, port, rate, seconds, site)
        cpu = Meter(components)
        cpu.start()
        begun = time.monotonic()
        out, _ = load.communicate(timeout=seconds + 300)
        report = json.loads(out)
        sent = int(report["sent"])
        expected = sent * VALUES_PER_MESSAGE

        def progress() -> int:
            return _rows(pg, site)

        drained, waited = _wait_drained(progress, expected, drain)
        wall = time.monotonic() - begun
        cores = cpu.stop(wall)
        cores["load_generator"] = round(float(report["cpu_seconds"]) / wall, 3)
        rss = _peak_rss_mb(components["worker"])
        restarted = False
        if not drained:
            worker.stop()
            _start(worker, mode)
            restarted = True
            _wait_drained(progress, expected, 120, quiet=10)
        worker.stop()
        retire(config)
    stored = _rows(pg, site)
    p50, p99 = _latency(pg, site)
    lost = max(expected - stored, 0)
    result: dict[str, object] = {
        "figure": f"{mode}: signed battery telemetry (8 values) into the historian",
        "mode": mode,
        "target_messages_per_second": rate,
        "messages_sent": sent,
        "messages_per_second": round(sent / float(report["seconds"])),
        "drained_s": round(waited, 2) if drained else None,
        "not_drained_after_s": None if drained else round(waited, 1),
        "restarted_to_drain": restarted,
        "rows_stored": stored,
        "lost_rows": lost,
        "db_p50_s": p50,
        "db_p99_s": p99,
        "cores": cores,
        "worker_cpu_us_per_sample": round(cores["worker"] * wall / expected * 1e6, 2),
        "worker_peak_rss_mb": round(rss, 1) if rss is not None else None,
    }
    result["sustained"] = bool(lost == 0 and drained and p99 is not None and p99 < 1.0)
    return result


def _metrics(port: int) -> dict[str, float]:
    """The worker's counters, by name with labels as Prometheus prints them (sorted by
    label name)."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def _fresh_services() -> dict[str, services.Service]:
    """Clean server state, an org with its own user and vhost, and Voke's queues."""
    started = fresh_services("mosquitto", "postgres", "rabbitmq")
    amqp = started["rabbitmq"]
    services.rabbitmq_tenants(amqp, {ORG: (_SECRETS["ENERGYBUS_BENCH_KEY"], ORG)})
    asyncio.run(_declare(amqp))
    subprocess.run(
        [*ENERGYBUS, "historian", "init", "--dsn", started["postgres"].url],
        check=True,
        capture_output=True,
    )
    os.environ.update(_SECRETS)
    return started


async def _declare(amqp: services.Service) -> None:
    import aio_pika

    from energybus.simulators.voke import declare

    connection = await aio_pika.connect(
        host=amqp.host,
        port=amqp.port,
        login=ORG,
        password=_SECRETS["ENERGYBUS_BENCH_KEY"],
        virtualhost=ORG,
    )
    async with connection:
        await declare(await connection.channel(), org=ORG)


def bench_voke(
    rates: list[int], seconds: float, drain: float, modes: list[str]
) -> list[dict[str, object]]:
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    started = _fresh_services()
    results: list[dict[str, object]] = []
    try:
        for rate in rates:
            for mode in modes:
                results.append(_run_one(mode, rate, seconds, drain, started))
                print(json.dumps({"benchmark": "voke", **results[-1]}), file=sys.stderr)
    finally:
        stop_services()
    return results


def bench_voke_restart(rate: int, seconds: float, drain: float) -> dict[str, object]:
    started = _fresh_services()
    mqtt, pg, amqp = started["mosquitto"], started["postgres"], started["rabbitmq"]
    site = f"restart{rate}-{int(time.time()) % 100000}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "site.toml"
            port = services.free_port()
            config.write_text(_config("voke", tmp, site, mqtt, pg, amqp, port))
            worker = _Worker(config, Path(tmp) / "worker.log")
            _start(worker, "voke")
            load = _load("voke", amqp.port, rate, seconds, site)
            times: dict[str, float] = {}

            def restart() -> None:
                time.sleep(seconds / 3)
                times["stop"] = time.time()
                services.stop("rabbitmq", run_dir=RUN)
                times["stopped"] = time.time()
                services.start("rabbitmq", run_dir=RUN, port=amqp.port)
                times["up"] = time.time()

            thread = threading.Thread(target=restart)
            thread.start()
            out, _ = load.communicate(timeout=seconds + 600)
            thread.join()
            report = json.loads(out)
            sent = int(report["sent"])
            expected = sent * VALUES_PER_MESSAGE

            def progress() -> int:
                return _rows(pg, site)

            drained, waited = _wait_drained(progress, expected, drain)
            counted = _metrics(port)
            log = worker.log.read_text()
            worker.stop()
            retire(config)
        stored = _rows(pg, site)
        distinct = int(
            _fetch(
                pg.url,
                "SELECT count(*) FROM (SELECT DISTINCT site, device_id, metric_name, observed_at"
                " FROM energybus.measurements WHERE site = $1 UNION ALL"
                " SELECT DISTINCT site, device_id, metric_name, observed_at"
                " FROM energybus.counter_readings WHERE site = $1) d",
                site,
            )[0][0]
        )
        up = datetime.fromtimestamp(times["up"], UTC)
        flowing = _fetch(
            pg.url,
            "SELECT min(ingested_at) FROM energybus.measurements"
            " WHERE site = $1 AND ingested_at > $2",
            site,
            up,
        )[0][0]
        return {
            "figure": "voke: RabbitMQ stopped and started under load",
            "target_messages_per_second": rate,
            "messages_sent": sent,
            "messages_sent_again_by_the_load": int(report["resent"]),
            "samples_expected": expected,
            "rows_stored": stored,
            "lost_rows": max(expected - stored, 0),
            "rows_stored_twice": stored - distinct,
            # Handled twice and absorbed: rows the historian already had (redeliveries),
            # and messages the load sent twice, refused by id.
            "duplicate_rows_absorbed_by_the_historian": counted.get(
                "energybus_historian_duplicate_rows_total", 0
            ),
            "messages_refused_as_replayed": counted.get(
                'energybus_rejections_total{reason="replayed",source="voke"}', 0
            ),
            "drained_s": round(waited, 2) if drained else None,
            "not_drained_after_s": None if drained else round(waited, 1),
            "rabbitmq_stop_to_up_s": round(times["up"] - times["stop"], 2),
            "rows_flow_again_after_up_s": (
                round(flowing.timestamp() - times["up"], 2) if flowing is not None else None
            ),
            "worker_log_tracebacks": log.count("Traceback"),
        }
    finally:
        stop_services()
