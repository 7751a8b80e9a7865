"""The worker end to end, beside Node-RED, with everything on this machine.

``./dev bench --only worker --rates 500,1000,2000`` starts Mosquitto, PostgreSQL and
Node-RED afresh under ``.run/bench``, and at each rate runs each mode in turn on the same
broker:

- ``historian``: the worker with the historian on (the whole job);
- ``bus``: the worker publishing only;
- ``nodered``: Node-RED's equivalent flow (benchmarks/nodered), bus only; before it is
  measured, a check that it publishes what energybus publishes for the same messages.

The load generator (benchmarks/load.py, a process of its own) publishes VEN metering
messages at the rate for ``--seconds``; each message gives 48 samples. Then the run
waits for the output to drain: every message's retained ``last`` of its battery's
``soc`` on the bus, and with the historian every row in ``energybus.measurements``. A
run that has not drained within ``--drain`` seconds is reported as such
(``not_drained_after_s``), the worker is stopped (SIGTERM writes what it holds) and
started again under the same client id so the broker redelivers what it had not
acknowledged, and only then is anything missing counted as ``lost``.

Latency is per message: from its timestamp (the publish time) to the arrival of its
``soc/last`` at a subscriber (``bus_p50_s``, ``bus_p99_s``), and with the historian
to the row's ``ingested_at`` (``db_p50_s``, ``db_p99_s``). CPU is read from ``/proc``
per component over the run (cores used: worker or Node-RED, broker, database, load
generator, the meter that is this process, and the machine in all), and turned into
the engine's CPU per sample, the database's CPU per row, and the broker's and the load
generator's CPU per source message. Peak RSS is the worker's VmHWM.

Each worker's MQTT sessions are dropped with ``energybus retire`` after its run, so
no earlier run's session makes the broker queue this run's messages.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.access import Access, MqttLogin, plain
from benchmarks.cpu import Meter, tree_seconds
from benchmarks.load import CHILDREN, start as start_load
from energybus.worker.bus import BusClient, Received
from tools import services

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "bench"
ENERGYBUS = [sys.executable, "-m", "energybus.cli"]
SAMPLES_PER_MESSAGE = 48
MODES = ("historian", "bus", "nodered")


def _fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class _BusMeter:
    """Subscribes to the run's ``soc/last`` topics on a thread of its own (its own event
    loop and the raw MQTT client of worker/bus.py: cheap per message, so the meter is
    not the bottleneck) and keeps each arrival's latency. With a ``login``, over TLS
    with a client certificate and a password, as the other clients of a locked-down run."""

    def __init__(self, port: int, site: str, login: MqttLogin | None = None) -> None:
        self.port = port
        self.login = login
        self.topic = f"{site}/energy/storage/+/soc/last"
        self.latencies: list[float] = []
        self.last_arrival = 0.0
        """Wall-clock time of the latest arrival: with the first publish's, the span
        over which the output was delivered."""
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._started = threading.Event()

    def __enter__(self) -> _BusMeter:
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("the bus meter did not connect")
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def count(self) -> int:
        return len(self.latencies)

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        latencies = self.latencies
        client: BusClient

        def on_message(message: Received) -> None:
            now = time.time()
            if message.packet_id:
                client.ack(message.packet_id)
            at = message.payload.find(b'"observed_at":"')
            if at < 0:
                return
            text = message.payload[at + 15 : message.payload.index(b'"', at + 15)].decode()
            observed = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
            latencies.append(now - observed)
            self.last_arrival = now

        client = BusClient(on_message=on_message, on_puback=lambda *_: None)
        login = self.login
        await client.connect(
            host="127.0.0.1",
            port=self.port,
            client_id=f"bench-meter-{id(self)}",
            clean_start=True,
            username=login.username if login else None,
            password=login.password if login else None,
            tls=login.context() if login else None,
        )
        await client.subscribe([self.topic], no_local=False)
        self._started.set()
        await self._stop.wait()
        await client.disconnect()


def retire(config: Path, env: dict[str, str] | None = None) -> None:
    """Drop a stopped worker's broker sessions, so the broker queues nothing for it while
    the next runs go on."""
    done = subprocess.run(
        [*ENERGYBUS, "retire", "--config", str(config)], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"retire failed: {done.stdout}{done.stderr}")


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return None, None
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return round(cuts[49], 4), round(cuts[98], 4)


def _wait_drained(
    progress: Callable[[], int], expected: int, timeout: float, quiet: float = 5.0
) -> tuple[bool, float]:
    """Wait until ``progress()`` reaches ``expected``, or ``timeout`` passes, or nothing
    moves for ``quiet`` seconds after the timeout's first half; (drained, seconds)."""
    start = time.monotonic()
    last_value, last_move = -1, start
    while True:
        value = progress()
        now = time.monotonic()
        if value >= expected:
            return True, now - start
        if value != last_value:
            last_value, last_move = value, now
        if now - start >= timeout or (now - start > timeout / 2 and now - last_move > quiet):
            return False, now - start
        time.sleep(0.2)


