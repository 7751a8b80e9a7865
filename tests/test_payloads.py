from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from energybus import (
    Envelope,
    HistorianMeta,
    LastEnvelope,
    Meta,
    PayloadError,
    decode_availability,
    decode_last,
    decode_meta,
    decode_payload,
    decode_value,
    encode_scalar,
    validate_payload,
)
from energybus.payloads import encode


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"3245.7", 3245.7),
        (b"0", 0),
        (b"-12", -12),
        (b"true", True),
        (b"false", False),
        (b" 1e3 ", 1000.0),
        ("42", 42),
    ],
)
def test_profile_a_scalars(payload: bytes | str, expected: object) -> None:
    value = decode_value(payload)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'"3.5"', "wrong_type"),
        (b"null", "wrong_type"),
        (b"[1]", "wrong_type"),
        (b"NaN", "malformed_json"),
        (b"Infinity", "malformed_json"),
        (b"-Infinity", "malformed_json"),
        (b"1e999", "non_finite"),
        (b"", "malformed_json"),
        (b"3.5 kW", "malformed_json"),
        (b"\xff", "malformed_json"),
    ],
)
def test_profile_a_refuses_everything_else(payload: bytes, code: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_value(payload)
    assert info.value.code == code
    assert info.value.path == "$"


def test_profile_b_envelope() -> None:
    decoded = decode_value(
        b'{"value": 3245.7, "unit": "W", "observed_at": "2026-03-08T10:15:12Z", "quality": "good"}'
    )
    assert decoded == Envelope(
        value=3245.7,
        unit="W",
        observed_at=datetime(2026, 3, 8, 10, 15, 12, tzinfo=UTC),
        quality="good",
    )
    assert decode_value(b'{"value": false}') == Envelope(value=False)


@pytest.mark.parametrize(
    ("payload", "code", "path"),
    [
        (b'{"value": 1, "extra": 2}', "unknown_field", "$.extra"),
        (b'{"unit": "W"}', "missing_field", "$.value"),
        (b'{"value": "1"}', "wrong_type", "$.value"),
        (b'{"value": null}', "wrong_type", "$.value"),
        (b'{"value": 1e999}', "non_finite", "$.value"),
        (b'{"value": 1, "quality": "meh"}', "invalid_value", "$.quality"),
        (b'{"value": 1, "observed_at": "2026-03-08T10:15:12"}', "naive_datetime", "$.observed_at"),
        (b'{"value": 1, "observed_at": "yesterday"}', "invalid_value", "$.observed_at"),
        (b'{"value": 1, "observed_at": 1700000000}', "wrong_type", "$.observed_at"),
        (b'{"value": 1, "unit": 5}', "wrong_type", "$.unit"),
    ],
)
def test_profile_b_errors_carry_a_path(payload: bytes, code: str, path: str) -> None:
    with pytest.raises(PayloadError) as info:
        decode_value(payload)
    assert (info.value.code, info.value.path) == (code, path)
    assert path in info.value.message


def test_quality_error_lists_the_choices() -> None:
    error = validate_payload("value", b'{"value": 1, "quality": "ok"}')
    assert error is not None
    assert "good, degraded, stale, bad" in error.message


def test_encoding_is_utc_with_z() -> None:
    plus_two = timezone(timedelta(hours=2))
    envelope = LastEnvelope(
        value=1.5, observed_at=datetime(2026, 3, 8, 12, 15, 12, tzinfo=plus_two).astimezone(UTC)
    )
    assert encode(envelope) == b'{"value":1.5,"observed_at":"2026-03-08T10:15:12Z"}'


def test_last_needs_observed_at() -> None:
    with pytest.raises(PayloadError) as info:
        decode_last(b"3.5")
    assert info.value.code == "wrong_type"
    with pytest.raises(PayloadError) as info:
        decode_last(b'{"value": 3.5}')
    assert (info.value.code, info.value.path) == ("missing_field", "$.observed_at")
    last = decode_last(b'{"value": 3.5, "observed_at": "2024-10-23T16:13:20Z"}')
    assert last.observed_at == datetime(2024, 10, 23, 16, 13, 20, tzinfo=UTC)


def test_meta() -> None:
    meta = decode_meta(
        b'{"unit":"W","description":"PV inverter AC active power","source":"modbus_adapter",'
        b'"precision":0.1,"historian":{"mode":"state"},"class":"measurement",'
        b'"max_interval_s":60,"deadband":0.5,"attributes":{"panelMaxKw":48}}'
    )
    assert meta.historian == HistorianMeta(mode="state")
    assert meta.metric_class == "measurement"
    assert meta.attributes == {"panelMaxKw": 48}
    assert encode(Meta(unit="W")) == b'{"unit":"W"}'
    for bad, code, path in [
        (b'{"historian":{"mode":"stream"}}', "invalid_value", "$.historian.mode"),
        (b'{"precision":0}', "out_of_range", "$.precision"),
        (b'{"colour":"red"}', "unknown_field", "$.colour"),
        (b"[]", "wrong_type", "$"),
    ]:
        with pytest.raises(PayloadError) as info:
            decode_meta(bad)
        assert (info.value.code, info.value.path) == (code, path)


def test_availability() -> None:
    assert decode_availability(b"online") == "online"
    assert decode_availability("offline") == "offline"
    for bad in (b'"online"', b"Online", b"", b"online\n", b"1"):
        with pytest.raises(PayloadError) as info:
            decode_availability(bad)
        assert info.value.code == "invalid_value"


def test_dispatch_by_stream() -> None:
    assert decode_payload("set", b"0") == 0
    assert decode_payload("availability", b"online") == "online"
    assert validate_payload("value", b"1") is None
    assert validate_payload("last", b"1") is not None
    assert validate_payload("meta", b"{}") is None


def test_encode_scalar() -> None:
    assert encode_scalar(3245.7) == b"3245.7"
    assert encode_scalar(True) == b"true"
    assert encode_scalar(5000) == b"5000"
    for bad, code in [
        (float("nan"), "non_finite"),
        (float("inf"), "non_finite"),
        ("1", "wrong_type"),
        (None, "wrong_type"),
    ]:
        with pytest.raises(PayloadError) as info:
            encode_scalar(bad)  # type: ignore[arg-type]
        assert info.value.code == code


@given(
    st.one_of(
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)
def test_scalar_round_trip(value: bool | int | float) -> None:
    decoded = decode_value(encode_scalar(value))
    assert decoded == value and type(decoded) is type(value)


@given(st.binary())
def test_validate_payload_never_raises(data: bytes) -> None:
    for stream in ("value", "set", "last", "meta", "availability"):
        error = validate_payload(stream, data)
        assert error is None or (error.code and error.message)


def test_historian_mode_is_always_spelled_out() -> None:
    assert encode(Meta(historian=HistorianMeta(mode="sample"))) == (
        b'{"historian":{"mode":"sample"}}'
    )
    with pytest.raises(PayloadError) as info:
        decode_meta(b'{"historian":{}}')
    assert (info.value.code, info.value.path) == ("missing_field", "$.historian.mode")
