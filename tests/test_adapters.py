"""Adapters through the library API: the issue's worked example, the mapping rows, the
command book, the registry and the mapping loader's errors."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

import energybus.adapters as adapters
from energybus.adapters import CommandBook, CommandRecord, Pipeline, adapter_class, create_adapter
from energybus.adapters.cpi import CpiAdapter, CpiOptions
from energybus.adapters.ven import VenAdapter, VenOptions
from energybus.errors import MappingError

AT = datetime(2024, 10, 23, 16, 13, 21, tzinfo=UTC)


def _feed(pipeline: Pipeline, topic: str, body: Any) -> dict[str, str]:
    out = pipeline.feed(topic, msgspec.json.encode(body), received_at=AT)
    assert out.rejections == []
    return {m.topic: m.payload.decode() for m in out.messages}


def test_issue_example_soc() -> None:
    wire = _feed(
        Pipeline(create_adapter("ven")),
        "volttron/metering",
        {"venId": "ven-042", "timestamp": 1729700000, "batterySOC": 85.5},
    )
    assert wire["ven-042/energy/storage/ven-042-battery/soc/value"] == "85.5"
    last = msgspec.json.decode(wire["ven-042/energy/storage/ven-042-battery/soc/last"])
    assert last["observed_at"] == "2024-10-23T16:13:20Z"
    assert last["value"] == 85.5


def test_every_required_ven_row() -> None:
    body = {
        "venId": "VEN_042",
        "timestamp": 1729700000,
        "usedPowerKw": 1.1,
        "shedPowerKw": 2.2,
        "requestedReductionKw": 3.3,
        "baselinePowerKw": 4.4,
        "batterySOC": 55.0,
        "panelVoltage": 240.0,
        "currentAmps": 12.5,
        "panelUtilizationPercent": 7.5,
        "panelAmperageRating": 200,
        "panelMaxKw": 48.0,
        "circuits": [
            {
                "id": "Circuit 1",
                "currentKw": 0.5,
                "currentAmps": 2.0,
                "enabled": True,
                "name": "HVAC",
                "breakerAmps": 30,
                "critical": False,
            }
        ],
        "loads": [
            {
                "loadId": "Circuit 1",
                "shedCapabilityKw": 0.7,
                "name": "HVAC",
                "type": "hvac",
                "capacityKw": 5.0,
                "priority": 2,
            }
        ],
    }
    wire = _feed(Pipeline(create_adapter("ven")), "volttron/metering", body)
    values = {t.removesuffix("/value"): p for t, p in wire.items() if t.endswith("/value")}
    assert values == {
        "ven-042/energy/load/ven-042/active_power": "1100.0",
        "ven-042/energy/load/ven-042/shed_power": "2200.0",
        "ven-042/energy/load/ven-042/requested_reduction_power": "3300.0",
        "ven-042/energy/load/ven-042/baseline_power": "4400.0",
        "ven-042/energy/storage/ven-042-battery/soc": "55.0",
        "ven-042/energy/grid/ven-042-panel/voltage": "240.0",
        "ven-042/energy/grid/ven-042-panel/current": "12.5",
        "ven-042/energy/grid/ven-042-panel/utilization": "7.5",
        "ven-042/energy/load/circuit-1/active_power": "500.0",
        "ven-042/energy/load/circuit-1/current": "2.0",
        "ven-042/energy/load/circuit-1/enabled": "true",
        "ven-042/energy/load/circuit-1/shed_capability_power": "700.0",
    }
    # Static fields are in meta, in SI units, and nowhere else.
    panel = msgspec.json.decode(wire["ven-042/energy/grid/ven-042-panel/voltage/meta"])
    assert panel["attributes"] == {"rated_current_a": 200, "max_power_w": 48000.0}
    load = msgspec.json.decode(wire["ven-042/energy/load/circuit-1/shed_capability_power/meta"])
    assert load["attributes"] == {
        "name": "HVAC",
        "load_type": "hvac",
        "capacity_w": 5000.0,
        "priority": 2,
    }
    circuit = msgspec.json.decode(wire["ven-042/energy/load/circuit-1/active_power/meta"])
    assert circuit["attributes"] == {"name": "HVAC", "breaker_rating_a": 30, "critical": False}


def test_changed_static_field_republishes_meta_once() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    body = {"venId": "v1", "timestamp": 1, "panelVoltage": 230.0, "panelAmperageRating": 100}
    first = _feed(pipeline, "volttron/metering", body)
    assert "v1/energy/grid/v1-panel/voltage/meta" in first
    second = _feed(pipeline, "volttron/metering", {**body, "timestamp": 2})
    assert "v1/energy/grid/v1-panel/voltage/meta" not in second
    third = _feed(
        pipeline, "volttron/metering", {**body, "timestamp": 3, "panelAmperageRating": 150}
    )
    meta = msgspec.json.decode(third["v1/energy/grid/v1-panel/voltage/meta"])
    assert meta["attributes"] == {"rated_current_a": 150}


def test_a_refused_message_does_not_mark_its_timestamp_seen() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    bad = {"venId": "v1", "timestamp": 7, "circuits": [{"id": "--", "currentKw": 1.0}]}
    out = pipeline.feed("volttron/metering", msgspec.json.encode(bad), received_at=AT)
    assert [r.code for r in out.rejections] == ["bad_identifier"]
    fixed = {"venId": "v1", "timestamp": 7, "circuits": [{"id": "c1", "currentKw": 1.0}]}
    assert "v1/energy/load/c1/active_power/value" in _feed(pipeline, "volttron/metering", fixed)
    assert pipeline.rejected == {"bad_identifier": 1}


def test_a_message_with_a_refused_value_can_come_again_fixed() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    bad = {"venId": "v1", "timestamp": 7, "batterySOC": 50.0, "currentAmps": 1.2e29}
    out = pipeline.feed("volttron/metering", msgspec.json.encode(bad), received_at=AT)
    assert [r.code for r in out.rejections] == ["implausible_value"]
    assert [s.metric for s in out.samples] == ["soc"]
    fixed = {**bad, "currentAmps": 12.0}
    wire = _feed(pipeline, "volttron/metering", fixed)
    assert wire["v1/energy/grid/v1-panel/current/value"] == "12.0"


def test_an_implausible_confirmation_is_refused() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    ack = {"op": "event", "status": "ok", "actual_shed_kw": 1e29}
    out = pipeline.feed("ven/ack/v1", msgspec.json.encode(ack), received_at=AT)
    assert [(r.code, r.path) for r in out.rejections] == [("implausible_value", "$.actual_shed_kw")]
    assert out.messages == []


def _record(command_id: str, at: datetime, book: CommandBook) -> CommandRecord:
    return CommandRecord(
        id=command_id,
        adapter="x",
        site="s",
        entity_type="load",
        entity_id="e",
        metric="m",
        value=1,
        target="t",
        action="a",
        payload=None,
        state="accepted",
        accepted_at=at,
        expires_at=book.deadline(at),
    )


def test_command_book_lifecycle() -> None:
    book = CommandBook(timeout_s=10)
    book.accept(_record("a", AT, book))
    book.accept(_record("b", AT + timedelta(seconds=5), book))
    with pytest.raises(ValueError, match="already in flight"):
        book.accept(_record("a", AT, book))
    sent = book.sent("a", AT + timedelta(seconds=1))
    assert sent is not None and sent.state == "sent" and sent.sent_at is not None
    assert book.sent("a", AT) is None  # only once
    assert book.expire(AT + timedelta(seconds=9)) == []
    expired = book.expire(AT + timedelta(seconds=10))
    assert [(r.id, r.state) for r in expired] == [("a", "expired")]
    done = book.acked("b", ok=True, status="ok", at=AT + timedelta(seconds=6))
    assert done is not None and done.state == "confirmed" and done.response_status == "ok"
    assert book.acked("b", ok=True, status="ok", at=AT) is None  # final states leave
    assert len(book) == 0
    book.accept(_record("c", AT, book))
    failed = book.fail("c", "broker refused")
    assert failed is not None and failed.state == "rejected" and failed.reason == "broker refused"


def test_command_progress_and_source_outcomes() -> None:
    book = CommandBook(timeout_s=10)
    book.accept(_record("p", AT, book))
    progressed = book.progress("p", "DISPATCHED")
    assert progressed is not None
    assert (progressed.state, progressed.response_status) == ("accepted", "DISPATCHED")
    assert book.get("p") == progressed  # the book keeps the newest snapshot
    nacked = book.acked("p", ok=False, status="NACK", at=AT, reason="maintenance")
    assert nacked is not None and nacked.reason == "the source answered 'NACK': maintenance"
    assert book.progress("p", "EXECUTING") is None  # nothing in flight any more
    book.accept(_record("q", AT, book))
    ended = book.end("q", "expired", "the source reported EXPIRED")
    assert ended is not None and ended.state == "expired" and len(book) == 0


def test_registry_names_and_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    assert adapter_class("ven") is VenAdapter
    assert adapter_class("cpi") is CpiAdapter
    with pytest.raises(MappingError) as caught:
        adapter_class("nope")
    assert caught.value.code == "unknown_adapter" and "cpi, modbus, ven" in caught.value.message

    class Plugin:
        name = "acme"
        value = "energybus.adapters.ven:VenAdapter"

    class Shadow:
        name = "ven"
        value = "json:loads"

    monkeypatch.setattr(adapters, "entry_points", lambda group: [Plugin, Shadow])
    assert adapters.adapter_names() == ["acme", "cpi", "modbus", "ven", "voke"]
    assert adapter_class("acme") is VenAdapter
    assert adapter_class("ven") is VenAdapter  # a plug-in cannot take a built-in name


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_mapping_errors_name_file_and_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "m.toml",
        """\
        adapter = "ven"

        [[entity]]
        type = "load"
        id = "{ven}"

        [entity.fields]
        usedPowerKw = { metric = "active_power", unit = "kW" }
        shedPowerKw = { metric = "shed_power", units = "kW" }
        """,
    )
    with pytest.raises(MappingError) as caught:
        VenAdapter.check_mapping(path)
    error = caught.value
    assert (error.code, error.line, error.path) == (
        "unknown_field",
        9,
        "$.entity[0].fields.shedPowerKw.units",
    )
    assert str(error).startswith(f"{path}:9: ")


def test_mapping_semantic_errors(tmp_path: Path) -> None:
    cases = {
        'id = "{nope}"': "bad_template",
        'id = "Bad Id"': "bad_template",
        'fields.x = { metric = "voltage", unit = "kW" }': "unit_mismatch",
        'fields.x = { metric = "enabled", unit = "V" }': "unit_on_boolean",
        'fields.x = { metric = "voltage", unit = "V", deadband = -1 }': "out_of_range",
    }
    for line, code in cases.items():
        body = 'adapter = "ven"\n[[entity]]\ntype = "grid"\n'
        body += line + "\n" if line.startswith("id") else 'id = "{ven}"\n' + line + "\n"
        if line.startswith("id"):
            body += 'fields.x = { metric = "voltage", unit = "V" }\n'
        path = _write(tmp_path, "m.toml", body)
        with pytest.raises(MappingError) as caught:
            VenAdapter.check_mapping(path)
        assert caught.value.code == code, (line, caught.value)
        assert caught.value.line is not None


def test_mapping_for_another_adapter_is_refused() -> None:
    from energybus.mappings import mapping_path

    with pytest.raises(MappingError) as caught:
        CpiAdapter.check_mapping(mapping_path("ven"))
    assert caught.value.code == "wrong_adapter"
    with pytest.raises(MappingError) as caught:
        VenAdapter.check_mapping(mapping_path("cpi"))
    assert caught.value.code == "wrong_adapter"


def test_options_from_config_with_environment(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "site.toml",
        """\
        [adapters.cpi]
        replay_window_s = 60

        [adapters.cpi.plants.plant-1]
        site = "vad"
        secrets = ["${PLANT_SECRET}", "${OLD_SECRET}"]
        """,
    )
    options = CpiAdapter.options_from_file(path, environ={"PLANT_SECRET": "a", "OLD_SECRET": "b"})
    assert isinstance(options, CpiOptions)
    assert options.plants["plant-1"].secrets == ["a", "b"]
    with pytest.raises(MappingError) as caught:
        CpiAdapter.options_from_file(path, environ={"PLANT_SECRET": "a"})
    error = caught.value
    assert error.code == "missing_env" and "OLD_SECRET" in error.message
    assert error.path == "$.adapters.cpi.plants.plant-1.secrets[1]" and error.line == 6
    # No [adapters.ven] table: the defaults.
    assert VenAdapter.options_from_file(path) == VenOptions()
    typo = _write(tmp_path, "typo.toml", "[adapters.ven]\ntelemetri = true\n")
    with pytest.raises(MappingError) as caught:
        VenAdapter.options_from_file(typo)
    assert (caught.value.code, caught.value.line) == ("unknown_field", 2)


def test_plant_options_are_checked_against_the_mapping() -> None:
    bad = msgspec.convert(
        {"plants": {"p": {"targets": {"X": {"template": "toaster"}}}}}, CpiOptions
    )
    with pytest.raises(MappingError) as caught:
        CpiAdapter(options=bad)
    assert caught.value.code == "unknown_template" and "battery" in caught.value.message


def test_a_value_that_overflows_once_converted_is_refused_alone() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    body = {"venId": "v1", "timestamp": 1, "batterySOC": 50.0, "usedPowerKw": 1e307}
    out = pipeline.feed("volttron/metering", msgspec.json.encode(body), received_at=AT)
    assert [(r.code, r.path) for r in out.rejections] == [("non_finite", "$.usedPowerKw")]
    topics = [m.topic for m in out.messages]
    assert "v1/energy/storage/v1-battery/soc/value" in topics
    assert not any("/active_power/" in t for t in topics)
    # The refused value changed nothing: fixed, it publishes like a first value.
    fixed = _feed(pipeline, "volttron/metering", {**body, "timestamp": 2, "usedPowerKw": 1.5})
    assert fixed["v1/energy/load/v1/active_power/value"] == "1500.0"


def test_cpi_huge_numbers_are_rejected_not_raised() -> None:
    options = msgspec.convert(
        {"plants": {"p1": {"targets": {"B1": {"template": "battery"}}}}}, CpiOptions
    )
    adapter = create_adapter("cpi", options=options)
    ms = int(AT.timestamp() * 1000)
    cases = {
        b'{"ts": %d, "target": "B1", "values": {"soc": 1%s}}' % (ms, b"0" * 400): "non_finite",
        b'{"ts": 1%s, "target": "B1", "values": {}}' % (b"0" * 400): "bad_timestamp",
        b'{"ts": %d, "target": "B1", "values": {"p_charge": 1e306}}' % ms: "non_finite",
    }
    for payload, code in cases.items():
        result = adapter.normalize("cpi/p1/telemetry", payload, AT)
        assert [r.code for r in result.rejections] == [code], payload[:60]
        assert result.readings == []


def test_pipeline_reports_a_sample_the_bus_cannot_carry() -> None:
    """A plug-in adapter may produce a NaN: it is refused and counted, the rest goes out."""
    from energybus.adapters import Normalized
    from energybus.render import DEFAULT_SPEC
    from energybus.samples import Reading

    adapter = create_adapter("ven")
    spec = DEFAULT_SPEC
    values = [("active_power", 1.0, "W", spec), ("current", float("nan"), "A", spec)]

    def normalize(topic: str, payload: bytes, received_at: datetime) -> Normalized:
        return Normalized(readings=[Reading("s", "load", "e", AT, "good", list(values))])

    adapter.normalize = normalize  # type: ignore[method-assign]
    pipeline = Pipeline(adapter)
    out = pipeline.feed("volttron/metering", b"{}", received_at=AT)
    assert [r.code for r in out.rejections] == ["non_finite"]
    assert "s/energy/load/e/active_power/value" in [m.topic for m in out.messages]
    assert not any("/current/" in m.topic for m in out.messages)
    assert pipeline.rejected == {"non_finite": 1}
    assert [s.metric for s in out.samples] == ["active_power"]  # not stored either