def load_report(load: subprocess.Popen[bytes], seconds: float) -> tuple[dict[str, Any], int, float]:
    """The load generator's report once it is done: the report, messages sent, and the
    seconds from the first publish to the last PUBACK."""
    out, _ = load.communicate(timeout=seconds + 180)
    report: dict[str, Any] = json.loads(out)
    return report, int(report["sent"]), float(report["seconds"])


class _Worker:
    def __init__(
        self,
        config: Path,
        log: Path,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.args = args or []
        """More options of ``energybus run`` (a group's)."""
        self.env = env
        """The environment its configuration's ``${VAR}`` come from (passwords)."""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*ENERGYBUS, "run", "--config", str(self.config), *self.args],
                stdout=out,
                stderr=out,
                env=self.env,
            )
        CHILDREN.append(self.process)
        deadline = time.monotonic() + 60
        while "source: connected" not in self.log.read_text()[offset:]:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _run_one(
    mode: str,
    rate: int,
    seconds: float,
    drain: float,
    access: Access,
    nodered: services.Service | None,
    site: str | None = None,
) -> dict[str, object]:
    """One run of ``mode`` at ``rate``; its clients reach the services as ``access``
    says (on a locked-down broker, ``site`` is the one its ACL was made for)."""
    mqtt, pg = access.mqtt, access.pg
    site = site or f"b{rate}-{mode}-{int(time.time()) % 100000}"
    client_id = f"bench-{site}"
    result: dict[str, object] = {
        "figure": "VEN metering messages, everything on this machine",
        "mode": mode,
        "target_messages_per_second": rate,
    }
    count_sql = "SELECT count(*) FROM energybus.measurements WHERE site = $1"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "site.toml"
        config.write_text(
            access.worker_config(
                data_dir=f"{tmp}/data", client_id=client_id, site=site,
                historian=mode == "historian",
            )
        )  # fmt: skip
        worker = _Worker(config, Path(tmp) / "worker.log", env=access.env("worker"))
        components = {"broker": mqtt.pid, "database": pg.pid}
        if mode == "nodered":
            from benchmarks.nodered import deploy

            assert nodered is not None
            deploy(nodered.url, mqtt_port=mqtt.port, site=site, client_id=client_id)
            components["nodered"] = nodered.pid
        else:
            components["worker"] = worker.start()
        with _BusMeter(mqtt.port, site, access.login("meter")) as meter:
            load = start_load(mqtt.port, rate, seconds, site, access.login("load"))
            cpu = Meter(components)
            cpu.start()
            meter_cpu = time.process_time()
            started = time.monotonic()
            report, sent, published = load_report(load, seconds)
            expected_rows = sent * SAMPLES_PER_MESSAGE

            def progress() -> int:
                """Samples through: every message's soc/last on the bus, and with the
                historian every row too (the lesser of the two)."""
                on_bus = meter.count * SAMPLES_PER_MESSAGE
                if mode != "historian":
                    return on_bus
                return min(on_bus, int(_fetch(access.dsn, count_sql, site)[0][0]))

            drained, waited = _wait_drained(progress, expected_rows, drain)
            wall = time.monotonic() - started
            cores = cpu.stop(wall)
            # The load generator has exited: its CPU is its own report. The meter is this
            # process alone (its threads, not the services it started).
            cores["load_generator"] = round(float(report["cpu_seconds"]) / wall, 3)
            meter_cores = round((time.process_time() - meter_cpu) / wall, 3)
            rss = _peak_rss_mb(worker.process.pid) if worker.process is not None else None
            restarted = False
            if not drained and mode != "nodered":
                worker.stop()
                worker.start()
                restarted = True
                _wait_drained(progress, expected_rows, 120, quiet=10)
            worker.stop()
            bus_latency = _percentiles(meter.latencies)
            on_bus = meter.count
            span = meter.last_arrival - float(report["started_at"])
        if mode == "nodered":
            _undeploy(nodered)
        else:
            retire(config, access.env("worker"))
    stored = None
    db_latency: tuple[float | None, float | None] = (None, None)
    if mode == "historian":
        stored = int(_fetch(access.dsn, count_sql, site)[0][0])
        row = _fetch(
            access.dsn,
            "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
            " (ORDER BY extract(epoch FROM ingested_at - observed_at))"
            " FROM energybus.measurements WHERE site = $1 AND metric_name = 'soc'",
            site,
        )[0][0]
        if row:
            db_latency = (round(row[0], 4), round(row[1], 4))
    lost_bus = max(sent - on_bus, 0)
    lost_rows = max(expected_rows - stored, 0) if stored is not None else None
    samples = sent * SAMPLES_PER_MESSAGE
    engine = cores.get("worker", cores.get("nodered", 0.0))
    result.update(
        {
            "messages_sent": sent,
            "messages_per_second": round(sent / published),
            "samples_per_second": round(samples / published),
            # What came out, over the span from the first publish to the last arrival:
            # below the offered rate when the output lagged or was lost.
            "delivered_messages_per_second": round(on_bus / span) if span > 0 else None,
            "drained_s": round(waited, 2) if drained else None,
            "not_drained_after_s": None if drained else round(waited, 1),
            "restarted_to_drain": restarted,
            "lost_messages_on_bus": lost_bus,
            "rows_stored": stored,
            "lost_rows": lost_rows,
            "zero_loss": lost_bus == 0 and not lost_rows,
            "bus_p50_s": bus_latency[0],
            "bus_p99_s": bus_latency[1],
            "db_p50_s": db_latency[0],
            "db_p99_s": db_latency[1],
            "cores": {**cores, "meter": meter_cores},
            "engine_cpu_us_per_sample": round(engine * wall / samples * 1e6, 2),
            # The broker's work grows with the source messages (each a publish in and
            # about 58 out, with their acknowledgements), the load generator's too.
            "broker_cpu_us_per_message": round(cores["broker"] * wall / sent * 1e6, 2),
            "load_generator_cpu_us_per_message": round(
                cores["load_generator"] * wall / sent * 1e6, 2
            ),
            "database_cpu_us_per_row": (
                round(cores["database"] * wall / samples * 1e6, 2) if mode == "historian" else None
            ),
            "worker_peak_rss_mb": round(rss, 1) if rss is not None else None,
        }
    )
    result["sustained"] = bool(
        result["zero_loss"]
        and drained
        and bus_latency[1] is not None
        and bus_latency[1] < 1.0
        and (mode != "historian" or (db_latency[1] is not None and db_latency[1] < 1.0))
    )
    return result


