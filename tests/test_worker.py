"""The worker as a subprocess against a real Mosquitto and PostgreSQL."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.adapters import ven_messages
from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.ven import VenOptions
from tests.workers import (
    Collector,
    WorkerProcess,
    init_schema,
    publish,
    query,
    wait_rows,
    write_config,
)
from tools import services
from tools.services import Service

pytestmark = pytest.mark.services


def _expected_samples(site: str, messages: list[bytes]) -> int:
    pipeline = Pipeline(create_adapter("ven", options=VenOptions(site=site)))
    now = datetime.now(UTC)
    return sum(
        len(pipeline.feed("volttron/metering", m, received_at=now).samples) for m in messages
    )


def _site() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _ven_worker(
    tmp_path: Path, mosquitto: Service, postgres: Service, extra: str = ""
) -> tuple[str, Path]:
    """A fresh site and a configuration for a VEN worker on it, with the schema in place."""
    init_schema(postgres.url)
    site = _site()
    config = write_config(
        tmp_path / "site.toml",
        mqtt=mosquitto,
        dsn=postgres.url,
        client_id=f"w-{site}",
        extra=extra.format(site=site) + f'[adapters.ven]\nsite = "{site}"\n',
    )
    return site, config


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_ven_and_cpi_in_canonical_out_rows_in_bad_input_dead_lettered(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    init_schema(postgres.url)
    site = _site()
    port = services.free_port()
    config = write_config(
        tmp_path / "site.toml",
        mqtt=mosquitto,
        dsn=postgres.url,
        client_id=f"w-{site}",
        extra=(
            f'[adapters.ven]\nsite = "{site}"\n'
            f'[adapters.cpi]\nsite = "{site}"\n'
            '[adapters.cpi.plants.p1.targets.B1]\ntemplate = "battery"\n'
        ),
    )
    config.write_text(
        config.read_text().replace("[worker]\n", f"[worker]\nmetrics_port = {port}\n", 1)
    )
    collector = Collector(mosquitto, [f"{site}/energy/#", "energybus/#"])
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        messages = ven_messages(3, circuits=2)
        cpi = json.dumps(
            {"ts": int(time.time() * 1000), "target": "B1", "values": {"soc": 55.5}}
        ).encode()
        publish(
            mosquitto,
            [
                *(("volttron/metering", m) for m in messages),
                ("cpi/p1/telemetry", cpi),
                # Bad input on every source, and on the bus.
                ("volttron/metering", b"{not json"),
                ("volttron/metering", b'{"venId":"v\xff"}'),  # invalid UTF-8
                ("volttron/metering", b'{"venId":"' + b"x" * 1_000_000 + b'"}'),  # a 1 MB line
                ("cpi/p1/telemetry", b"[1, 2]"),
                ("cpi/unknown-plant/telemetry", cpi),
                (f"{site}/energy/grid/Main/active_power/value", b"1.0"),
                (f"{site}/energy/grid/main/active_power/value", b'"text"'),
                # Good canonical traffic from another publisher (Profile B keeps its time).
                (
                    f"{site}/energy/grid/meter-1/active_power/value",
                    b'{"value": 1200.5, "unit": "W", "observed_at": "2026-11-01T00:00:00Z"}',
                ),
            ],
        )
        expected = _expected_samples(site, messages)
        collector.wait_for(lambda t: sum("dead_letter" in x for x in t) >= 7)
        rows = wait_rows(
            postgres.url,
            f"SELECT count(*) FROM energybus.measurements WHERE site = '{site}'",
            expected + 2,
        )
        assert rows == expected + 2  # VEN samples, the CPI soc, the bus-ingested value
        topics = collector.topics()
        assert f"{site}/energy/storage/ven-042-battery/soc/value" in topics
        assert f"{site}/energy/storage/ven-042-battery/soc/meta" in topics
        assert f"{site}/energy/storage/ven-042-battery/soc/availability" in topics
        letters = [
            json.loads(p) for t, p, _ in collector.messages if t.startswith("energybus/dead_letter")
        ]
        by_source = {(x["source"], x["reason"]) for x in letters}
        assert ("ven", "malformed_json") in by_source
        assert {s for s, _ in by_source} >= {"ven", "cpi", "bus"}
        assert all(not r for t, _, r in collector.messages if "dead_letter" in t)
        assert any(
            x["payload"] == "{not json" and x["topic"] == "volttron/metering" for x in letters
        )
        text = _metrics(port)
        assert 'energybus_rejections_total{reason="malformed_json",source="ven"} 1.0' in text
        assert 'energybus_messages_in_total{adapter="ven"} 6.0' in text
        assert ("ven", "invalid_utf8") in by_source
        # The 1 MB line is past max_payload_bytes: its size is kept, not its body.
        (big,) = [x for x in letters if x["reason"] == "too_large"]
        assert big["size"] > 1_000_000 and "payload" not in big
        assert worker.alive()
        assert "Traceback" not in worker.text()
        # Shutdown: exit 0, status offline (retained).
        assert worker.stop(signal.SIGTERM) == 0
        status = f"energybus/worker/w-{site}/status"
        collector.wait_for_payload(status, b"offline")
        assert collector.payloads(status)[0] == b"online"
    finally:
        collector.close()
        if worker.alive():
            worker.stop(signal.SIGKILL)


def _load(
    mosquitto: Service, messages: list[bytes], *, pace: float, done: threading.Event
) -> threading.Thread:
    def run() -> None:
        publish(mosquitto, (("volttron/metering", m) for m in messages), pace=pace)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("outage", ["stop", "crash"])
def test_postgres_stopped_under_load_loses_and_duplicates_nothing(
    tmp_path: Path, mosquitto: Service, postgres: Service, outage: str
) -> None:
    """A clean stop (fast shutdown, clients cut off) and a crash (SIGKILL, recovery at the
    next start) of PostgreSQL under load."""
    site, config = _ven_worker(tmp_path, mosquitto, postgres)
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    messages = ven_messages(600, circuits=10, seed=7)
    expected = _expected_samples(site, messages)
    done = threading.Event()
    try:
        thread = _load(mosquitto, messages, pace=0.004, done=done)
        time.sleep(0.5)
        if outage == "stop":
            services.stop("postgres", run_dir=Path(postgres.run_dir))
        else:
            services.crash("postgres", run_dir=Path(postgres.run_dir))
        worker.wait_for_log("historian unreachable")
        time.sleep(1.0)
        services.start("postgres", run_dir=Path(postgres.run_dir), port=postgres.port)
        thread.join(120)
        assert done.is_set()
        count_sql = f"SELECT count(*) FROM energybus.measurements WHERE site = '{site}'"
        assert wait_rows(postgres.url, count_sql, expected) == expected
        worker.wait_for_log("outbox replayed")
        assert worker.stop() == 0
        assert query(postgres.url, count_sql)[0][0] == expected
    finally:
        if worker.alive():
            worker.stop(signal.SIGKILL)
        services.start("postgres", run_dir=Path(postgres.run_dir), port=postgres.port)


def test_sigkill_under_load_then_restart_loses_and_duplicates_nothing(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    site, config = _ven_worker(tmp_path, mosquitto, postgres)
    log = tmp_path / "worker.log"
    worker = WorkerProcess(config, log).start()
    messages = ven_messages(600, circuits=10, seed=11)
    expected = _expected_samples(site, messages)
    done = threading.Event()
    try:
        thread = _load(mosquitto, messages, pace=0.003, done=done)
        time.sleep(0.8)
        assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(0.5)
        worker = WorkerProcess(config, log).start()
        thread.join(120)
        assert done.is_set()
        count_sql = f"SELECT count(*) FROM energybus.measurements WHERE site = '{site}'"
        assert wait_rows(postgres.url, count_sql, expected) == expected
        assert worker.stop() == 0
        assert query(postgres.url, count_sql)[0][0] == expected
    finally:
        if worker.alive():
            worker.stop(signal.SIGKILL)


def test_counter_reset_and_rollover_give_correct_energy(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    site, config = _ven_worker(
        tmp_path,
        mosquitto,
        postgres,
        '[[historian.counters]]\nsite = "{site}"\nmetric = "import_energy_total"\n'
        "wrap_at = 1000000.0\nmax_rate = 1000.0\n",
    )
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    # 15-minute readings in Wh: +100, +100, reset to 50, +100, rollover near 1e6 (+30).
    readings = [1000, 1100, 1200, 50, 150, 999_980, 10]
    topic = f"{site}/energy/grid/main-meter/import_energy_total/value"
    try:
        publish(
            mosquitto,
            [
                (
                    topic,
                    json.dumps(
                        {
                            "value": value,
                            "unit": "Wh",
                            "observed_at": f"2026-11-01T{index // 4:02d}:{index % 4 * 15:02d}:00Z",
                        }
                    ).encode(),
                )
                for index, value in enumerate(readings)
            ],
        )
        count_sql = f"SELECT count(*) FROM energybus.counter_readings WHERE site = '{site}'"
        assert wait_rows(postgres.url, count_sql, len(readings)) == len(readings)
    finally:
        worker.stop()
    import subprocess

    from tests.workers import ENERGYBUS

    result = subprocess.run(
        [
            *ENERGYBUS, "historian", "energy", "--dsn", postgres.url, "--site", site,
            "--device", "grid.main-meter", "--metric", "import_energy_total",
            "--from", "2026-11-01T00:00:00Z", "--to", "2026-11-01T02:00:00Z",
            "--every", "1h", "--json",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    buckets = [x for x in lines if "energy" in x]
    events = [x["event"] for x in lines if "event" in x]
    # 00:00-01:00: 1000 (start), +100, +100, reset to 50 (counts 50) = 250
    # 01:00-02:00: 150 (+100), 999980 (at most 1000 Wh/s * 900 s: a jump? no: +999830 > 900000)
    assert next(b["energy"] for b in buckets) == 250
    assert [e["event"] for e in events] == ["reset", "jump", "rollover"]
    assert [b["energy"] for b in buckets][1] == 100 + 30


def test_broker_restart_each_connection_notices_its_own_loss(
    tmp_path: Path, run_dir: Path, postgres: Service
) -> None:
    """Under load, both connections log their loss while the broker is still down (the
    source used to notice only once the bus was back, when messages it had already
    received were waiting to be handed over), reconnect, and traffic flows again."""
    broker_dir = run_dir / f"restart-{uuid.uuid4().hex[:8]}"
    broker = services.start("mosquitto", run_dir=broker_dir)
    worker: WorkerProcess | None = None
    try:
        site, config = _ven_worker(tmp_path, broker, postgres)
        worker = WorkerProcess(config, tmp_path / "worker.log").start()
        worker.wait_for_log("bus: connected")
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"load-{site}")
        client.max_inflight_messages_set(5000)
        client.connect(broker.host, broker.port)
        client.loop_start()
        for message in ven_messages(3000, circuits=10, seed=11):
            client.publish("volttron/metering", message, qos=1)
        time.sleep(1.0)  # the worker is busy: received messages wait to be handed over
        services.stop("mosquitto", run_dir=broker_dir)
        client.loop_stop()
        worker.wait_for_log("bus: connection lost")
        worker.wait_for_log("source: connection lost", timeout=10)
        assert services.running("mosquitto", run_dir=broker_dir) is None  # still down
        services.start("mosquitto", run_dir=broker_dir, port=broker.port)
        worker.wait_for_log("source: connected", count=2)
        worker.wait_for_log("bus: connected", count=2)
        body = {"venId": "after", "timestamp": 1729700000, "batterySOC": 42.0}
        publish(broker, [("volttron/metering", json.dumps(body).encode())])
        count_sql = (
            f"SELECT count(*) FROM energybus.measurements WHERE site = '{site}'"
            " AND device_id = 'storage.after-battery'"
        )
        assert wait_rows(postgres.url, count_sql, 1, timeout=30) == 1
        assert worker.stop() == 0
    finally:
        if worker is not None and worker.alive():
            worker.stop(signal.SIGKILL)
        services.stop("mosquitto", run_dir=broker_dir)
