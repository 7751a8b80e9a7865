"""Several workers in one group against a real Mosquitto and PostgreSQL (docs/scaling.md).

Two and three members partitioned by site (``--shared-group NAME --member I/N``) under
steady VEN and signed CPI load, signed CPI commands answered by a plant, one member
SIGKILLed mid-load and started again: after draining, every sample stored exactly once,
every command confirmed exactly once, and no series' retained ``last`` ever moved back in
observation time (a subscriber sees every ``last`` publish), ending on the newest sample.
Also: a group does not ingest its own output, a restart's replay does not step ``last``
back, and how members split sites."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.adapters import ven_messages
from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.cpi import CpiOptions, CpiPlant, CpiTarget
from energybus.adapters.signing import Signer
from energybus.errors import MappingError
from energybus.render import Renderer
from energybus.samples import Sample
from energybus.worker.acks import AckQueue
from energybus.worker.config import load_config
from energybus.worker.sources import Delivery
from tests.helpers import wait_until
from tests.test_dispatch import AT, _dispatcher
from tests.workers import (
    ENERGYBUS,
    Collector,
    WorkerProcess,
    init_schema,
    publish,
    query,
    write_config,
)
from tools.services import Service, free_port

pytestmark = pytest.mark.services

VENS = 41
"""VENs, each its own site (so the members split them), one metering message (48
samples) per round."""
TARGETS = 4
"""Batteries of the CPI plant, one telemetry message each per round."""
ROUNDS = 15
SPACING_S = 2.0
"""Between two rounds: a VEN reporting every 2 s."""
KILL_ROUND = 6
DOWN_S = 2.5 * SPACING_S
SETTLE_S = 1.0

Key = tuple[str, str, str, datetime]
"""(site, device_id, metric, observed_at): a sample, as the historian keys it."""


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class _Plant(Collector):
    """A CPI plant: answers every signed command on its topic with a signed ``ok``."""

    def __init__(self, mqtt: Service, plant: str, signer: Signer) -> None:
        self.plant = plant
        self.signer = signer
        self.received: list[str] = []
        self.answered: dict[str, int] = {}
        """cmdId -> the ``ts`` of its ACK (the confirmation's observation time)."""
        self.faults: list[str] = []
        super().__init__(mqtt, [f"cpi/{plant}/commands"])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
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


class _Group:
    """The workers of one shared group, each with its own client id and data directory."""

    def __init__(
        self,
        tmp_path: Path,
        size: int,
        mqtt: Service,
        dsn: str,
        extra: list[str],
        *,
        partitioned: bool = False,
    ) -> None:
        self.name = f"g-{uuid.uuid4().hex[:8]}"
        self.workers: list[WorkerProcess] = []
        self.configs: list[Path] = []
        self.ports: list[int] = []
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
            port = free_port()
            self.ports.append(port)
            config.write_text(
                config.read_text().replace("[worker]\n", f"[worker]\nmetrics_port = {port}\n", 1)
            )
            self.configs.append(config)
            args = ["--shared-group", self.name]
            if partitioned:
                args += ["--member", f"{index}/{size}"]
            self.workers.append(WorkerProcess(config, folder / "worker.log", args=args))

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def counted(self, index: int, metric: str) -> float:
        """A counter of member ``index``, summed over its labels."""
        url = f"http://127.0.0.1:{self.ports[index]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(metric + "{") or line.startswith(metric + " ")
        )

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
                    # The member acknowledges the ACK message to the broker just after
                    # committing the record; a kill before that makes the broker deliver
                    # it again (an answer to no waiting command), not what this tests.
                    time.sleep(SETTLE_S)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


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
        wait_until(
            lambda: query(postgres.url, sql)[0][0] >= expected + 1, 60, "every sample stored"
        )
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


@pytest.mark.parametrize("size", [2, 3])
def test_a_partitioned_group_with_a_member_killed_stores_confirms_and_orders_once(
    tmp_path: Path, mosquitto: Service, postgres: Service, size: int
) -> None:
    init_schema(postgres.url)
    tag = f"s{uuid.uuid4().hex[:8]}"
    plant = f"{tag}-plant"
    cpi_site = f"{tag}-cpi"
    key = secrets.token_hex(16)
    signer = Signer([key])
    targets = "".join(
        f'[adapters.cpi.plants.{plant}.targets.B{t}]\ntemplate = "battery"\n'
        for t in range(1, TARGETS + 1)
    )
    extra = (
        "[adapters.ven]\n"
        f'[adapters.cpi]\nsite = "{cpi_site}"\n'
        f'[adapters.cpi.plants.{plant}]\nsecrets = ["{key}"]\n{targets}'
    )
    group = _Group(tmp_path, size, mosquitto, postgres.url, [extra] * size, partitioned=True)
    load = _Load(group.configs[0], tag, plant, signer)
    sites = [f"{tag}-v{v}" for v in range(VENS)] + [cpi_site]
    filters = [f"{site}/energy/+/+/+/last" for site in sites]
    lasts = Collector(mosquitto, filters)
    letters = Collector(mosquitto, ["energybus/dead_letter/#"])
    answers = _Plant(mosquitto, plant, signer)
    commands = _Commands(mosquitto, postgres.url, cpi_site, plant, answers)
    # The member that holds the plant's site, its commands and their answers.
    victim = group.workers[zlib.crc32(cpi_site.encode()) % size]
    try:
        group.start()
        load.started = time.monotonic()
        publisher = load.run(mosquitto)
        driver = commands.run(ROUNDS - 2)
        # Mid-load, between two commands: SIGKILL one member, start it again.
        time.sleep(KILL_ROUND * SPACING_S)
        with commands.quiet:
            assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
            # Down for more than a sample interval, as a supervisor's restart delay
            # would keep it: the broker queues what the member's session subscribes to
            # meanwhile, and the other members go on with their sites.
            time.sleep(DOWN_S)
            victim.start()
        publisher.join(120)
        driver.join(120)
        assert load.done.is_set() and not driver.is_alive()
        assert commands.failure is None, commands.failure
        assert answers.faults == []

        # Drained: every sample in the historian, the newest `last` of every series seen.
        confirmations = {
            (
                cpi_site,
                f"storage.{topic.split('/')[3]}",
                "power_setpoint",
                datetime.fromtimestamp(answers.answered[command_id] / 1000, UTC),
            )
            for command_id, (topic, _) in zip(answers.received, commands.sent, strict=True)
        }
        expected = load.expected | confirmations
        site_list = sorted(load.sites | {cpi_site})
        wait_until(
            lambda: len(_stored(postgres.url, site_list)) >= len(expected),
            90,
            f"{len(expected)} samples in the historian",
        )
        newest: dict[str, datetime] = {}
        for sample in expected:
            topic = _last_topic(sample)
            newest[topic] = max(newest.get(topic, sample[3]), sample[3])

        def newest_seen() -> bool:
            seen = _lasts(lasts)
            return all(seen.get(t) and seen[t][-1] >= at for t, at in newest.items())

        wait_until(newest_seen, 60, "the newest `last` of every series on the bus")
        # Each member handled its share and left the rest to the others.
        for index in range(size):
            assert group.counted(index, "energybus_messages_in_total") > 0
            assert group.counted(index, "energybus_messages_elsewhere_total") > 0
        assert sorted(group.stop()) == [0] * size

        # Every sample exactly once, nothing else.
        stored = _stored(postgres.url, site_list)
        assert sum(stored.values()) == len(expected)
        assert {k for k, n in stored.items() if n != 1} == set()
        assert set(stored) == expected

        # Every command sent to the plant once and confirmed once.
        assert len(answers.received) == len(set(answers.received)) == len(commands.sent)
        records = query(
            postgres.url,
            "SELECT id, state, response_status FROM energybus.command_logs WHERE site = $1",
            cpi_site,
        )
        assert sorted(r[0] for r in records) == sorted(answers.received)
        assert {(r[1], r[2]) for r in records} == {("confirmed", "ok")}
        confirmed_lasts = [
            at
            for t, ats in _lasts(lasts).items()
            if t.endswith("/power_setpoint/last")
            for at in ats
        ]
        assert sorted(confirmed_lasts) == sorted(c[3] for c in confirmations)

        # `last` never moved backwards, and ends on the newest sample of every series.
        seen = _lasts(lasts)
        assert set(seen) == set(newest)
        backwards = {
            topic: [(a.isoformat(), b.isoformat()) for a, b in pairwise(ats) if b < a]
            for topic, ats in seen.items()
        }
        assert {t: b for t, b in backwards.items() if b} == {}
        assert _retained(mosquitto, filters) == newest

        # Nothing of this traffic was refused, in any member.
        ours = [
            json.loads(p)
            for _, p, _ in list(letters.messages)
            if plant in json.loads(p).get("topic", "") or tag in json.loads(p).get("payload", "")
        ]
        assert ours == []
        assert "Traceback" not in group.logs()
    finally:
        lasts.close()
        letters.close()
        answers.close()
        group.kill()


@pytest.mark.parametrize(
    ("worker", "error"),
    [
        ('shared_group = "g"\nmember = "3/3"', "out_of_range"),
        ('member = "0/2"', "missing_field"),
        ('shared_group = "g"\nmember = "two"', "invalid_value"),
    ],
)
def test_a_member_is_one_of_its_group(tmp_path: Path, worker: str, error: str) -> None:
    config = tmp_path / "site.toml"
    config.write_text(f"[worker]\n{worker}\n[adapters.ven]\n")
    with pytest.raises(MappingError) as raised:
        load_config(config)
    assert raised.value.code == error and raised.value.path == "$.worker.member"
    assert raised.value.line is not None


def test_a_site_is_one_members_with_its_commands_and_their_answers() -> None:
    """What members split by (``Pipeline.site_of``), and two members of a partitioned
    group each handling exactly the VENs whose site hashes to them."""
    ven = Pipeline(create_adapter("ven"))
    assert ven.site_of("volttron/metering", b'{"venId": "Ven_7", "circuits": []}') == "ven-7"
    assert ven.site_of("ven/ack/Ven_7", b"{}") == "ven-7"
    assert ven.site_of("ven-7/energy/load/ven-7/shed_power/set", b"1") == "ven-7"
    assert ven.site_of("volttron/metering", b"{not json") == "volttron/metering"
    cpi = Pipeline(
        create_adapter(
            "cpi",
            options=CpiOptions(
                site="yard",
                plants={"P1": CpiPlant(targets={"B1": CpiTarget(template="battery")})},
            ),
        )
    )
    assert cpi.site_of("cpi/P1/telemetry", b"{}") == "yard"
    assert cpi.site_of("cpi/P1/commands/ack", b"{}") == "yard"
    assert cpi.site_of("yard/energy/storage/p1-b1/power_setpoint/set", b"1") == "yard"
    assert cpi.site_of("cpi/P9/telemetry", b"{}") == "cpi/P9/telemetry"  # refused by one

    handled: list[set[str]] = []
    for index in range(2):
        dispatcher, _, sink, _ = _dispatcher(member=(index, 2))
        acks = AckQueue(lambda mid: None)
        for number in range(12):
            body = {"venId": f"v{number}", "timestamp": 1729700000, "usedPowerKw": 1.0}
            delivery = Delivery(
                "mqtt", "volttron/metering", msgspec.json.encode(body), AT, acks.add(number)
            )
            dispatcher.handle(delivery)
        handled.append({row.site for row in sink.rows})
    assert handled[0] | handled[1] == {f"v{n}" for n in range(12)}
    assert handled[0] & handled[1] == set() and handled[0] and handled[1]
    assert all(zlib.crc32(site.encode()) % 2 == 0 for site in handled[0])


def test_the_plan_says_which_sites_a_member_handles(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('[worker]\nshared_group = "fleet"\nmember = "1/3"\n[adapters.ven]\n')
    done = subprocess.run(
        [*ENERGYBUS, "check", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "group      fleet, member 1 of 3: the sites whose CRC-32 modulo 3 is 1" in done.stdout
    assert "  source   volttron/metering  (QoS 1)" in done.stdout  # not through $share
    assert "ingest     $share/fleet/+/energy/+/+/+/value" in done.stdout


def test_a_restart_replays_what_was_not_acknowledged_without_moving_last_back(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    """Three samples of one series handled and published, none acknowledged yet (their
    batch waits 30 s), then SIGKILL: the broker gives the three again at the restart. The
    worker reads the retained `last`s first (worker/lasts.py), so the replay does not step
    `last` back; the rows are stored once."""
    init_schema(postgres.url)
    tag = f"s{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path / "site.toml",
        mqtt=mosquitto,
        dsn=postgres.url,
        client_id=f"w-{tag}",
        extra=f'[adapters.ven]\nsite = "{tag}"\n',
    )
    config.write_text(
        config.read_text().replace("batch_interval_s = 0.05", "batch_interval_s = 30")
    )
    messages = [json.loads(m) for m in ven_messages(3, circuits=1, seed=9)]
    last = f"{tag}/energy/storage/ven-042-battery/soc/last"
    lasts = Collector(mosquitto, [f"{tag}/energy/+/+/+/last"])
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        for number, body in enumerate(messages):
            body["timestamp"] = 1764600000 + number
            publish(mosquitto, [("volttron/metering", msgspec.json.encode(body))])
        wait_until(lambda: len(lasts.payloads(last)) == 3, 30, "three lasts of the series")
        assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
        config.write_text(
            config.read_text().replace("batch_interval_s = 30", "batch_interval_s = 0.05")
        )
        worker = WorkerProcess(config, tmp_path / "worker.log").start()
        sql = f"SELECT count(*) FROM energybus.measurements WHERE site = '{tag}'"
        pipeline = Pipeline(create_adapter("ven", options=load_config(config).adapters["ven"]))
        now = datetime.now(UTC)
        expected = sum(
            len(pipeline.feed("volttron/metering", msgspec.json.encode(b), received_at=now).samples)
            for b in messages
        )
        wait_until(lambda: query(postgres.url, sql)[0][0] >= expected, 90, "every sample stored")
        assert worker.stop() == 0
        assert query(postgres.url, sql)[0][0] == expected
        seen = _lasts(lasts)
        assert [at.timestamp() for at in seen[last]][:3] == [1764600000, 1764600001, 1764600002]
        backwards = {t: ats for t, ats in seen.items() if any(b < a for a, b in pairwise(ats))}
        assert backwards == {}
    finally:
        lasts.close()
        if worker.alive():
            worker.stop(signal.SIGKILL)


def test_a_floor_keeps_an_older_sample_from_last_until_a_newer_one_comes() -> None:
    renderer = Renderer(source="ven")
    at = datetime(2026, 12, 1, 12, tzinfo=UTC)
    renderer.last_floors[("s", "grid", "m", "active_power")] = at

    def lasts(sample: Sample) -> list[str]:
        return [m.topic for m in renderer.render(sample) if m.topic.endswith("/last")]

    older = Sample("s", "grid", "m", "active_power", 1.0, at - timedelta(seconds=1))
    assert lasts(older) == []  # the bus already has a newer last
    assert renderer.last_floors == {}  # read once, when the series is first seen
    assert lasts(Sample("s", "grid", "m", "active_power", 2.0, at)) == [
        "s/energy/grid/m/active_power/last"
    ]
