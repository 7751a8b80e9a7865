"""The admission gate in a running worker, against a real Mosquitto and PostgreSQL:
retained sets refused and cleared, stale and future sets refused, the bound on sets that
waited at the broker, and every refusal on the record in command_logs."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.workers import (
    ENERGYBUS,
    Collector,
    WorkerProcess,
    init_schema,
    publish,
    query,
    write_config,
)
from tools.services import Service

pytestmark = pytest.mark.services


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _records(dsn: str, site: str, count: int, timeout: float = 20) -> list[Any]:
    sql = (
        "SELECT state, code, reason, value FROM energybus.command_logs"
        " WHERE site = $1 ORDER BY accepted_at, updated_at"
    )
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = query(dsn, sql, site)
        if len(rows) >= count:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{len(rows)} of {count} command records: {rows}")


def _retained_on(mosquitto: Service, topic: str, wait: float = 1.5) -> list[bytes]:
    """What a new subscriber is given as retained on ``topic``."""
    seen: list[bytes] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"look-{uuid.uuid4().hex[:6]}")
    client.on_message = lambda c, u, m: seen.append(bytes(m.payload)) if m.retain else None
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    time.sleep(wait)
    client.loop_stop()
    client.disconnect()
    return seen


def test_every_set_passes_the_gate_and_every_refusal_is_on_the_record(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    init_schema(postgres.url)
    site = f"t-{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path / "site.toml",
        mqtt=mosquitto,
        dsn=postgres.url,
        client_id=f"w-{site}",
        extra=f'[adapters.ven]\nsite = "{site}"\ncommand_max_age_s = 3\n'
        "[adapters.ven.vens.v1]\n"
        "[[adapters.ven.interlocks]]\n"
        'filter = "+/energy/load/+/shed_power/set"\nmax = 50000\nwhy = "panel rating"\n',
    )
    set_topic = f"{site}/energy/load/v1/shed_power/set"
    commands = Collector(mosquitto, ["ven/cmd/v1"])
    letters = Collector(mosquitto, ["energybus/dead_letter/ven"])
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        metering = {"venId": "v1", "timestamp": time.time(), "usedPowerKw": 1.0}
        publish(mosquitto, [("volttron/metering", json.dumps(metering).encode())])
        now = datetime.now(UTC)
        sets = [
            b"2000",  # admitted
            json.dumps({"value": 2000, "observed_at": _iso(now - timedelta(hours=2))}).encode(),
            json.dumps({"value": 2000, "observed_at": _iso(now + timedelta(minutes=1))}).encode(),
            json.dumps({"value": 3000, "observed_at": _iso(now - timedelta(seconds=1))}).encode(),
            b"{not json",
            b"true",
            b"NaN",
            json.dumps({"value": 2, "unit": "kW"}).encode(),
            json.dumps({"value": 2, "unit": "furlong"}).encode(),
            b"60000",  # above the interlock
        ]
        publish(mosquitto, [(set_topic, payload) for payload in sets], pace=0.05)
        # Live and retained: refused though the broker would clear the flag without
        # Retain As Published, then cleared at the broker.
        publish(mosquitto, [(set_topic, b"1000")], retain=True)
        commands.wait_for(lambda topics: len(topics) >= 2)
        rows = _records(postgres.url, site, 11)
        refused = [(r["code"], r["value"]) for r in rows if r["state"] == "refused"]
        assert sorted(refused, key=str) == sorted(
            [
                ("stale_command", "2000"),
                ("stale_command", "2000"),
                ("malformed_json", None),
                ("interlock", "true"),  # an interlocked series takes numbers
                ("malformed_json", None),
                ("unit_mismatch", "2"),
                ("unknown_unit", "2"),
                ("interlock", "60000"),
                ("retained_set", "1000"),
            ],
            key=str,
        )
        sent = [json.loads(p)["shed_kw"] for t, p, _ in commands.messages]
        assert sent == [2.0, 3.0]  # only the admitted two reached the VEN
        assert all(r["reason"] for r in rows if r["state"] == "refused")
        letters.wait_for(lambda topics: len(topics) >= 9)
        assert _retained_on(mosquitto, set_topic) == []  # the broker's copy is gone

        # Replayed at start-up: a retained set published while the worker is down.
        assert worker.stop() == 0
        publish(mosquitto, [(set_topic, b"1500")], retain=True)
        # Sent while the worker was down: a Profile B set that outlives its age, a Profile A
        # set whose sender bounded it with a message expiry, and one that did not.
        stale = json.dumps({"value": 4000, "observed_at": _iso(datetime.now(UTC))}).encode()
        publish(mosquitto, [(set_topic, stale)])
        publish(mosquitto, [(set_topic, b"5000")], expiry_s=1)
        publish(mosquitto, [(set_topic, b"6000")])
        time.sleep(4)
        worker = WorkerProcess(config, tmp_path / "worker.log").start()
        rows = _records(postgres.url, site, 14)
        later = [(r["state"], r["code"], r["value"]) for r in rows[11:]]
        assert ("refused", "retained_set", "1500") in later
        assert ("refused", "stale_command", "4000") in later
        assert not any(value == "5000" for _, _, value in later)  # expired at the broker
        commands.wait_for(lambda topics: len(topics) >= 3)
        assert json.loads(commands.messages[-1][1])["shed_kw"] == 6.0  # untimed: executed
        assert _retained_on(mosquitto, set_topic) == []

        # The operator's view.
        listing = subprocess.run(
            [*ENERGYBUS, "commands", "list", "--dsn", postgres.url, "--site", site,
             "--state", "refused", "--json"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert listing.returncode == 0, listing.stderr
        listed = [json.loads(line) for line in listing.stdout.splitlines()]
        assert len(listed) == 11 and {x["state"] for x in listed} == {"refused"}
        assert {x["code"] for x in listed} >= {"retained_set", "stale_command", "interlock"}
        assert worker.stop() == 0
    finally:
        commands.close()
        letters.close()
        if worker.alive():
            worker.stop()
