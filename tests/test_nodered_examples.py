"""The Node-RED examples (examples/node-red) in a real Node-RED (the pinned one of
tools/nodered.py), deployed exactly as their files say, against a real Mosquitto, with
VEN and CPI messages in and the canonical bus checked by a subscriber."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks.adapters import ven_messages
from benchmarks.nodered import flow
from benchmarks.nodered_flows import EXAMPLES, FLOWS, deploy_example, running_node_red, site_config
from energybus import parse_topic, validate_topic
from energybus.adapters import Pipeline, adapter_class
from energybus.adapters.signing import Signer
from energybus.payloads import validate_payload
from tests.helpers import wait_until
from tests.workers import (
    Collector,
    WorkerProcess,
    init_schema,
    publish,
    query,
    wait_rows,
    write_config,
)
from tools import nodered
from tools.services import Service

pytestmark = pytest.mark.services

SECRET = "node-red-example-secret"
TELEMETRY = "cpi/plant-1/telemetry"
NodeRed = tuple[subprocess.Popen[bytes], str]
Letter = tuple[str, str, str, str]
"""A dead letter as compared: source, reason, topic, payload."""


@pytest.fixture(scope="module")
def node_red(run_dir: Path) -> Iterator[NodeRed]:
    nodered.install()  # installs Debian's npm first where it is missing
    with running_node_red(run_dir / "node-red-examples", SECRET) as started:
        yield started


def _site() -> str:
    return f"nr-{uuid.uuid4().hex[:8]}"


@contextmanager
def _deployed(
    node_red: NodeRed, name: str, mosquitto: Service, site: str, tmp_path: Path
) -> Iterator[tuple[str, Collector]]:
    """The example ``name`` deployed for ``site`` (with the example's site configuration
    for that site), and a subscriber to the site and to the dead letters: the flow's MQTT
    client id (its dead letters' ``worker``) and the subscriber."""
    config = site_config(tmp_path / "site.toml", site) if name in ("exec", "stream") else None
    client_id = f"{site}-{name}"
    collector = Collector(mosquitto, [f"{site}/#", "energybus/dead_letter/#"])
    try:
        deploy_example(
            node_red[1], name, mqtt_port=mosquitto.port, site=site, client_id=client_id,
            config=config,
        )  # fmt: skip
        yield client_id, collector
    finally:
        collector.close()


def _pipeline(adapter: str, site: str, tmp_path: Path) -> Pipeline:
    """energybus's own translation with the example's site configuration."""
    cls = adapter_class(adapter)
    config = site_config(tmp_path / "expected.toml", site)
    return Pipeline(cls(options=cls.options_from_file(config, environ={"CPI_SECRET": SECRET})))


def _cpi(body: dict[str, Any], secret: str = SECRET) -> bytes:
    return json.dumps({**body, "sig": Signer([secret]).sign(body)}).encode()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _received(collector: Collector, site: str, worker: str) -> tuple[Counter[Any], list[Letter]]:
    """What reached the subscriber: the site's canonical messages (topic, payload) and
    this flow's dead letters."""
    messages = list(collector.messages)
    mine = f"{site}/"
    bus = Counter((topic, payload) for topic, payload, _ in messages if topic.startswith(mine))
    letters = []
    for topic, payload, _ in messages:
        if topic.startswith("energybus/dead_letter/"):
            letter = json.loads(payload)
            if letter.get("worker") == worker:
                letters.append(
                    (letter["source"], letter["reason"], letter["topic"], letter["payload"])
                )
    return bus, letters


def _expect(
    collector: Collector, site: str, worker: str, bus: Counter[Any], letters: list[Letter]
) -> None:
    """Until the subscriber has as many canonical messages and dead letters as expected;
    then they must be exactly those."""

    def arrived() -> bool:
        got_bus, got_letters = _received(collector, site, worker)
        return got_bus.total() >= bus.total() and len(got_letters) >= len(letters)

    wait_until(arrived, 120, f"{bus.total()} canonical messages and {len(letters)} dead letters")
    got_bus, got_letters = _received(collector, site, worker)
    missing, extra = list((bus - got_bus).elements()), list((got_bus - bus).elements())
    assert got_bus == bus, f"missing {missing[:3]}, extra {extra[:3]}"
    assert sorted(got_letters) == sorted(letters)


def _translate(
    pipeline: Callable[[str], Pipeline], messages: list[tuple[str, bytes]]
) -> tuple[Counter[Any], list[Letter]]:
    """What energybus gives for ``messages``, each through ``pipeline(adapter)``: the
    canonical messages, and a dead letter per refusal."""
    bus: Counter[Any] = Counter()
    letters: list[Letter] = []
    for topic, payload in messages:
        adapter = "cpi" if topic.startswith("cpi/") else "ven"
        out = pipeline(adapter).feed(topic, payload, received_at=datetime.now(UTC))
        bus.update((m.topic, m.payload) for m in out.messages)
        letters.extend((adapter, r.code, topic, payload.decode()) for r in out.rejections)
    return bus, letters


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def test_each_flow_is_its_readable_sources_and_deploys_with_every_placeholder_filled() -> None:
    assert sorted(EXAMPLES.glob("*/flow.json")) == sorted(FLOWS.values())
    for path in FLOWS.values():
        folder = path.parent
        sources = set()
        for node in json.loads(path.read_text()):
            if node["type"] == "function":
                stem = _slug(node["name"])
                for key, suffix in (
                    ("func", ".js"),
                    ("initialize", ".start.js"),
                    ("finalize", ".stop.js"),
                ):
                    source = folder / f"{stem}{suffix}"
                    assert node[key] == (source.read_text() if source.exists() else ""), source
                    sources |= {source.name} if source.exists() else set()
                assert all(
                    lib == {"var": "child_process", "module": "child_process"}
                    for lib in node["libs"]
                )
            if node["type"] == "exec":
                # Spawn mode (no shell), and nothing appended but msg.args, which the flow
                # builds as --adapter NAME --input-base64 BASE64.
                assert (node["useSpawn"], node["addpay"], node["append"]) == ("true", "args", "")
                assert node["command"] == "energybus normalize --config @@CONFIG@@"
        assert {source.name for source in folder.glob("*.js")} == sources
        assert (folder / "README.md").exists()
        filled = flow(
            mqtt_port=1883, site="home", client_id="nodered-1", path=path,
            values={"CONFIG": "/etc/energybus/site.toml"},
        )  # fmt: skip
        assert "@@" not in json.dumps(filled)
    with pytest.raises(ValueError, match="CONFIG"):
        flow(
            mqtt_port=1883, site="home", client_id="x", path=FLOWS["exec"], values={"CONFIG": "a b"}
        )


def test_exec_flow_gives_for_each_message_what_energybus_gives_it(
    node_red: NodeRed, mosquitto: Service, tmp_path: Path
) -> None:
    site = _site()
    with _deployed(node_red, "exec", mosquitto, site, tmp_path) as (worker, collector):
        ts = _now_ms()
        alarm = {"code": "OVERTEMP", "severity": "CRITICAL", "active": True, "message": "61 °C"}
        messages = [
            *(("volttron/metering", m) for m in ven_messages(2, circuits=2)),
            (TELEMETRY, _cpi({"ts": ts, "target": "B1", "values": {"soc": 55.5, "status": 5}})),
            (TELEMETRY, _cpi({"ts": ts, "target": "M1", "values": {"p_import": 12.5}})),
            ("cpi/plant-1/alarm", _cpi({"ts": ts, "target": "B1", **alarm})),
            ("volttron/metering", b'{"venId": "ven-042", "timestamp": "soon"}'),
            (TELEMETRY, _cpi({"ts": ts, "target": "B1", "values": {"soc": 1}}, "not-the-secret")),
        ]
        publish(mosquitto, messages)
        # Each message in a process of its own: nothing deduped, `meta` every time.
        bus, letters = _translate(lambda adapter: _pipeline(adapter, site, tmp_path), messages)
        assert bus.total() > 100 and [r for _, r, _, _ in letters] == [
            "wrong_type",
            "bad_signature",
        ]
        _expect(collector, site, worker, bus, letters)


def test_stream_flow_keeps_energybus_state_from_message_to_message(
    node_red: NodeRed, mosquitto: Service, tmp_path: Path
) -> None:
    site = _site()
    with _deployed(node_red, "stream", mosquitto, site, tmp_path) as (worker, collector):
        first, second = ven_messages(2, circuits=2)
        ts = _now_ms()
        telemetry = _cpi({"ts": ts, "target": "B1", "values": {"soc": 55.5, "status": 5}})
        messages = [
            ("volttron/metering", first),
            ("volttron/metering", first),  # the same message again: translated once
            ("volttron/metering", second),  # unchanged values deduped
            (TELEMETRY, telemetry),
            (TELEMETRY, telemetry),  # replayed
            (TELEMETRY, _cpi({"ts": ts + 1000, "target": "B1", "values": {"soc": 56.0}})),
            ("volttron/metering", b"{not json"),
        ]
        publish(mosquitto, messages)
        pipelines = {name: _pipeline(name, site, tmp_path) for name in ("ven", "cpi")}
        bus, letters = _translate(pipelines.__getitem__, messages)
        assert sorted(r for _, r, _, _ in letters) == ["malformed_json", "replayed"]
        _expect(collector, site, worker, bus, letters)
        # Each `last` is retained, as energybus published it last.
        lasts = {topic: payload for topic, payload in bus if topic.endswith("/last")}
        retained = Collector(mosquitto, [f"{site}/energy/+/+/+/last"])
        try:
            wait_until(lambda: len(retained.messages) >= len(lasts), 120, "the retained lasts")
            assert {t: p for t, p, _ in retained.messages} == lasts
            assert all(flag for _, _, flag in retained.messages)
        finally:
            retained.close()


def _child(parent: int, adapter: str) -> int | None:
    """The pid of the energybus process ``parent`` runs for ``adapter``, if any."""
    needle = f"\0--adapter\0{adapter}\0".encode()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent and needle in cmdline:
            return int(entry.name)
    return None


def test_stream_flow_starts_energybus_again_when_it_ends(
    node_red: NodeRed, mosquitto: Service, tmp_path: Path, run_dir: Path
) -> None:
    site = _site()
    with _deployed(node_red, "stream", mosquitto, site, tmp_path) as (worker, collector):
        first, second = ven_messages(2, circuits=2)
        publish(mosquitto, [("volttron/metering", first)])
        bus, _ = _translate(
            lambda _: _pipeline("ven", site, tmp_path), [("volttron/metering", first)]
        )
        _expect(collector, site, worker, bus, [])
        killed = _child(node_red[0].pid, "ven")
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_until(
            lambda: _child(node_red[0].pid, "ven") not in (None, killed),
            120,
            "a new energybus process",
        )
        publish(mosquitto, [("volttron/metering", second)])
        # A new process, a new state: `meta` again, nothing deduped.
        again, _ = _translate(
            lambda _: _pipeline("ven", site, tmp_path), [("volttron/metering", second)]
        )
        _expect(collector, site, worker, bus + again, [])
        log = run_dir / "node-red-examples" / "nodered" / "nodered.log"
        assert (
            "normalize --adapter ven ended (SIGKILL); starting it again in 2 s" in log.read_text()
        )


def test_publish_flow_values_reach_the_historian_through_the_workers_bus_ingest(
    node_red: NodeRed, mosquitto: Service, postgres: Service, tmp_path: Path
) -> None:
    init_schema(postgres.url)
    site = _site()
    # The worker needs an adapter; this one gets nothing here. Bus ingest is on by default.
    config = write_config(
        tmp_path / "worker.toml", mqtt=mosquitto, dsn=postgres.url, client_id=f"w-{site}",
        extra="[adapters.cpi]\n",
    )  # fmt: skip
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        with _deployed(node_red, "publish", mosquitto, site, tmp_path) as (client_id, collector):
            body = {
                "venId": "VEN 7",
                "timestamp": 1729700000.25,
                "usedPowerKw": 1.1,
                "batterySOC": 85.5,
                "panelVoltage": 239.9,
                "circuits": [{"id": "Circuit_1", "currentKw": 2.1}, {"id": "°", "currentKw": 1}],
            }
            publish(mosquitto, [("volttron/metering", json.dumps(body).encode())])
            at = '"observed_at":"2024-10-23T16:13:20.250Z","quality":"good"'
            series = {
                "load/ven-7/active_power": (b"1100", 1100.0, "W"),
                "storage/ven-7-battery/soc": (b"85.5", 85.5, "%"),
                "grid/ven-7-panel/voltage": (b"239.9", 239.9, "V"),
                "load/circuit-1/active_power": (b"2100", 2100.0, "W"),
            }
            bus: Counter[Any] = Counter()
            for name, (text, _, unit) in series.items():
                bus[f"{site}/energy/{name}/value", text] += 1
                last = f'{{"value":{text.decode()},"unit":"{unit}",{at}}}'.encode()
                bus[f"{site}/energy/{name}/last", last] += 1
            _expect(collector, site, client_id, bus, [])
            for topic, payload in bus:  # what the flow writes by hand keeps the contract
                assert validate_topic(topic) is None
                assert validate_payload(parse_topic(topic).stream, payload) is None
            sql = f"SELECT count(*) FROM energybus.measurements WHERE site = '{site}'"
            assert wait_rows(postgres.url, sql, len(series)) == len(series)
            rows = query(
                postgres.url,
                "SELECT device_id, metric_name, value, quality FROM energybus.measurements"
                " WHERE site = $1",
                site,
            )
            # Profile A carries no time: stored at the time received, quality degraded.
            stored = {(r["device_id"], r["metric_name"], r["value"], r["quality"]) for r in rows}
            expected = set()
            for name, (_, number, _) in series.items():
                entity_type, entity_id, metric = name.split("/")
                expected.add((f"{entity_type}.{entity_id}", metric, number, "degraded"))
            assert stored == expected
        assert worker.alive() and "Traceback" not in worker.text()
    finally:
        worker.stop()


def test_validate_flow_publishes_valid_topics_and_dead_letters_the_others(
    node_red: NodeRed, mosquitto: Service, tmp_path: Path
) -> None:
    site = _site()
    with _deployed(node_red, "validate", mosquitto, site, tmp_path) as (worker, collector):
        entities = {
            "circuit_1": "main-hvac",  # named in the flow's table
            "garage": "garage",  # valid as the VEN names it
            "circuit_9": "circuit_9",  # not kebab-case
            "a/b": "a/b",  # a level too many
            "line\nbreak": "line\nbreak",  # sent to energybus validate as "line\\nbreak"
            "": "",  # an empty level
        }
        body = {
            "venId": "ven-1",
            "timestamp": 1729700000,
            "circuits": [{"id": circuit, "currentKw": 2.1} for circuit in entities],
        }
        publish(mosquitto, [("volttron/metering", json.dumps(body).encode())])
        last = (
            b'{"value":2100,"unit":"W","observed_at":"2024-10-23T16:13:20.000Z","quality":"good"}'
        )
        bus: Counter[Any] = Counter()
        letters: list[Letter] = []
        for entity in entities.values():
            for stream, payload in (("value", b"2100"), ("last", last)):
                topic = f"{site}/energy/load/{entity}/active_power/{stream}"
                error = validate_topic(topic)
                if error is None:
                    bus[topic, payload] += 1
                else:
                    letters.append(("nodered", error.code, topic, payload.decode()))
        assert bus.total() == 4 and len(letters) == 8
        _expect(collector, site, worker, bus, letters)


@pytest.mark.parametrize("name", ["exec", "stream", "validate"])
def test_nothing_in_a_message_reaches_a_shell_and_what_arrives_is_whole(
    name: str, node_red: NodeRed, mosquitto: Service, tmp_path: Path
) -> None:
    site = _site()
    marker = tmp_path / "touched"
    kept = tmp_path / "kept"  # a shell running the text would delete it
    kept.touch()
    awkward = (
        f"Küche \"Nord\" 'Süd' $(touch {marker}) `touch {marker}`; touch {marker} | touch"
        f" {marker} && rm -f {kept}\nline 2\t\u2603 \U0001f50c \\ %s {{}} * ~ $HOME"
    )
    body = {
        "venId": "ven-awk",
        "timestamp": 1729700000,
        "circuits": [
            {
                "id": awkward if name == "validate" else "circuit_1",
                "name": awkward,
                "currentKw": 1.5,
            }
        ],
    }
    # A topic level holds no "/": a shell would run this in Node-RED's working directory.
    here = Path.cwd() / f"touched-{site}"
    plant = f"$(touch {here.name}) \"x\" 'y' `touch {here.name}`; touch {here.name}"
    messages = [
        # Line breaks and UTF-8 in the payload itself, and in a string inside it.
        ("volttron/metering", json.dumps(body, indent=2, ensure_ascii=False).encode()),
        ("volttron/metering", awkward.encode()),  # not JSON at all
        (f"cpi/{plant}/telemetry", _cpi({"ts": _now_ms(), "target": "B1", "values": {"soc": 5}})),
    ]
    with _deployed(node_red, name, mosquitto, site, tmp_path) as (worker, collector):
        publish(mosquitto, messages)
        if name == "validate":
            topics = [f"{site}/energy/load/{awkward}/active_power/{s}" for s in ("value", "last")]
            letters = {(t, validate_topic(t).code) for t in topics}  # type: ignore[union-attr]
            wait_until(lambda: len(_received(collector, site, worker)[1]) >= 2, 120, "dead letters")
            assert {(t, r) for _, r, t, _ in _received(collector, site, worker)[1]} == letters
        else:
            bus, refused = _translate(lambda adapter: _pipeline(adapter, site, tmp_path), messages)
            assert sorted(r for _, r, _, _ in refused) == ["malformed_json", "unknown_plant"]
            _expect(collector, site, worker, bus, refused)
            meta = f"{site}/energy/load/circuit-1/active_power/meta"
            assert json.loads(collector.payloads(meta)[0])["attributes"]["name"] == awkward
        assert not marker.exists() and not here.exists() and kept.exists()
