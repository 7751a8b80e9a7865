"""The worker end to end, with Mosquitto, PostgreSQL and the worker on this machine.

``./dev bench --only worker`` starts the services under ``.run/bench``, runs the worker
as a subprocess with the historian on, and publishes VEN metering messages (10
circuits, 10 loads; each message its own VEN, timestamp and readings) at each rate in
``--rates`` for ``--seconds``. A rate counts as sustained when every sample is in the
measurement historian within 30 s of the last publish. Latency is per row, from the
message's timestamp (the publish time) to its insert in the database (``ingested_at``,
``clock_timestamp()`` inside the committing transaction). Peak RSS is the worker's
VmHWM. ``--only historian`` compares the historian's own load rate (COPY to staging,
then INSERT ... ON CONFLICT DO NOTHING, in batches) with ``psql \\copy`` of the same rows
into a table with the same key.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.adapters import ven_messages
from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.ven import VenOptions
from tools import services

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "bench"


async def _fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def _template() -> tuple[dict[str, Any], int]:
    body = json.loads(ven_messages(1, circuits=10)[0])
    pipeline = Pipeline(create_adapter("ven", options=VenOptions(site="bench")))
    samples = len(
        pipeline.feed(
            "volttron/metering", json.dumps(body).encode(), received_at=datetime.now(UTC)
        ).samples
    )
    return body, samples


def _publish_at(port: int, rate: int, seconds: float, body: dict[str, Any], tag: str) -> int:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-load-{tag}")
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    rnd = random.Random(rate)
    sent = 0
    start = time.perf_counter()
    infos = []
    while True:
        now = time.perf_counter()
        if now - start >= seconds:
            break
        due = int((now - start) * rate)
        while sent < due:
            body["venId"] = f"ven-{tag}-{sent % 200}"
            body["timestamp"] = time.time()
            for circuit in body["circuits"]:
                circuit["currentKw"] = round(rnd.uniform(0, 8), 3)
            infos.append(client.publish("volttron/metering", json.dumps(body), qos=1))
            sent += 1
        time.sleep(0.001)
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    client.disconnect()
    return sent


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_worker(rates: list[int], seconds: float) -> list[dict[str, object]]:
    RUN.mkdir(parents=True, exist_ok=True)
    mqtt = services.start("mosquitto", run_dir=RUN)
    pg = services.start("postgres", run_dir=RUN)
    subprocess.run(
        ["energybus", "historian", "init", "--dsn", pg.url], check=True, capture_output=True
    )
    body, per_message = _template()
    results: list[dict[str, object]] = []
    for rate in rates:
        site = f"bench-{rate}-{int(time.time())}"
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "site.toml"
            config.write_text(
                f'[worker]\ndata_dir = "{tmp}/data"\n'
                f'[mqtt]\nport = {mqtt.port}\nclient_id = "{site}"\n'
                f'[historian]\ndsn = "{pg.url}"\n[adapters.ven]\nsite = "{site}"\n'
            )
            log = Path(tmp) / "worker.log"
            with log.open("wb") as out:
                worker = subprocess.Popen(
                    ["energybus", "run", "--config", str(config)], stdout=out, stderr=out
                )
            while "source: connected" not in log.read_text():
                time.sleep(0.05)
            sent = _publish_at(mqtt.port, rate, seconds, body, site)
            published = time.monotonic()
            expected = sent * per_message
            count_sql = "SELECT count(*) FROM energybus.measurements WHERE site = $1"
            stored = 0
            while time.monotonic() - published < 30:
                stored = asyncio.run(_fetch(pg.url, count_sql, site))[0][0]
                if stored >= expected:
                    break
                time.sleep(0.2)
            drained = time.monotonic() - published
            rss = _peak_rss_mb(worker.pid)
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
            latency = asyncio.run(
                _fetch(
                    pg.url,
                    "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
                    " (ORDER BY extract(epoch FROM ingested_at - observed_at))"
                    " FROM energybus.measurements WHERE site = $1 AND metric_name = 'soc'",
                    site,
                )
            )[0][0]
        results.append(
            {
                "figure": "VEN metering messages through the worker, historian on",
                "target_messages_per_second": rate,
                "messages_per_second": round(sent / seconds),
                "samples_per_second": round(sent * per_message / seconds),
                "samples_per_message": per_message,
                "zero_loss": stored == expected,
                "rows_expected": expected,
                "rows_stored": stored,
                "drain_seconds_after_last_publish": round(drained, 2),
                "latency_p50_s": round(latency[0], 4) if latency else None,
                "latency_p99_s": round(latency[1], 4) if latency else None,
                "worker_peak_rss_mb": round(rss, 1),
            }
        )
    return results


def bench_historian(rows_total: int = 500_000, batch: int = 5000) -> dict[str, object]:
    from energybus.historian import Batch, Historian, migrate

    RUN.mkdir(parents=True, exist_ok=True)
    pg = services.start("postgres", run_dir=RUN)
    t0 = datetime(2026, 6, 1, tzinfo=UTC)
    rows = [
        (f"load-{i % 7}", f"load.c-{i % 100}", "active_power", float(i),
         t0 + timedelta(seconds=i // 100), "good")
        for i in range(rows_total)
    ]  # fmt: skip

    async def ours() -> float:
        conn = await asyncpg.connect(pg.url)
        await conn.execute("DROP DATABASE IF EXISTS bench_historian WITH (FORCE)")
        await conn.execute("CREATE DATABASE bench_historian")
        await conn.close()
        dsn = pg.url.rsplit("/", 1)[0] + "/bench_historian"
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.close()
        historian = Historian(dsn)
        await historian.write(Batch(measurements=rows[:1]))  # partitions and connection warm
        start = time.perf_counter()
        for i in range(1, len(rows), batch):
            await historian.write(Batch(measurements=rows[i : i + batch]))
        elapsed = time.perf_counter() - start
        await historian.close()
        return elapsed

    async def scratch() -> None:
        conn = await asyncpg.connect(pg.url)
        await conn.execute(
            "DROP TABLE IF EXISTS bench_copy; CREATE TABLE bench_copy (site text, device_id text,"
            " metric_name text, value float8, observed_at timestamptz, quality text,"
            " PRIMARY KEY (site, device_id, metric_name, observed_at))"
        )
        await conn.close()

    ours_s = asyncio.run(ours())
    asyncio.run(scratch())
    with tempfile.NamedTemporaryFile("w", suffix=".csv", delete=False) as f:
        for r in rows:
            f.write(f"{r[0]},{r[1]},{r[2]},{r[3]},{r[4].isoformat()},{r[5]}\n")
    psql = str(services._postgres_bin() / "psql")
    start = time.perf_counter()
    subprocess.run(
        [psql, pg.url, "-c", f"\\copy bench_copy FROM '{f.name}' WITH (FORMAT csv)"],
        check=True, capture_output=True,
    )  # fmt: skip
    copy_s = time.perf_counter() - start
    Path(f.name).unlink()
    return {
        "figure": "historian load rate vs psql \\copy of the same rows (same primary key)",
        "rows": rows_total,
        "batch_rows": batch,
        "historian_rows_per_second": round(rows_total / ours_s),
        "psql_copy_rows_per_second": round(rows_total / copy_s),
        "ratio": round(copy_s / ours_s, 2),
    }
