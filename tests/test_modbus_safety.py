"""Interlocks and control priority: every command to a Modbus device, whatever it asks
and whatever state the device is in, is either refused or written within the limits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from energybus.adapters import Pipeline
from energybus.adapters.modbus import (
    ModbusAdapter,
    ModbusDeviceOptions,
    ModbusOptions,
    WriteResult,
    poll_payload,
    read_write_request,
    write_result,
)
from energybus.adapters.registers import decode_registers, encode_registers
from energybus.errors import EnergyBusError
from energybus.safety import PRIORITIES, Arbiter, DeviceState, Limits, check_limits

MAPS = Path(__file__).resolve().parent / "maps"
SITE_LIMITS = Limits(min=-4000, max=3000, max_rate_per_s=1000, soc_floor=20, soc_ceiling=80)
# The map's own ratings (tests/maps/test_battery.toml): min -5000, max 5000, soc floor 10,
# ceiling 90, temperature_max 45. The site's tighten them; both hold.
LIMITS = Limits(
    min=-4000,
    max=3000,
    max_rate_per_s=1000,
    soc_floor=20,
    soc_ceiling=80,
    temperature_max=45,
)
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TOPIC = "s1/energy/storage/bat/power_setpoint/set"
RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


def _adapter(**options: Any) -> ModbusAdapter:
    device = ModbusDeviceOptions(
        map="test_battery", limits={"power_setpoint": SITE_LIMITS}, interval_s=1.0
    )
    return ModbusAdapter(
        options=ModbusOptions(site="s1", mapping=str(MAPS), devices={"bat": device}, **options)
    )


def _feed_poll(
    adapter: ModbusAdapter, at: datetime, registers: dict[str, list[int]], device: str = "bat"
) -> Any:
    """Feed one poll whose named registers hold these words (every other word 0)."""
    layout = adapter.devices[device].layout
    words = [0] * layout.words
    for register, _, offset in layout.places:
        if register.name in registers:
            index = (offset - layout.data) // 2
            given = registers[register.name]
            words[index : index + len(given)] = given
    at_ms = int(at.timestamp() * 1000)
    payload = poll_payload(
        at_ms, [False] * len(layout.reads), words, fingerprint=layout.fingerprint
    )
    return adapter.normalize(device, payload, at)


def _poll(
    adapter: ModbusAdapter,
    at: datetime,
    *,
    soc: float,
    temperature: float = 20.0,
    setpoint: int = 0,
) -> None:
    """Feed one poll of the test battery: its state of charge, temperature and setpoint."""
    result = _feed_poll(
        adapter,
        at,
        {
            "soc": [round(soc * 10)],
            "temperature": encode_registers("s16", round(temperature * 10)),
            "setpoint": encode_registers("s32", setpoint),
        },
    )
    assert not result.rejections, result.rejections


def test_the_map_ratings_and_the_site_limits_combine_to_the_stricter() -> None:
    adapter = _adapter()
    assert adapter.devices["bat"].limits["power_setpoint"] == LIMITS


def test_each_rule_refuses_with_its_reason() -> None:
    state = DeviceState(soc=50, temperature=25, setpoint=0, setpoint_at=T0)
    later = T0 + timedelta(seconds=10)
    assert check_limits(2000, LIMITS, state, later) is None
    assert "above the maximum 3000" in (check_limits(3500, LIMITS, state, later) or "")
    assert "below the minimum -4000" in (check_limits(-4500, LIMITS, state, later) or "")
    low = state._replace(soc=20)
    assert "floor" in (check_limits(100, LIMITS, low, later) or "")
    assert check_limits(-100, LIMITS, low, later) is None  # charging at the floor is fine
    high = state._replace(soc=80)
    assert "ceiling" in (check_limits(-100, LIMITS, high, later) or "")
    hot = state._replace(temperature=46)
    assert "temperature" in (check_limits(100, LIMITS, hot, later) or "")
    assert "rate" in (check_limits(2000, LIMITS, state, T0 + timedelta(seconds=1)) or "")
    unknown = DeviceState(temperature=25, setpoint=0, setpoint_at=T0)
    assert "unknown" in (check_limits(100, LIMITS, unknown, later) or "")
    # Stopping passes every state rule and the rate limit.
    assert check_limits(0, LIMITS, DeviceState(), later) is None
    assert check_limits(True, LIMITS, state, later) is not None
    assert check_limits(float("nan"), LIMITS, state, later) is not None


def test_a_lower_class_waits_until_the_hold_ends() -> None:
    arbiter = Arbiter()
    arbiter.hold("k", "scheduled", T0, 60, "c1")
    assert arbiter.check("k", "optimization", T0 + timedelta(seconds=59)) is not None
    assert arbiter.check("k", "scheduled", T0 + timedelta(seconds=1)) is None
    assert arbiter.check("k", "safety", T0 + timedelta(seconds=1)) is None
    assert arbiter.check("k", "optimization", T0 + timedelta(seconds=60)) is None
    arbiter.release("k", "other")
    assert arbiter.holder("k", T0) is not None
    arbiter.release("k", "c1")
    assert arbiter.holder("k", T0) is None


def test_a_refused_set_is_a_refused_record_and_nothing_to_write() -> None:
    adapter = _adapter()
    pipeline = Pipeline(adapter)
    _poll(adapter, T0, soc=15, temperature=25)
    out = pipeline.feed(TOPIC, b'{"value": 500, "priority": "manual"}', received_at=T0)
    assert not out.messages
    assert [r.code for r in out.rejections] == ["interlock"]
    assert out.commands[0].state == "refused" and out.commands[0].code == "interlock"
    with pytest.raises(EnergyBusError) as caught:
        adapter.gate.admit(
            TOPIC, b'{"value": 1, "priority": "urgent"}', retain=False, received_at=T0
        )
    assert "$.priority" in caught.value.message


@dataclass
class _Model:
    """What the test knows independently of the adapter: the true device state and the
    holds the commands it let through should have taken."""

    soc: float | None = None
    temperature: float | None = None
    seen_at: datetime | None = None
    setpoint: float | None = None
    setpoint_at: datetime | None = None
    holds: list[tuple[int, datetime]] = field(default_factory=list)


commands = st.tuples(
    st.just("set"),
    st.one_of(
        st.floats(-8000, 8000, allow_nan=False),
        st.integers(-8000, 8000),
        st.sampled_from([0, 3000, 3000.5, -4000, 1e308, -1e308]),
    ),
    st.one_of(st.none(), st.sampled_from(PRIORITIES)),
    st.one_of(st.none(), st.floats(0.5, 120)),
    st.booleans(),
)
polls = st.tuples(
    st.just("poll"),
    st.floats(0, 100).map(lambda v: round(v, 1)),
    st.floats(-20, 60).map(lambda v: round(v, 1)),
)
waits = st.tuples(st.just("wait"), st.floats(0.01, 90))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(commands, polls, waits), max_size=40))
def test_no_write_ever_leaves_the_limits(steps: list[tuple[Any, ...]]) -> None:
    adapter = _adapter(default_priority="scheduled", priority_hold_s=30, state_max_age_s=60)
    pipeline = Pipeline(adapter)
    model = _Model()
    now = T0
    for step in steps:
        if step[0] == "wait":
            now += timedelta(seconds=step[1])
            continue
        if step[0] == "poll":
            _poll(adapter, now, soc=step[1], temperature=step[2])
            model.soc, model.temperature, model.seen_at = step[1], step[2], now
            if model.setpoint is None:
                # The poll reports the setpoint register (0): the rate limit starts there
                # until a command is accepted.
                model.setpoint, model.setpoint_at = 0.0, now
            continue
        _, value, priority, duration, taken = step
        body: dict[str, Any] = {"value": value}
        if priority is not None:
            body["priority"] = priority
        if duration is not None:
            body["duration_s"] = duration
        out = pipeline.feed(TOPIC, json.dumps(body).encode(), received_at=now)
        writes = [read_write_request(m.payload) for m in out.messages]
        if not writes:
            continue
        assert len(writes) == 1
        written = decode_registers("s32", writes[0].words)
        assert written is not None
        # Every write is a value the limits allow, judged from the test's own model.
        assert LIMITS.min is not None and LIMITS.max is not None
        assert LIMITS.min <= written <= LIMITS.max
        fresh = model.seen_at is not None and now - model.seen_at <= timedelta(seconds=60)
        if written != 0:
            assert fresh and model.soc is not None and model.temperature is not None
            assert model.temperature <= 45
            if written > 0:
                assert model.soc > 20
            else:
                assert model.soc < 80
            assert model.setpoint is not None and model.setpoint_at is not None
            seconds = (now - model.setpoint_at).total_seconds()
            assert abs(written - model.setpoint) <= 1000 * seconds + 1e-6
        # No write while a higher class holds the setpoint.
        rank = RANK[priority or "scheduled"]
        assert all(not (now < until and rank > held) for held, until in model.holds)
        if not taken:
            # The device refuses the write: no hold, and the setpoint is what it was.
            adapter.failed(writes[0].command, "exception 4")
            continue
        model.holds.append((rank, now + timedelta(seconds=duration or 30)))
        model.setpoint, model.setpoint_at = written, now
        # The device confirms by reading back what was written.
        pipeline.feed(
            "bat",
            _result(writes[0].command, writes[0].words, now),
            received_at=now,
        )


def _result(command: str, words: list[int], at: datetime) -> bytes:
    return write_result(
        int(at.timestamp() * 1000), WriteResult(command=command, ok=True, words=words)
    )


def test_the_property_test_sees_writes() -> None:
    """The property above is only worth something if commands get through: a fixed run
    in which two of four are written."""
    adapter = _adapter(default_priority="scheduled")
    pipeline = Pipeline(adapter)
    _poll(adapter, T0, soc=50, temperature=20)
    later = T0 + timedelta(seconds=5)
    written = []
    for value in (2000, 3500, -2000, 100):
        out = pipeline.feed(TOPIC, json.dumps({"value": value}).encode(), received_at=later)
        written += [
            decode_registers("s32", read_write_request(m.payload).words) for m in out.messages
        ]
        later += timedelta(seconds=1)
    # 2000 from the polled 0 after 5 s: allowed; 3500: above max; -2000 one second after
    # 2000: a step of 4000 > 1000/s; 100 two seconds after 2000: allowed.
    assert written == [2000, 100]


def test_a_command_that_fails_gives_back_the_hold_and_the_rate_start() -> None:
    """A manual setpoint that the device refuses frees the setpoint for the scheduled
    command it overrode, and the rate limit starts again from what the device has."""
    adapter = _adapter(default_priority="scheduled", priority_hold_s=300)
    pipeline = Pipeline(adapter)
    _poll(adapter, T0, soc=50, temperature=20)
    at = T0 + timedelta(seconds=2)
    first = pipeline.feed(TOPIC, b'{"value": 1000, "priority": "scheduled"}', received_at=at)
    request = read_write_request(first.messages[0].payload)
    pipeline.feed("bat", _result(request.command, request.words, at), received_at=at)
    at += timedelta(seconds=1)
    manual = pipeline.feed(TOPIC, b'{"value": 2000, "priority": "manual"}', received_at=at)
    refused = read_write_request(manual.messages[0].payload)
    # The device refuses the manual write.
    failed = adapter.failed(refused.command, "exception 4")
    assert failed is not None and failed.state == "rejected"
    # The scheduled hold is back: optimization may not override it, scheduled may.
    again = pipeline.feed(TOPIC, b'{"value": 1200, "priority": "optimization"}', received_at=at)
    assert [r.code for r in again.rejections] == ["priority"]
    # The rate starts again from 1000 at T0+2 s (on the device), not from 2000 at T0+3 s
    # (never written): at T0+3.5 s, 1000 W/s allows 1000 +- 1500, where 2000 +- 500
    # would refuse 1200.
    at += timedelta(seconds=0.5)
    fast = pipeline.feed(TOPIC, b'{"value": 2600, "priority": "scheduled"}', received_at=at)
    assert [r.code for r in fast.rejections] == ["interlock"]
    ok = pipeline.feed(TOPIC, b'{"value": 1200, "priority": "scheduled"}', received_at=at)
    assert ok.messages and not ok.rejections


def _set(pipeline: Pipeline, value: float, at: datetime, priority: str = "manual") -> Any:
    body = json.dumps({"value": value, "priority": priority}).encode()
    return pipeline.feed(TOPIC, body, received_at=at)


def test_the_rate_limit_starts_from_what_the_device_reports() -> None:
    """A setpoint confirmed at 3000 and then put back to 0 by the device (its watchdog,
    its own panel): the next command is judged from the 0 the polls report."""
    adapter = _adapter()
    pipeline = Pipeline(adapter)
    _poll(adapter, T0, soc=50, setpoint=0)
    at = T0 + timedelta(seconds=3)
    out = _set(pipeline, 3000, at)
    request = read_write_request(out.messages[0].payload)
    pipeline.feed("bat", _result(request.command, request.words, at), received_at=at)
    for second in range(1, 30):
        _poll(adapter, at + timedelta(seconds=second), soc=50, setpoint=0)
    again = _set(pipeline, 3000, at + timedelta(seconds=29.5))
    assert [r.code for r in again.rejections] == ["interlock"]
    assert "a change of 3000 in 0.5 s" in again.rejections[0].message


def test_an_unknown_outcome_keeps_the_hold_and_waits_for_the_device() -> None:
    """A write that went unanswered, and one that expired: as if on the device for the
    priority (its hold stays), unknown for the rate limit until the next poll."""
    adapter = _adapter(default_priority="scheduled", priority_hold_s=300)
    pipeline = Pipeline(adapter)
    _poll(adapter, T0, soc=50, setpoint=0)
    at = T0 + timedelta(seconds=3)
    out = _set(pipeline, 2000, at, "manual")
    request = read_write_request(out.messages[0].payload)
    unknown = WriteResult(command=request.command, ok=False, error="no answer to the write")
    answer = pipeline.feed("bat", write_result(int(at.timestamp() * 1000), unknown), received_at=at)
    assert answer.commands[0].state == "expired"
    assert "unknown whether the device took the write" in (answer.commands[0].reason or "")
    later = at + timedelta(seconds=2)
    held = _set(pipeline, 1000, later, "scheduled")
    assert [r.code for r in held.rejections] == ["priority"]
    waits = _set(pipeline, 1000, later, "manual")
    assert [r.code for r in waits.rejections] == ["interlock"]
    assert "setpoint is unknown" in waits.rejections[0].message
    _poll(adapter, later, soc=50, setpoint=2000)  # the device says: it took it
    ok = _set(pipeline, 2500, later + timedelta(seconds=1), "manual")
    assert ok.messages and not ok.rejections
    # That one expires unanswered: the same.
    expired = pipeline.expire(later + timedelta(seconds=20)).commands
    assert [r.state for r in expired] == ["expired"]
    refused = _set(pipeline, 2600, later + timedelta(seconds=21), "manual")
    assert "setpoint is unknown" in refused.rejections[0].message


def test_a_stale_scale_factor_refuses_and_a_fresh_one_guards_the_write() -> None:
    adapter = ModbusAdapter(
        options=ModbusOptions(
            site="s1",
            devices={"inv": ModbusDeviceOptions(map="sunspec_battery")},
            state_max_age_s=10,
        )
    )
    pipeline = Pipeline(adapter)
    topic = "s1/energy/storage/inv/max_charge_power/set"
    before = pipeline.feed(topic, b"3000", received_at=T0)
    assert "scale factor of wchamax is unknown or stale" in before.rejections[0].message
    _feed_poll(adapter, T0, {"wchamax_sf": [1]}, device="inv")  # WChaMax in tens of W
    out = pipeline.feed(topic, b"3000", received_at=T0 + timedelta(seconds=1))
    request = read_write_request(out.messages[0].payload)
    assert request.words == [300] and request.guard == [(40168, 1)]
    assert request.expires_ms == int((T0 + timedelta(seconds=11)).timestamp() * 1000)
    stale = pipeline.feed(topic, b"2000", received_at=T0 + timedelta(seconds=12))
    assert "unknown or stale" in stale.rejections[0].message


def test_what_the_interlocks_know_is_the_last_poll_only() -> None:
    """A state of charge that reads "not implemented" (or fails, or the device goes
    away) is unknown at once, not the last good value for another minute."""
    adapter = _adapter()
    pipeline = Pipeline(adapter)
    _poll(adapter, T0, soc=50, setpoint=0)
    assert not _set(pipeline, 500, T0 + timedelta(seconds=1)).rejections
    at = T0 + timedelta(seconds=2)
    _feed_poll(adapter, at, {"soc": [0xFFFF], "temperature": [200]})  # soc "not implemented"
    refused = _set(pipeline, 600, at + timedelta(seconds=1))
    assert "state of charge is unknown" in refused.rejections[0].message


def test_holds_stay_few_however_many_commands() -> None:
    arbiter = Arbiter()
    for n in range(5000):
        at = T0 + timedelta(seconds=n)
        arbiter.hold("k", "manual", at, 10, f"c{n}")
    depth = 0
    hold: Any = arbiter._holds["k"]
    while hold is not None:
        depth, hold = depth + 1, hold.before
    assert depth <= 11  # the holds still running: ten seconds of one a second
