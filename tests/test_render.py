from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import given, strategies as st

from energybus import (
    QUALITIES,
    Envelope,
    LastEnvelope,
    Message,
    PayloadError,
    Quality,
    Renderer,
    Sample,
    SeriesSpec,
    decode_last,
    decode_meta,
    decode_value,
    make_sample,
    validate_topic,
)
from energybus.payloads import encode

T0 = datetime(2024, 10, 23, 16, 13, 20, tzinfo=UTC)
SOC = "ven-042/energy/storage/ven-042-battery/soc"


def soc(value: float, seconds: float = 0, quality: str = "good") -> Sample:
    return make_sample(
        "ven-042",
        "storage",
        "ven-042-battery",
        "soc",
        value,
        observed_at=T0 + timedelta(seconds=seconds),
        unit="%",
        quality=quality,  # type: ignore[arg-type]
    )


def by_stream(messages: list[Message]) -> dict[str, Message]:
    return {m.topic.rsplit("/", 1)[1]: m for m in messages}


def test_first_sample_gives_meta_value_and_last_in_that_order() -> None:
    messages = Renderer(source="ven").render(soc(85.5))
    assert [m.topic for m in messages] == [f"{SOC}/meta", f"{SOC}/value", f"{SOC}/last"]
    meta, value, last = messages
    assert (value.payload, value.qos, value.retain) == (b"85.5", 1, False)
    assert (last.qos, last.retain) == (1, True)
    assert last.payload == (
        b'{"value":85.5,"unit":"%","observed_at":"2024-10-23T16:13:20Z","quality":"good"}'
    )
    assert (meta.qos, meta.retain) == (1, True)
    decoded = decode_meta(meta.payload)
    assert decoded.unit == "%" and decoded.source == "ven"
    assert decoded.metric_class == "measurement"
    assert decoded.max_interval_s == 60.0
    assert decoded.historian is not None and decoded.historian.mode == "sample"
    for m in messages:
        assert validate_topic(m.topic) is None


def test_dedupe_suppresses_value_until_the_heartbeat() -> None:
    renderer = Renderer(default=SeriesSpec(max_interval_s=30))
    renderer.render(soc(50, 0))
    assert set(by_stream(renderer.render(soc(50, 10)))) == {"last"}
    assert set(by_stream(renderer.render(soc(50, 29.9)))) == {"last"}
    assert renderer.suppressed == 2
    # 30 s after the last emitted value, it is repeated so consumers know it is alive.
    assert set(by_stream(renderer.render(soc(50, 30)))) == {"value", "last"}
    assert set(by_stream(renderer.render(soc(50, 40)))) == {"last"}
    assert by_stream(renderer.render(soc(51, 41)))["value"].payload == b"51"


def test_deadband_compares_against_the_last_emitted_value() -> None:
    renderer = Renderer(default=SeriesSpec(deadband=1.0, max_interval_s=None))
    renderer.render(soc(50.0, 0))
    assert "value" not in by_stream(renderer.render(soc(50.6, 1)))
    assert "value" not in by_stream(renderer.render(soc(51.0, 2)))
    # Slow drift still shows: 51.2 is more than 1.0 from the 50.0 that was emitted.
    assert by_stream(renderer.render(soc(51.2, 3)))["value"].payload == b"51.2"
    assert "value" not in by_stream(renderer.render(soc(51.2, 10_000)))  # no heartbeat


def test_quality_change_and_type_change_are_changes() -> None:
    renderer = Renderer()
    renderer.render(soc(1, 0))
    assert "value" in by_stream(renderer.render(soc(1, 1, quality="stale")))
    assert "value" in by_stream(renderer.render(soc(True, 2, quality="stale")))


def test_deadband_leaves_booleans_exact_and_types_distinct() -> None:
    renderer = Renderer(default=SeriesSpec(deadband=5.0, max_interval_s=None))
    renderer.render(soc(True, 0))
    assert "value" not in by_stream(renderer.render(soc(True, 1)))
    assert by_stream(renderer.render(soc(False, 2)))["value"].payload == b"false"
    assert by_stream(renderer.render(soc(1, 3)))["value"].payload == b"1"  # bool -> int
    assert "value" not in by_stream(renderer.render(soc(4, 4)))
    assert by_stream(renderer.render(soc(4.0, 5)))["value"].payload == b"4.0"  # int -> float