def _undeploy(nodered: services.Service | None) -> None:
    """An empty flow: Node-RED's MQTT connection closes, nothing of this run stays."""
    assert nodered is not None
    request = urllib.request.Request(
        f"{nodered.url}/flows",
        data=b"[]",
        method="POST",
        headers={"Content-Type": "application/json", "Node-RED-Deployment-Type": "full"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    with opener.open(request, timeout=30) as response:
        response.read()


def _check_nodered(nodered: services.Service, mqtt: services.Service) -> None:
    """Before Node-RED is measured: its flow publishes what energybus publishes for the
    same messages (raises NotEquivalent, with the difference, when it does not)."""
    from benchmarks.nodered import check_equivalence, deploy

    site, client_id = "check-nodered", "bench-check-nodered"
    deploy(nodered.url, mqtt_port=mqtt.port, site=site, client_id=client_id)
    try:
        check_equivalence(mqtt.port, site, client_id)
    finally:
        _undeploy(nodered)


def fresh_services(
    *names: str, run: Path = RUN, secure: bool = False
) -> dict[str, services.Service]:
    """Clean server state: whatever an earlier benchmark left under ``run`` (.run/bench)
    goes, and ``names`` start anew there (locked down, with ``secure``)."""
    stop_services(run)
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    return {name: services.start(name, run_dir=run, secure=secure) for name in names}


def stop_services(run: Path = RUN) -> None:
    """Stop every service a benchmark may have started under ``run`` (.run/bench)."""
    for name in ("nodered", "rabbitmq", "postgres", "mosquitto"):
        services.stop(name, run_dir=run)


def bench_worker(
    rates: list[int], seconds: float, drain: float, modes: list[str]
) -> list[dict[str, object]]:
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    names = ["mosquitto", "postgres"] + (["nodered"] if "nodered" in modes else [])
    started = fresh_services(*names)
    mqtt, pg = started["mosquitto"], started["postgres"]
    nodered = started.get("nodered")
    results: list[dict[str, object]] = []
    try:
        subprocess.run(
            [*ENERGYBUS, "historian", "init", "--dsn", pg.url], check=True, capture_output=True
        )
        if nodered is not None:
            _check_nodered(nodered, mqtt)
        for rate in rates:
            for mode in modes:
                results.append(_run_one(mode, rate, seconds, drain, plain(mqtt, pg), nodered))
                print(json.dumps({"benchmark": "worker", **results[-1]}), file=sys.stderr)
    finally:
        stop_services()
    return results


def bench_historian(
    rows_total: int = 500_000, batch: int = 5000, runs: int = 3
) -> dict[str, object]:
    """The historian's load rate against ``psql \\copy`` of the same rows into a table
    shaped as version 2's wide one (same key): each ``runs`` times, interleaved, on a
    fresh database each time; the best of each, with PostgreSQL's CPU per row."""
    from energybus.historian import Batch, Historian, migrate

    pg = fresh_services("postgres")["postgres"]
    t0 = datetime(2026, 6, 1, tzinfo=UTC)
    rows = [
        (f"load-{i % 7}", f"load.c-{i % 100}", "active_power", float(i),
         t0 + timedelta(seconds=i // 100), "good")
        for i in range(rows_total)
    ]  # fmt: skip

    def fresh_db() -> str:
        asyncio.run(_recreate(pg.url, "bench_historian"))
        return pg.url.rsplit("/", 1)[0] + "/bench_historian"

    async def ours(dsn: str) -> tuple[float, float]:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.close()
        historian = Historian(dsn)
        await historian.write(Batch(measurements=rows[:1]))  # partitions and connection warm
        db0 = tree_seconds(pg.pid)
        start = time.perf_counter()
        for i in range(1, len(rows), batch):
            await historian.write(Batch(measurements=rows[i : i + batch]))
        elapsed = time.perf_counter() - start
        db = tree_seconds(pg.pid) - db0
        await historian.close()
        return elapsed, db

    csv = Path(tempfile.mkstemp(suffix=".csv")[1])
    with csv.open("w") as f:
        for r in rows:
            f.write(f"{r[0]},{r[1]},{r[2]},{r[3]},{r[4].isoformat()},{r[5]}\n")
    psql = str(services._postgres_bin() / "psql")
    mine: list[tuple[float, float]] = []
    theirs: list[tuple[float, float]] = []
    try:
        for _ in range(runs):
            mine.append(asyncio.run(ours(fresh_db())))
            dsn = fresh_db()
            _fetch(
                dsn,
                "CREATE TABLE bench_copy (site text, device_id text, metric_name text,"
                " value float8, observed_at timestamptz, quality text,"
                " PRIMARY KEY (site, device_id, metric_name, observed_at))",
            )
            db0 = tree_seconds(pg.pid)
            start = time.perf_counter()
            subprocess.run(
                [psql, dsn, "-c", f"\\copy bench_copy FROM '{csv}' WITH (FORMAT csv)"],
                check=True, capture_output=True,
            )  # fmt: skip
            theirs.append((time.perf_counter() - start, tree_seconds(pg.pid) - db0))
    finally:
        csv.unlink()
        stop_services()
    best_mine, best_theirs = min(mine), min(theirs)
    return {
        "figure": "historian load rate vs psql \\copy of the same rows into the wide table"
        " (same key), best of interleaved runs on fresh databases",
        "rows": rows_total,
        "batch_rows": batch,
        "runs": runs,
        "historian_rows_per_second": round(rows_total / best_mine[0]),
        "psql_copy_rows_per_second": round(rows_total / best_theirs[0]),
        "ratio": round(best_theirs[0] / best_mine[0], 2),
        "historian_database_cpu_us_per_row": round(best_mine[1] / rows_total * 1e6, 2),
        "psql_copy_database_cpu_us_per_row": round(best_theirs[1] / rows_total * 1e6, 2),
    }


async def _recreate(admin: str, name: str) -> None:
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
