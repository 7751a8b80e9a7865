"""HMAC signing: the canonical form against an independent reference, rotation, replay."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from energybus.adapters.signing import ReplayGuard, Signer, canonical, es_number
from energybus.errors import SourceError

# What ECMAScript's Number.prototype.toString gives (checked in Node.js by hand).
JS_NUMBERS = {
    1.0: "1",
    -0.0: "0",
    0.1: "0.1",
    100.0: "100",
    1e-7: "1e-7",
    1.5e-6: "0.0000015",
    1e-6: "0.000001",
    1e21: "1e+21",
    1e20: "100000000000000000000",
    2.0**60: "1152921504606847000",
    123.456: "123.456",
    -2.5: "-2.5",
    5e-324: "5e-324",
    1.7976931348623157e308: "1.7976931348623157e+308",
}


@pytest.mark.parametrize(("value", "text"), JS_NUMBERS.items())
def test_es_number(value: float, text: str) -> None:
    assert es_number(value) == text


def _reference(value: Any) -> str:
    """RFC 8785 written out plainly, sharing nothing with the module under test but
    es_number (tested above against ECMAScript's own output)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return es_number(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(_reference(v) for v in value) + "]"
    items = sorted(value.items())
    return "{" + ",".join(f"{_reference(k)}:{_reference(v)}" for k, v in items) + "}"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(st.characters(min_codepoint=32, max_codepoint=126)), inner, max_size=4
        )
    ),
    max_leaves=12,
)


# The first run on a machine builds Hypothesis's Unicode tables, which is slow once.
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(min_codepoint=32, max_codepoint=126)), json_values, max_size=5
    )
)
def test_canonical_form_matches_reference(message: dict[str, Any]) -> None:
    body = {k: v for k, v in message.items() if k != "sig"}
    assert canonical({**message, "sig": "x"}).decode("utf-8") == _reference(body)


def test_signature_is_hmac_sha256_of_the_canonical_text() -> None:
    message = {"ts": 1713619200000, "cmdId": "c1", "action": "reboot", "payload": {"delay": 5.0}}
    text = '{"action":"reboot","cmdId":"c1","payload":{"delay":5},"ts":1713619200000}'
    expected = hmac.new(b"k1", text.encode(), hashlib.sha256).hexdigest()
    assert Signer(["k1"]).sign(message) == expected
    Signer(["k1"]).verify({**message, "sig": expected.upper()})


def test_rotation_and_refusals() -> None:
    message = {"ts": 1, "values": {"soc": 50}}
    old = Signer(["old"]).sign(message)
    Signer(["new", "old"]).verify({**message, "sig": old})
    with pytest.raises(SourceError) as caught:
        Signer(["new"]).verify({**message, "sig": old})
    assert caught.value.code == "bad_signature" and "old" not in caught.value.message
    with pytest.raises(SourceError) as caught:
        Signer(["new"]).verify(message)
    assert caught.value.code == "missing_signature"
    with pytest.raises(SourceError) as caught:
        Signer(["new"]).verify({**message, "sig": 12})
    assert caught.value.code == "bad_signature"
    assert "new" not in repr(Signer(["new"]))
    with pytest.raises(ValueError, match="non-empty"):
        Signer([""])


def test_replay_window() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    guard = ReplayGuard(window_s=300)
    ms = now.timestamp() * 1000
    guard.check_time(ms + 300_000, now)
    guard.check_time(ms - 300_000, now)
    for offset in (300_001, -300_001):
        with pytest.raises(SourceError) as caught:
            guard.check_time(ms + offset, now)
        assert caught.value.code == "expired"
    guard.check_and_remember("k", now, "this key")
    with pytest.raises(SourceError) as caught:
        guard.check_and_remember("k", now + timedelta(seconds=599), "this key")
    assert caught.value.code == "replayed"
    # Remembered for twice the window, then forgotten: memory stays bounded.
    guard.check_and_remember("k", now + timedelta(seconds=601), "this key")
    assert len(guard) == 1


def test_replay_memory_for_a_day_is_bounded_by_count() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    guard = ReplayGuard(window_s=300, keep_s=86400, max_keys=3)
    for key in "abc":
        guard.check_and_remember(key, now, "this id")
    with pytest.raises(SourceError):
        guard.check_and_remember("a", now + timedelta(hours=20), "this id")  # kept past 2 x 300 s
    guard.check_and_remember("d", now, "this id")  # the fourth pushes out the oldest
    assert len(guard) == 3
    guard.check_and_remember("a", now, "this id")


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_es_number_round_trips(value: float) -> None:
    assert float(es_number(value)) == value or (value == 0 and math.copysign(1, value) < 0)