def test_dedupe_off_publishes_every_sample() -> None:
    renderer = Renderer(default=SeriesSpec(dedupe=False))
    for second in range(3):
        assert "value" in by_stream(renderer.render(soc(7, second)))
    meta = decode_meta(Renderer(default=SeriesSpec(dedupe=False)).render(soc(1))[0].payload)
    assert meta.max_interval_s is None


def test_last_only_moves_forward_and_can_be_thinned() -> None:
    renderer = Renderer(default=SeriesSpec(last_min_interval_s=10, dedupe=False))
    renderer.render(soc(1, 100))
    late = by_stream(renderer.render(soc(2, 50)))
    assert "value" in late and "last" not in late  # older than the retained last
    # Every emitted value updates last; the minimum interval only thins unchanged ones.
    assert "last" in by_stream(renderer.render(soc(3, 101)))
    thin = Renderer(default=SeriesSpec(last_min_interval_s=10, max_interval_s=None))
    thin.render(soc(1, 0))
    assert by_stream(thin.render(soc(1, 5))) == {}
    assert set(by_stream(thin.render(soc(1, 10)))) == {"last"}


def test_profile_b_value() -> None:
    renderer = Renderer(specs={"soc": SeriesSpec(profile="B")})
    value = by_stream(renderer.render(soc(85.5)))["value"]
    decoded = decode_value(value.payload)
    assert isinstance(decoded, msgspec.Struct)
    assert value.payload == (
        b'{"value":85.5,"unit":"%","observed_at":"2024-10-23T16:13:20Z","quality":"good"}'
    )


def test_meta_is_sent_again_only_when_it_changes() -> None:
    renderer = Renderer()
    assert "meta" in by_stream(renderer.render(soc(1, 0)))
    assert "meta" not in by_stream(renderer.render(soc(2, 1)))
    described = SeriesSpec(description="Battery state of charge")
    meta = by_stream(renderer.render(soc(3, 2), described))["meta"]
    assert decode_meta(meta.payload).description == "Battery state of charge"
    assert "meta" not in by_stream(renderer.render(soc(4, 3), described))
    # An equal spec that is another object does not resend meta either.
    assert "meta" not in by_stream(
        renderer.render(soc(5, 4), SeriesSpec(description="Battery state of charge"))
    )
    other_unit = make_sample(
        "ven-042",
        "storage",
        "ven-042-battery",
        "soc",
        0.5,
        observed_at=T0 + timedelta(seconds=5),
        unit=None,
    )
    assert "meta" in by_stream(renderer.render(other_unit, described))
    renderer.forget()
    assert "meta" in by_stream(renderer.render(soc(6, 6), described))


def test_counter_meta_and_attributes() -> None:
    sample = make_sample(
        "vad", "grid", "main-meter", "import_energy_total", 1234, observed_at=T0, unit="Wh"
    )
    spec = SeriesSpec(attributes={"panelMaxKw": 48.0}, historian_mode="sample")
    meta = decode_meta(Renderer().render(sample, spec)[0].payload)
    assert meta.metric_class == "counter"
    assert meta.attributes == {"panelMaxKw": 48.0}


def test_time_rule() -> None:
    received = datetime(2026, 1, 1, tzinfo=UTC)
    sample = make_sample("vad", "load", "x", "active_power", 1.0, received_at=received)
    assert (sample.observed_at, sample.quality) == (received, "degraded")
    stale = make_sample(
        "vad", "load", "x", "active_power", 1.0, received_at=received, quality="stale"
    )
    assert stale.quality == "stale"
    plus_one = timezone(timedelta(hours=1))
    kept = make_sample(
        "vad",
        "load",
        "x",
        "active_power",
        1.0,
        observed_at=datetime(2026, 1, 1, 1, tzinfo=plus_one),
        received_at=received,
    )
    assert kept.observed_at == received and kept.observed_at.tzinfo is UTC
    assert kept.quality == "good"
    with pytest.raises(PayloadError) as info:
        make_sample("vad", "load", "x", "active_power", 1.0, observed_at=datetime(2026, 1, 1))
    assert info.value.code == "naive_datetime"


