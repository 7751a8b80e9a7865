"""Several workers in one shared group (``--shared-group``) against a real Mosquitto and
PostgreSQL: steady VEN and signed CPI load, signed CPI commands answered by a plant, one
member SIGKILLed mid-load and started again. After draining: every sample stored exactly
once, every command confirmed exactly once, and no series' retained ``last`` ever moved
back in observation time (a subscriber sees every ``last`` publish), ending on the newest
sample (docs/scaling.md)."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.adapters import ven_messages
from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.signing import Signer
from energybus.worker.config import load_config
from tests.workers import (
    Collector,
    WorkerProcess,
    init_schema,
    publish,
    query,
    write_config,
)
from tools.services import Service

pytestmark = pytest.mark.services

VENS = 41
"""VENs, each its own site, one metering message (48 samples) per round. Not a multiple
of the group's size: the broker hands the members a group's messages in turn, so the
messages of one VEN go to each member in turn too (with 40 and 2 members, every VEN
would stay with one member)."""
TARGETS = 4
"""Batteries of the CPI plant, one telemetry message each per round."""
ROUNDS = 15
SPACING_S = 2.0
"""Between two samples of one series (docs/scaling.md: what `last` needs)."""
KILL_ROUND = 6
DOWN_S = 2.5 * SPACING_S

Key = tuple[str, str, str, datetime]
"""(site, device_id, metric, observed_at): a sample, as the historian keys it."""


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class _Plant:
    """A CPI plant: answers every signed command on its topic with a signed ``ok``."""

    def __init__(self, mqtt: Service, plant: str, signer: Signer) -> None:
        self.plant = plant
        self.signer = signer
        self.received: list[str] = []
        self.answered: dict[str, int] = {}
        """cmdId -> the ``ts`` of its ACK (the confirmation's observation time)."""
        self.faults: list[str] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"plant-{plant}")
        self.client.on_message = self._on_command
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect(mqtt.host, mqtt.port)
        self.client.loop_start()
        self.client.subscribe(f"cpi/{plant}/commands", qos=1)
        assert ready.wait(10)

    def _on_command(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            command = json.loads(message.payload)
            self.signer.verify(command)
        except Exception as error:  # recorded, and the test fails on it
            self.faults.append(repr(error))
            return
        ack: dict[str, Any] = {
            "cmdId": command["cmdId"],
            "status": "ok",
            "ts": int(time.time() * 1000),
        }
        ack["sig"] = self.signer.sign(ack)
        with self._lock:
            self.received.append(command["cmdId"])
            self.answered[command["cmdId"]] = ack["ts"]
        client.publish(f"cpi/{self.plant}/commands/ack", json.dumps(ack), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class _Group:
    """The workers of one shared group, each with its own client id and data directory."""

    def __init__(
        self, tmp_path: Path, size: int, mqtt: Service, dsn: str, extra: list[str]
    ) -> None:
        self.name = f"g-{uuid.uuid4().hex[:8]}"
        self.workers: list[WorkerProcess] = []
        self.configs: list[Path] = []
        for index in range(size):
            folder = tmp_path / f"w{index}"
            folder.mkdir()
            config = write_config(
                folder / "site.toml",
                mqtt=mqtt,
                dsn=dsn,
                client_id=f"{self.name}-w{index}",
                extra=extra[index],
            )
            self.configs.append(config)
            self.workers.append(
                WorkerProcess(config, folder / "worker.log", args=["--shared-group", self.name])
            )

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def logs(self) -> str:
        return "\n".join(w.text() for w in self.workers)

    def stop(self) -> list[int]:
        codes = [w.stop() for w in self.workers if w.alive()]
        return codes

    def kill(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.stop(signal.SIGKILL)


class _Load:
    """Publishes the rounds on schedule and keeps, through pipelines of the workers'
    own configuration, every sample they must store."""

    def __init__(self, config: Path, tag: str, plant: str, signer: Signer) -> None:
        loaded = load_config(config)
        self.pipelines = {
            name: Pipeline(create_adapter(name, options=options))
            for name, options in loaded.adapters.items()
        }
        self.tag = tag
        self.plant = plant
        self.signer = signer
        self.expected: set[Key] = set()
        self.sites: set[str] = set()
        self.template = [json.loads(m) for m in ven_messages(ROUNDS * VENS, seed=3)]
        self.done = threading.Event()
        self.started = time.monotonic()

    def _keep(self, adapter: str, topic: str, payload: bytes) -> None:
        out = self.pipelines[adapter].feed(topic, payload, received_at=datetime.now(UTC))
        assert not out.rejections, out.rejections
        for sample in out.samples:
            self.sites.add(sample.site)
            device = f"{sample.entity_type}.{sample.entity_id}"
            self.expected.add((sample.site, device, sample.metric, sample.observed_at))

    def messages(self) -> Iterator[tuple[str, bytes]]:
        base = int(time.time())
        for round_ in range(ROUNDS):
            delay = self.started + round_ * SPACING_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for ven in range(VENS):
                body = self.template[round_ * VENS + ven]
                body["venId"] = f"{self.tag}-v{ven}"
                body["timestamp"] = base + round_ * SPACING_S
                payload = msgspec.json.encode(body)
                self._keep("ven", "volttron/metering", payload)
                yield "volttron/metering", payload
            for target in range(1, TARGETS + 1):
                telemetry: dict[str, Any] = {
                    "ts": int(time.time() * 1000),
                    "target": f"B{target}",
                    "values": {"soc": 40.0 + round_, "soh": 97.5, "p_charge": 1.5 * target},
                }
                telemetry["sig"] = self.signer.sign(telemetry)
                payload = msgspec.json.encode(telemetry)
                topic = f"cpi/{self.plant}/telemetry"
                self._keep("cpi", topic, payload)
                yield topic, payload

    def run(self, mqtt: Service) -> threading.Thread:
        def run() -> None:
            publish(mqtt, self.messages())
            self.done.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def _confirmed(dsn: str, command_id: str) -> bool:
    rows = query(dsn, "SELECT state FROM energybus.command_logs WHERE id = $1", command_id)
    return bool(rows) and rows[0][0] == "confirmed"


class _Commands:
    """One ``set`` at a time, each to the next battery, never more than one in flight:
    ``quiet`` is held while a command is between its ``set`` and its confirmed record, so
    the test can kill a worker between commands (a command in flight when its worker dies
    is a limit of its own, docs/scaling.md)."""

    def __init__(self, mqtt: Service, dsn: str, site: str, entity: str, plant: _Plant) -> None:
        self.mqtt = mqtt
        self.dsn = dsn
        self.site = site
        self.entity = entity
        self.plant = plant
        self.quiet = threading.Lock()
        self.sent: list[tuple[str, int]] = []
        """(set topic, value) of every command."""
        self.failure: str | None = None

    def run(self, rounds: int) -> threading.Thread:
        def run() -> None:
            for number in range(rounds):
                time.sleep(SPACING_S / 2)
                with self.quiet:
                    topic = (
                        f"{self.site}/energy/storage/{self.entity}-b{number % TARGETS + 1}"
                        "/power_setpoint/set"
                    )
                    value = 1000 + 10 * number
                    seen = len(self.plant.received)
                    publish(self.mqtt, [(topic, str(value).encode())])
                    deadline = time.monotonic() + 60
                    while len(self.plant.received) <= seen and time.monotonic() < deadline:
                        time.sleep(0.05)
                    if len(self.plant.received) <= seen:
                        self.failure = f"the plant never received the command for {topic}"
                        return
                    command_id = self.plant.received[seen]
                    while not _confirmed(self.dsn, command_id) and time.monotonic() < deadline:
                        time.sleep(0.1)
                    self.sent.append((topic, value))
                    if not _confirmed(self.dsn, command_id):
                        self.failure = f"command {command_id} ({topic}) never confirmed"
                        return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"not drained in {timeout:g} s: {what}")


def _stored(dsn: str, sites: list[str]) -> dict[Key, int]:
    rows = query(
        dsn,
        "SELECT site, device_id, metric_name, observed_at, count(*) FROM ("
        " SELECT site, device_id, metric_name, observed_at FROM energybus.measurements"
        "  WHERE site = ANY($1)"
        " UNION ALL SELECT site, device_id, metric_name, observed_at"
        "  FROM energybus.counter_readings WHERE site = ANY($1)"
        ") AS s GROUP BY 1, 2, 3, 4",
        sites,
    )
    return {(r[0], r[1], r[2], r[3]): r[4] for r in rows}


def _lasts(collector: Collector) -> dict[str, list[datetime]]:
    """Every ``last`` publish seen, per topic, in the order they arrived."""
    seen: dict[str, list[datetime]] = defaultdict(list)
    for topic, payload, _ in list(collector.messages):
        seen[topic].append(_at(json.loads(payload)["observed_at"]))
    return seen


def _retained(mqtt: Service, filters: list[str]) -> dict[str, datetime]:
    """What a new subscriber is given as the retained ``last`` of each series: read until
    a marker published after subscribing comes back."""
    found: dict[str, datetime] = {}
    marker = f"scale-test/marker/{uuid.uuid4().hex}"
    arrived = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if message.topic == marker:
            arrived.set()
        elif message.retain:
            found[message.topic] = _at(json.loads(message.payload)["observed_at"])

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"look-{uuid.uuid4().hex[:6]}")
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(mqtt.host, mqtt.port)
    client.loop_start()
    try:
        client.subscribe([*((f, 1) for f in filters), (marker, 1)])
        assert subscribed.wait(10)
        client.publish(marker, b"", qos=1).wait_for_publish(10)
        assert arrived.wait(30)
    finally:
        client.loop_stop()
        client.disconnect()
    return found


def _last_topic(key: Key) -> str:
    site, device, metric, _ = key
    entity_type, entity_id = device.split(".", 1)
    return f"{site}/energy/{entity_type}/{entity_id}/{metric}/last"


def test_a_group_ingests_other_publishers_values_but_not_its_own_output(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    """A member's canonical values reach the other members' bus ingest (No Local covers
    only a member's own publishes); read back as Profile A they would be new samples
    stamped with their arrival, so the group passes over what it published itself."""
    init_schema(postgres.url)
    tag = f"s{uuid.uuid4().hex[:8]}"
    group = _Group(tmp_path, 2, mosquitto, postgres.url, [f'[adapters.ven]\nsite = "{tag}"\n'] * 2)
    messages = ven_messages(20, circuits=2, seed=5)
    pipeline = Pipeline(
        create_adapter("ven", options=load_config(group.configs[0]).adapters["ven"])
    )
    now = datetime.now(UTC)
    expected = sum(
        len(pipeline.feed("volttron/metering", m, received_at=now).samples) for m in messages
    )
    try:
        group.start()
        publish(mosquitto, [("volttron/metering", m) for m in messages])
        # Another publisher's value: ingested by one member, once.
        publish(mosquitto, [(f"{tag}/energy/grid/meter-x/active_power/value", b"1250.5")])
        sql = f"SELECT count(*) FROM energybus.measurements WHERE site = '{tag}'"
        _wait(lambda: query(postgres.url, sql)[0][0] >= expected + 1, 60, "every sample stored")
        assert sorted(group.stop()) == [0, 0]
        assert query(postgres.url, sql)[0][0] == expected + 1
        ingested = query(
            postgres.url,
            "SELECT quality FROM energybus.measurements WHERE site = $1 AND device_id = $2",
            tag,
            "grid.meter-x",
        )
        assert [r[0] for r in ingested] == ["degraded"]  # Profile A: stamped on arrival
    finally:
        group.kill()
