"""The admission gate on its own: one table of cases, each a set and what it becomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from energybus.admission import CommandPolicy, Gate, Interlock, SeriesPolicy
from energybus.errors import EnergyBusError, FilterError

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
POWER = "vad/energy/storage/bat-1/power_setpoint/set"
SHED = "vad/energy/load/ven-1/shed_power/set"


def _at(seconds: float) -> str:
    return (NOW + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def _envelope(value: object, **fields: object) -> bytes:
    return msgspec.json.encode({"value": value, **fields})


GATE = Gate(
    policy=CommandPolicy(max_age_s=30, max_future_s=5),
    series=[SeriesPolicy(filter="+/energy/load/+/shed_power/set", max_age_s=600)],
    interlocks=[
        Interlock(filter="+/energy/storage/+/power_setpoint/set", min=-5000, max=5000, why="PCS"),
        Interlock(filter="vad/energy/storage/#", max=4000),
    ],
)

CASES: list[tuple[str, str, bytes, bool, str | None]] = [
    # note, topic, payload, retained, refusal code (None: admitted)
    ("a Profile A number", POWER, b"1000", False, None),
    ("a Profile B set observed now", POWER, _envelope(1000, observed_at=_at(0)), False, None),
    ("just inside the age window", POWER, _envelope(10, observed_at=_at(-29.9)), False, None),
    ("too old", POWER, _envelope(10, observed_at=_at(-31)), False, "stale_command"),
    ("two hours old", POWER, _envelope(10, observed_at=_at(-7200)), False, "stale_command"),
    ("within the clock skew", POWER, _envelope(10, observed_at=_at(4.9)), False, None),
    ("from the future", POWER, _envelope(10, observed_at=_at(6)), False, "stale_command"),
    ("a series with its own age", SHED, _envelope(10, observed_at=_at(-500)), False, None),
    ("older than its own age", SHED, _envelope(10, observed_at=_at(-601)), False, "stale_command"),
    ("retained", POWER, b"1000", True, "retained_set"),
    ("retained and stale: retained first", POWER, _envelope(1, observed_at=_at(-99)), True,
     "retained_set"),
    ("not JSON", POWER, b"{oops", False, "malformed_json"),
    ("not UTF-8", POWER, b"\xff", False, "malformed_json"),
    ("NaN", POWER, b"NaN", False, "malformed_json"),
    ("a string", POWER, b'"1000"', False, "wrong_type"),
    ("beyond a double", POWER, b"1" + b"0" * 400, False, "non_finite"),
    ("an unknown field", POWER, _envelope(1, colour="red"), False, "unknown_field"),
    ("a naive time", POWER, _envelope(1, observed_at="2026-12-01T12:00:00"), False,
     "naive_datetime"),
    ("the canonical unit", POWER, _envelope(1000, unit="W"), False, None),
    ("kW on the SI bus", POWER, _envelope(1, unit="kW"), False, "unit_mismatch"),
    ("an unknown unit", POWER, _envelope(1, unit="furlong"), False, "unknown_unit"),
    ("the wrong canonical unit", SHED, _envelope(1, unit="V"), False, "unit_mismatch"),
    ("inside both interlocks", POWER, b"-4999", False, None),
    ("below the PCS interlock", POWER, b"-5001", False, "interlock"),
    ("above the site interlock", POWER, b"4001", False, "interlock"),
    ("a boolean on an interlocked series", POWER, b"true", False, "interlock"),
    ("no interlock on this series", SHED, b"9000000", False, None),
    ("a value stream", "vad/energy/storage/bat-1/power_setpoint/value", b"1", False,
     "not_commandable"),
    ("not a canonical topic", "vad/energy/storage/Bat 1/power_setpoint/set", b"1", False,
     "not_kebab_case"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("note", "topic", "payload", "retain", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_the_gate(note: str, topic: str, payload: bytes, retain: bool, code: str | None) -> None:
    if code is None:
        admitted = GATE.admit(topic, payload, retain=retain, received_at=NOW)
        assert admitted.topic.metric in ("power_setpoint", "shed_power")
        return
    with pytest.raises(EnergyBusError) as caught:
        GATE.admit(topic, payload, retain=retain, received_at=NOW)
    assert caught.value.code == code, caught.value.message


def test_a_refusal_says_why_without_the_value() -> None:
    with pytest.raises(EnergyBusError) as caught:
        GATE.admit(POWER, b"-5001", retain=False, received_at=NOW)
    assert caught.value.message == "the value is outside the interlock [-5000, 5000]: PCS"
    with pytest.raises(EnergyBusError) as stale:
        GATE.admit(POWER, _envelope(1, observed_at=_at(-7200)), retain=False, received_at=NOW)
    assert "7200 s old" in stale.value.message and "30 s" in stale.value.message


@pytest.mark.parametrize(
    "rule",
    [Interlock(filter="a/#/b"), Interlock(filter="x/energy/+", min=2, max=1)],
)
def test_bad_rules_are_refused_when_the_gate_is_built(rule: Interlock) -> None:
    with pytest.raises(FilterError):
        Gate(interlocks=[rule])