def test_renderer_converts_other_zones_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    sample = Sample(
        "vad", "load", "x", "active_power", 1.0, datetime(2026, 1, 1, 2, tzinfo=plus_two)
    )
    last = by_stream(Renderer().render(sample))["last"]
    assert decode_last(last.payload).observed_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert b'"observed_at":"2026-01-01T00:00:00Z"' in last.payload


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (float("nan"), "non_finite"),
        (float("-inf"), "non_finite"),
        ("12", "wrong_type"),
        (None, "wrong_type"),
    ],
)
def test_unpublishable_values_are_refused(value: object, code: str) -> None:
    sample = Sample("vad", "load", "x", "active_power", value, T0)  # type: ignore[arg-type]
    with pytest.raises(PayloadError) as info:
        Renderer().render(sample)
    assert info.value.code == code


def test_bad_ids_are_refused_when_a_series_is_first_seen() -> None:
    sample = Sample("vad", "load", "PV Roof", "active_power", 1.0, T0)
    with pytest.raises(ValueError, match="kebab-case"):
        Renderer().render(sample)


def test_spec_checks_its_settings() -> None:
    for bad in ({"deadband": -1.0}, {"max_interval_s": 0.0}, {"last_min_interval_s": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SeriesSpec(**bad)  # type: ignore[arg-type]


@given(
    value=st.one_of(
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
    ),
    unit=st.one_of(st.none(), st.sampled_from(["W", "°C", "%", 'odd"unit\\'])),
    quality=st.sampled_from(QUALITIES),
    observed=st.datetimes(timezones=st.just(UTC)),
)
def test_assembled_envelopes_equal_msgspec_encoding(
    value: bool | int | float, unit: str | None, quality: Quality, observed: datetime
) -> None:
    sample = Sample("vad", "load", "x", "active_power", value, observed, quality, unit)
    out = Renderer(specs={"active_power": SeriesSpec(profile="B")}).render(sample)
    streams = by_stream(out)
    expected = encode(LastEnvelope(value=value, unit=unit, observed_at=observed, quality=quality))
    assert streams["last"].payload == expected
    assert streams["value"].payload == encode(
        Envelope(value=value, unit=unit, observed_at=observed, quality=quality)
    )


def test_an_unknown_quality_is_refused() -> None:
    sample = Sample("vad", "load", "x", "active_power", 1.0, T0, "fine")  # type: ignore[arg-type]
    with pytest.raises(PayloadError) as info:
        Renderer().render(sample)
    assert info.value.code == "invalid_value"


@pytest.mark.parametrize(
    "bad",
    [
        Sample("vad", "load", "x", "active_power", 2.0, T0, "fine"),  # type: ignore[arg-type]
        Sample("vad", "load", "x", "active_power", 2.0, datetime(2026, 1, 1)),
        Sample("vad", "load", "x", "active_power", float("nan"), T0),
        Sample("vad", "load", "x", "active_power", "2", T0),  # type: ignore[arg-type]
    ],
)
def test_a_refused_sample_leaves_no_trace(bad: Sample) -> None:
    """Refused whatever the stream state: no message out, dedupe and meta unchanged."""
    renderer = Renderer(default=SeriesSpec(profile="A"))
    first = Sample("vad", "load", "x", "active_power", 1.0, T0, unit="W")
    renderer.render(first)
    out: list[Message] = []
    with pytest.raises(PayloadError):
        renderer.render_into(bad, out)
    assert out == []
    # The series still holds 1.0 W: the same value is deduplicated, meta is not resent.
    again = Sample("vad", "load", "x", "active_power", 1.0, T0 + timedelta(seconds=1), unit="W")
    assert set(by_stream(renderer.render(again))) == {"last"}


def test_each_envelope_carries_its_own_sample_time() -> None:
    renderer = Renderer(default=SeriesSpec(dedupe=False))
    times = [T0, T0 + timedelta(seconds=1), T0 + timedelta(seconds=1), T0 + timedelta(hours=1)]
    for second, moment in enumerate(times):
        sample = Sample("vad", "load", "x", "active_power", float(second), moment)
        last = by_stream(renderer.render(sample))["last"]
        assert decode_last(last.payload).observed_at == moment
