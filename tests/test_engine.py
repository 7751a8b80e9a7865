"""The row engine on its own: named transforms, plausible ranges, compile-time errors and
the register-type table."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.cpi import CpiOptions
from energybus.adapters.engine import DeviceTemplate, Template
from energybus.adapters.mapping import Compiler, SeriesSettings
from energybus.adapters.registers import REGISTER_TYPES, decode_registers, encode_registers
from energybus.documents import load_document, read_toml
from energybus.errors import MappingError, SourceError
from energybus.samples import Reading

AT = datetime(2024, 10, 23, 16, 13, 21, tzinfo=UTC)


def _template(tmp_path: Path, body: str) -> Template:
    path = tmp_path / "t.toml"
    path.write_text(textwrap.dedent(body))
    data, where = read_toml(path)
    document = load_document(DeviceTemplate, data, where)
    return Template("t", document, Compiler(where, SeriesSettings()), "$")


def _read(template: Template, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    reading = Reading("s", template.entity_type, "e", AT)
    errors: list[SourceError] = []
    template.read(values, reading, errors)
    return {m: v for m, v, _, _ in reading.values}, [f"{e.path} {e.code}" for e in errors]


TEMPLATE = """\
    entity_type = "storage"
    [signals]
    p = { metric = "active_power", unit = "kW" }
    soc = { metric = "soc", unit = "%", range = [0, 100] }
    mode = { metric = "operating_state", enum = { 0 = "idle", 1 = "charging", 2 = "discharging" } }
    grid = { metric = "grid_connected", lookup = { on = true, off = false } }
    level = { metric = "level_code", lookup = { low = 1, high = 3 } }
    i = { metric = "current", unit = "A" }
    [signals.status.bits]
    0 = { metric = "online" }
    63 = { metric = "top_bit" }
    """


def test_transforms_turn_source_values_into_canonical_ones(tmp_path: Path) -> None:
    template = _template(tmp_path, TEMPLATE)
    values, errors = _read(
        template,
        {"p": 1.1, "soc": 55, "mode": 2, "grid": "off", "level": "high", "status": 2**63 + 1},
    )
    assert errors == []
    assert values == {
        "active_power": 1100.0,
        "soc": 55.0,
        "operating_state": 2,
        "grid_connected": False,
        "level_code": 3,
        "online": True,
        "top_bit": True,
    }
    spec = next(v[3] for v in _reading_values(template, {"mode": 1}))
    assert spec.attributes == {"states": "0=idle, 1=charging, 2=discharging"}


def _reading_values(template: Template, values: dict[str, Any]) -> list[Any]:
    reading = Reading("s", template.entity_type, "e", AT)
    template.read(values, reading, [])
    return reading.values


def test_value_faults_refuse_one_value_and_keep_the_rest(tmp_path: Path) -> None:
    template = _template(tmp_path, TEMPLATE)
    values, errors = _read(
        template,
        {"p": 1.0, "soc": 140, "mode": 7, "grid": "maybe", "i": 1.2e29, "status": -1},
    )
    assert values == {"active_power": 1000.0}
    assert errors == [
        "$.values.soc implausible_value",
        "$.values.mode unknown_code",
        "$.values.grid unknown_code",
        "$.values.i implausible_value",
        "$.values.status wrong_type",
    ]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ('p = { metric = "active_power", unit = "kW", range = [5, 1] }', "out_of_range"),
        ('b = { metric = "online", range = [0, 1] }', "unit_on_boolean"),
        ('m = { metric = "x_state", enum = { a = "idle" } }', "invalid_value"),
        ('m = { metric = "x", enum = { 0 = "a" }, lookup = { a = 1 } }', "conflicting_field"),
        ('m = { metric = "x", lookup = { a = 1, b = true } }', "wrong_type"),
        ('m = { unit = "kW" }', "missing_field"),
        ('m = { metric = "x", bits = { 0 = { metric = "y" } } }', "conflicting_field"),
        ('m = { bits = { 64 = { metric = "y" } } }', "bad_bit"),
    ],
)
def test_mapping_faults_are_found_when_it_compiles(tmp_path: Path, body: str, code: str) -> None:
    with pytest.raises(MappingError) as caught:
        _template(tmp_path, f'entity_type = "load"\n[signals]\n{body}\n')
    assert caught.value.code == code
    assert caught.value.line == 3


def test_implausible_values_from_the_issue_are_refused_not_stored() -> None:
    """A 1.2e29 A current and a 1e305 kW power used to be published and stored."""
    pipeline = Pipeline(create_adapter("ven"))
    body = {"venId": "v1", "timestamp": 1, "currentAmps": 1.2e29, "usedPowerKw": 1e305}
    body["batterySOC"] = 50.0
    out = pipeline.feed("volttron/metering", msgspec.json.encode(body), received_at=AT)
    assert sorted((r.path, r.code) for r in out.rejections) == [
        ("$.currentAmps", "implausible_value"),
        ("$.usedPowerKw", "implausible_value"),
    ]
    assert [s.metric for s in out.samples] == ["soc"]

    options = msgspec.convert(
        {"plants": {"p1": {"targets": {"M1": {"template": "meter"}}}}}, CpiOptions
    )
    cpi = Pipeline(create_adapter("cpi", options=options))
    ms = int(AT.timestamp() * 1000)
    payload = {"ts": ms, "target": "M1", "values": {"p_import": 1e305, "u_l1": 2301}}
    out = cpi.feed("cpi/p1/telemetry", msgspec.json.encode(payload), received_at=AT)
    assert [(r.path, r.code) for r in out.rejections] == [
        ("$.values.p_import", "implausible_value")
    ]
    assert [(s.metric, s.value) for s in out.samples] == [("voltage_l1", 230.1)]


@pytest.mark.parametrize(
    ("kind", "words", "value"),
    [
        ("u16", [0x1234], 0x1234),
        ("s16", [0xFFFE], -2),
        ("s16", [0x8000], None),
        ("u32", [0x0001, 0x0002], 0x00010002),
        ("s32", [0xFFFF, 0xFFFF], -1),
        ("acc32", [0, 0], None),
        ("u64", [0, 0, 1, 0], 65536),
        ("f32", [0x4049, 0x0FDB], 3.1415927410125732),
        ("f32", [0x7FC0, 0x0000], None),
        ("sunssf", [0xFFFE], -2),
    ],
)
def test_register_types_decode(kind: str, words: list[int], value: float | None) -> None:
    assert decode_registers(kind, words) == value
    if value is not None:
        assert encode_registers(kind, value) == words


def test_register_word_and_byte_order() -> None:
    assert decode_registers("u32", [0x0002, 0x0001], word_order="little") == 0x00010002
    assert decode_registers("u16", [0x3412], byte_order="little") == 0x1234
    words = encode_registers("f64", 1.5, word_order="little", byte_order="little")
    assert decode_registers("f64", words, word_order="little", byte_order="little") == 1.5
    assert set(REGISTER_TYPES) >= {"u16", "s16", "u32", "s32", "u64", "f32", "f64", "acc32"}
    with pytest.raises(SourceError) as caught:
        encode_registers("u16", 70000)
    assert caught.value.code == "out_of_range"
    with pytest.raises(SourceError):
        decode_registers("u32", [1])


def test_devices_reporting_the_same_entity_share_one_spec_object() -> None:
    """The renderer tells an unchanged spec by identity; two VENs under one site that
    both report circuit_0 must hand it the same object, or every message would look
    like a reconfiguration of the series."""
    adapter = create_adapter("ven")
    specs = []
    for ven in ("ven-a", "ven-b"):
        payload = msgspec.json.encode(
            {
                "venId": ven,
                "timestamp": 1729700000,
                "circuits": [{"id": "circuit_0", "name": "Main", "currentKw": 1.5}],
            }
        )
        result = adapter.normalize("volttron/metering", payload, AT)
        (reading,) = [r for r in result.readings if r.entity_id == "circuit-0"]
        specs.append(reading.values[0][3])
    assert specs[0].attributes == {"name": "Main"}
    assert specs[0] is specs[1]
