"""``energybus simulate ven`` and ``energybus simulate cpi``: a VEN and a signed CPI plant
played over MQTT, checked against the adapters that read them (their messages translate
without a refusal, and a command formatted by the adapter comes back confirmed), then as
a user runs them against a real Mosquitto."""

from __future__ import annotations

import json
import signal
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.cpi import CpiOptions
from energybus.adapters.signing import Signer
from energybus.adapters.ven import VenOptions
from energybus.simulators.cpi import DEVICES, CpiMessages, site_config as cpi_config
from energybus.simulators.ven import (
    CIRCUITS,
    METERING_TOPIC,
    VenMessages,
    site_config as ven_config,
)
from tests.helpers import Output
from tests.workers import Collector, publish
from tools import services

SECRET = "plant-secret-for-tests-7c1e"
T0 = 1_800_000_000.0
ENERGYBUS = [sys.executable, "-m", "energybus.cli"]


def _at(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def _body(payload: bytes) -> dict[str, Any]:
    body = json.loads(payload)
    assert isinstance(body, dict)
    return body


def _ven_pipeline() -> Pipeline:
    config = tomllib.loads(ven_config(ven_id="ven-7", site="lab"))["adapters"]["ven"]
    return Pipeline(create_adapter("ven", options=msgspec.convert(config, VenOptions)))


def _cpi_pipeline(plant: str = "PLANT-1") -> Pipeline:
    text = cpi_config(plant_id=plant, site="lab", secret_env="X").replace("${X}", SECRET)
    config = tomllib.loads(text)["adapters"]["cpi"]
    return Pipeline(create_adapter("cpi", options=msgspec.convert(config, CpiOptions)))


def _values(pipeline: Pipeline, topic: str, payload: bytes, now: float) -> dict[str, Any]:
    """The canonical values ``payload`` becomes, by ``entity/metric``; no refusal."""
    out = pipeline.feed(topic, payload, received_at=_at(now))
    assert out.rejections == []
    return {f"{s.entity_id}/{s.metric}": s.value for s in out.samples}


# The VEN, without a broker ---------------------------------------------------------------


def test_the_ven_metering_reads_without_a_refusal_and_adds_up() -> None:
    ven = VenMessages(ven_id="ven-7", seed=3)
    pipeline = _ven_pipeline()
    topic, payload = ven.metering(T0)
    assert topic == METERING_TOPIC
    values = _values(pipeline, topic, payload, T0)
    body = _body(payload)
    assert body["venId"] == "ven-7" and body["timestamp"] == T0
    circuits = {c.id.replace("_", "-") for c in CIRCUITS}
    assert {f"{c}/active_power" for c in circuits} <= set(values)
    assert {"ven-7/active_power", "ven-7/shed_power", "ven-7-battery/soc"} <= set(values)
    assert values["ven-7-panel/voltage"] == body["panelVoltage"]
    # What the circuits draw is what the VEN uses, the unmetered rest aside; nothing shed.
    drawn = sum(values[f"{c}/active_power"] for c in circuits)
    assert 0 < values["ven-7/active_power"] - drawn < 1000
    assert values["ven-7/shed_power"] == 0
    assert body["usedPowerKw"] == body["baselinePowerKw"]


def test_an_event_sheds_circuits_least_important_first_and_a_restore_ends_it() -> None:
    ven = VenMessages(ven_id="ven-7", seed=3)
    command = {"op": "event", "shed_kw": 5.0, "duration_sec": 60, "correlationId": "c-1"}
    [ack] = ven.answer("ven/cmd/ven-7", json.dumps(command).encode(), T0)
    body = _body(ack.payload)
    assert ack.topic == "ven/ack/ven-7"
    assert (body["op"], body["status"], body["correlationId"]) == ("event", "accepted", "c-1")
    shed = [c["loadId"] for c in body["circuits_curtailed"]]
    by_priority = [c.id for c in sorted(CIRCUITS, key=lambda c: -c.priority) if not c.critical]
    assert shed == by_priority[: len(shed)] and shed  # the least important first
    assert body["actual_shed_kw"] >= 5.0  # shed until covered
    assert sum(c["shedKw"] for c in body["circuits_curtailed"]) == pytest.approx(
        body["actual_shed_kw"]
    )

    metering = _body(ven.metering(T0 + 1).payload)
    off = {c["id"] for c in metering["circuits"] if not c["enabled"]}
    assert off == set(shed)
    assert all(c["currentKw"] == 0 for c in metering["circuits"] if c["id"] in off)
    assert metering["shedPowerKw"] > 0 and metering["eventId"] == body["event_id"]
    assert metering["usedPowerKw"] == pytest.approx(
        metering["baselinePowerKw"] - metering["shedPowerKw"], abs=0.02
    )

    restore = {"op": "restore", "correlationId": "c-2"}
    [ack] = ven.answer("ven/cmd/ven-7", json.dumps(restore).encode(), T0 + 2)
    assert _body(ack.payload)["status"] == "success"
    after = _body(ven.metering(T0 + 3).payload)
    assert all(c["enabled"] for c in after["circuits"]) and "eventId" not in after


def test_an_event_ends_by_itself_with_a_restore_ack_that_answers_no_command() -> None:
    ven = VenMessages(ven_id="ven-7", seed=1)
    command = {"op": "event", "shed_kw": 1.0, "duration_sec": 10, "correlationId": "c-1"}
    ven.answer("ven/cmd/ven-7", json.dumps(command).encode(), T0)
    assert [m.topic for m in ven.telemetry(T0 + 9)] == [METERING_TOPIC]
    ack, metering = ven.telemetry(T0 + 10)
    assert ack.topic == "ven/ack/ven-7"
    assert _body(ack.payload) == {"op": "restore", "status": "success", "ts": int(T0 + 10)}
    assert _body(metering.payload)["shedPowerKw"] == 0


def test_the_ven_answers_pings_refuses_what_it_cannot_do_and_ignores_what_is_no_command() -> None:
    ven = VenMessages(ven_id="ven-7")
    topic = "ven/cmd/ven-7"
    [pong] = ven.answer(topic, b'{"op": "ping", "correlationId": "p"}', T0)
    assert _body(pong.payload)["status"] == "pong"
    [unknown] = ven.answer(topic, b'{"op": "dance", "correlationId": "d"}', T0)
    assert _body(unknown.payload)["status"] == "rejected"
    [bad] = ven.answer(topic, b'{"op": "event", "shed_kw": -3, "correlationId": "e"}', T0)
    assert _body(bad.payload)["status"] == "rejected"
    for junk in (b"{not json", b"[1, 2]", b'{"no": "op"}'):
        assert ven.answer(topic, junk, T0) == []
    assert ven.answer("ven/cmd/other", b'{"op": "ping"}', T0) == []
    assert (ven.pings, ven.rejected, ven.malformed, ven.commands) == (1, 2, 3, 3)


def test_a_set_through_the_ven_adapter_comes_back_confirmed_with_what_was_shed() -> None:
    ven = VenMessages(ven_id="ven-7", seed=5)
    pipeline = _ven_pipeline()
    _values(pipeline, *ven.metering(T0), T0)  # the adapter learns the VEN
    out = pipeline.feed(
        "lab/energy/load/ven-7/shed_power/set",
        b'{"value": 3000, "duration_s": 600}',
        received_at=_at(T0 + 1),
    )
    [command] = out.messages
    [ack] = ven.answer(command.topic, command.payload, T0 + 1.5)
    answered = pipeline.feed(ack.topic, ack.payload, received_at=_at(T0 + 2))
    assert answered.rejections == []
    [record] = answered.commands
    assert (record.state, record.response_status) == ("confirmed", "accepted")
    [sample] = answered.samples
    assert sample.metric == "shed_power"
    assert sample.value == pytest.approx(_body(ack.payload)["actual_shed_kw"] * 1000)


# The CPI plant, without a broker -----------------------------------------------------------


def test_every_device_of_the_plant_sends_signed_telemetry_the_adapter_takes_whole() -> None:
    plant = CpiMessages(plant_id="PLANT-1", secret=SECRET, seed=2)
    pipeline = _cpi_pipeline()
    messages = plant.telemetry(T0)
    assert [m.topic for m in messages] == ["cpi/PLANT-1/telemetry"] * len(DEVICES)
    values: dict[str, Any] = {}
    for message in messages:
        Signer([SECRET]).verify(_body(message.payload))  # raises unless signed
        values |= _values(pipeline, message.topic, message.payload, T0)
    entities = {key.partition("/")[0] for key in values}
    assert entities == {"plant-1", "plant-1-b1", "plant-1-m1", "plant-1-pv1"}
    assert {"plant-1-b1/soc", "plant-1-m1/import_energy_total", "plant-1-pv1/energy_total"} <= (
        set(values)
    )
    # The plant's own power is what its grid meter sees.
    meter = values["plant-1-m1/import_power"] - values["plant-1-m1/export_power"]
    assert values["plant-1/active_power"] == pytest.approx(meter, abs=100)
    # Counters only grow.
    later: dict[str, Any] = {}
    for message in plant.telemetry(T0 + 600):
        later |= _values(pipeline, message.topic, message.payload, T0 + 600)
    assert later["plant-1-m1/import_energy_total"] >= values["plant-1-m1/import_energy_total"]
    assert later["plant-1-pv1/energy_total"] > values["plant-1-pv1/energy_total"]


def test_a_set_through_the_cpi_adapter_is_carried_out_and_confirmed_by_a_signed_ack() -> None:
    plant = CpiMessages(plant_id="PLANT-1", secret=SECRET, seed=2)
    pipeline = _cpi_pipeline()
    now = time.time()
    out = pipeline.feed(
        "lab/energy/storage/plant-1-b1/power_setpoint/set", b"-2500", received_at=_at(now)
    )
    [command] = out.messages
    [ack] = plant.answer(command.topic, command.payload, now + 0.5)
    assert ack.topic == "cpi/PLANT-1/commands/ack"
    Signer([SECRET]).verify(_body(ack.payload))
    answered = pipeline.feed(ack.topic, ack.payload, received_at=_at(now + 1))
    assert answered.rejections == []
    assert [(r.state, r.response_status) for r in answered.commands] == [("confirmed", "ok")]
    assert plant.model.setpoint_kw == -2.5  # charging at 2.5 kW
    battery = next(m for m in plant.telemetry(now + 2) if b'"B1"' in m.payload)
    assert _body(battery.payload)["values"]["p_charge"] == pytest.approx(2.5, rel=0.1)

    # An action the device's template lacks is answered "error": the command is rejected.
    out = pipeline.feed(
        "lab/energy/storage/plant-1-b1/open_contactor/set", b"true", received_at=_at(now + 3)
    )
    [command] = out.messages
    body = _body(command.payload)
    body["action"] = "fly"
    body["sig"] = Signer([SECRET]).sign(body)
    [ack] = plant.answer(command.topic, json.dumps(body).encode(), now + 3)
    assert _body(ack.payload)["status"] == "error"
    answered = pipeline.feed(ack.topic, ack.payload, received_at=_at(now + 4))
    assert [r.state for r in answered.commands] == ["rejected"]


def test_the_plant_drops_commands_it_cannot_trust_unanswered() -> None:
    plant = CpiMessages(plant_id="PLANT-1", secret=SECRET)
    now = time.time()
    topic = "cpi/PLANT-1/commands"

    def command(cmd_id: str, *, ts: float = now, key: str = SECRET) -> bytes:
        body = {"cmdId": cmd_id, "ts": int(ts * 1000), "action": "reboot"}
        return json.dumps({**body, "sig": Signer([key]).sign(body)}).encode()

    assert len(plant.answer(topic, command("a"), now)) == 1
    assert plant.answer(topic, command("a"), now) == []  # replayed cmdId
    assert plant.answer(topic, command("b", key="another key"), now) == []  # bad signature
    assert plant.answer(topic, command("c", ts=now - 3600), now) == []  # outside the window
    assert plant.answer(topic, b'{"cmdId": "d", "ts": 1}', now) == []  # unsigned
    assert plant.answer(topic, b"not json", now) == []
    assert (plant.commands, plant.acked, plant.refused) == (1, 1, 5)
    assert SECRET not in repr(plant)


# As a user runs them ----------------------------------------------------------------------


@pytest.mark.services
def test_simulate_ven_publishes_answers_and_stops_on_sigint(
    mosquitto: services.Service,
) -> None:
    collector = Collector(mosquitto, ["volttron/metering", "ven/ack/ven-9"])
    args = ["--ven-id", "ven-9", "--port", str(mosquitto.port), "--interval", "0.2"]
    sim = Output([*ENERGYBUS, "simulate", "ven", *args, "--answer-delay", "0"])
    try:
        sim.wait_for(lambda text: "ready" in text, 30, "ready")
        collector.wait_for(lambda topics: topics.count("volttron/metering") >= 3)
        publish(mosquitto, [("ven/cmd/ven-9", b'{"op": "ping", "correlationId": "x"}')])
        collector.wait_for(lambda topics: "ven/ack/ven-9" in topics)
        assert _body(collector.payloads("ven/ack/ven-9")[0])["status"] == "pong"
        assert sim.stop(signal.SIGINT) == 0
    finally:
        sim.kill()
        collector.close()
    assert "Traceback" not in sim.text + "\n".join(sim.errors)
    last = sim.lines[-1]
    assert last.startswith("stopped  published ") and "1 pings" in last
    assert int(last.split()[2]) >= 3


@pytest.mark.services
def test_simulate_cpi_signs_what_it_publishes_and_ends_when_the_broker_goes(
    run_dir: Path,
) -> None:
    """A broker of its own, stopped under the simulator: one line, exit status 1."""
    with services.started("mosquitto", run_dir=run_dir / "cpi-sim") as broker:
        collector = Collector(broker, ["cpi/#"])
        sim = Output(
            [*ENERGYBUS, "simulate", "cpi", "--port", str(broker.port), "--interval", "0.2"],
            env={"ENERGYBUS_CPI_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        )
        try:
            sim.wait_for(lambda text: "ready" in text, 30, "ready")
            collector.wait_for(lambda topics: len(topics) >= 2 * len(DEVICES))
            for payload in collector.payloads("cpi/PLANT-1/telemetry"):
                Signer([SECRET]).verify(_body(payload))
        finally:
            collector.close()
        services.stop("mosquitto", run_dir=run_dir / "cpi-sim")
        try:
            assert sim.process.wait(30) == 1
        finally:
            sim.kill()
    sim.stop(signal.SIGINT)  # reads the output to its end
    assert "Traceback" not in sim.text + "\n".join(sim.errors)
    assert sim.errors[-1].startswith("error    ") and "broker" in sim.errors[-1]


def test_simulate_cpi_needs_its_secret_and_a_broker() -> None:
    no_secret = Output([*ENERGYBUS, "simulate", "cpi"], env={"PATH": "/usr/bin:/bin"})
    assert no_secret.process.wait(30) == 2
    no_secret.stop()
    assert "ENERGYBUS_CPI_SECRET" in "\n".join(no_secret.errors)
    port = services.free_port()  # nothing listens there
    no_broker = Output(
        [*ENERGYBUS, "simulate", "ven", "--port", str(port)], env={"PATH": "/usr/bin:/bin"}
    )
    assert no_broker.process.wait(30) == 1
    no_broker.stop()
    [error] = no_broker.errors
    assert error.startswith(f"error    cannot connect to 127.0.0.1:{port}: ")


def test_print_config_gives_what_the_adapters_take() -> None:
    ven = Output([*ENERGYBUS, "simulate", "ven", "--ven-id", "ven-3", "--print-config"])
    cpi = Output([*ENERGYBUS, "simulate", "cpi", "--plant", "P/7", "--print-config"])
    assert ven.process.wait(30) == 0 and cpi.process.wait(30) == 2  # a plant id with "/"
    ven.stop()
    cpi.stop()
    config = tomllib.loads(ven.text)["adapters"]["ven"]
    assert msgspec.convert(config, VenOptions).vens.keys() == {"ven-3"}
