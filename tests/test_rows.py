from __future__ import annotations

from datetime import UTC, datetime

import pytest

from energybus import (
    CounterRow,
    MeasurementRow,
    PayloadError,
    TopicError,
    decode_sample,
    historian_row,
    make_sample,
    to_row,
)

NOW = datetime(2026, 3, 8, 10, 15, 30, tzinfo=UTC)


def test_measurement_row_from_profile_a_takes_ingest_time_and_is_degraded() -> None:
    row = historian_row("vad/energy/storage/battery-main/soc/value", b"85.5", received_at=NOW)
    assert row == MeasurementRow("vad", "storage.battery-main", "soc", 85.5, NOW, "degraded")


def test_measurement_row_from_profile_b_keeps_device_time() -> None:
    row = historian_row(
        "vad/energy/source/pv-roof-1/active_power/value",
        b'{"value":3245.7,"unit":"W","observed_at":"2026-03-08T10:15:12Z","quality":"good"}',
        received_at=NOW,
    )
    assert row == MeasurementRow(
        "vad",
        "source.pv-roof-1",
        "active_power",
        3245.7,
        datetime(2026, 3, 8, 10, 15, 12, tzinfo=UTC),
        "good",
    )


def test_counters_go_to_the_counter_historian() -> None:
    row = historian_row(
        "vad/energy/grid/main-meter/import_energy_total/value", b"123456", received_at=NOW
    )
    assert isinstance(row, CounterRow)
    assert (row.device_id, row.metric_name, row.value) == (
        "grid.main-meter",
        "import_energy_total",
        123456.0,
    )


def test_booleans_are_stored_as_0_and_1() -> None:
    on = to_row(make_sample("vad", "load", "c1", "enabled", True, observed_at=NOW))
    off = to_row(make_sample("vad", "load", "c1", "enabled", False, observed_at=NOW))
    assert (on.value, off.value) == (1.0, 0.0)


@pytest.mark.parametrize("stream", ["last", "meta", "availability", "set"])
def test_other_streams_are_not_ingested(stream: str) -> None:
    payload = b'{"value":1,"observed_at":"2026-03-08T10:15:12Z"}'
    assert (
        historian_row(f"vad/energy/load/x/active_power/{stream}", payload, received_at=NOW) is None
    )


def test_bad_messages_raise_for_the_dead_letter_path() -> None:
    with pytest.raises(TopicError):
        historian_row("vad/energy/load/X/active_power/value", b"1", received_at=NOW)
    with pytest.raises(PayloadError):
        historian_row("vad/energy/load/x/active_power/value", b'"1"', received_at=NOW)
    with pytest.raises(PayloadError) as info:
        decode_sample("vad/energy/load/x/active_power/meta", b"{}", received_at=NOW)
    assert info.value.code == "not_a_sample"


def test_implausible_values_from_other_publishers_are_not_stored() -> None:
    topic = "vad/energy/load/x/active_power/value"
    for payload, path in [
        (b"1e305", "$"),
        (b'{"value": -2e10, "observed_at": "2026-03-08T10:15:12Z"}', "$.value"),
    ]:
        with pytest.raises(PayloadError) as info:
            historian_row(topic, payload, received_at=NOW)
        assert (info.value.code, info.value.path) == ("implausible_value", path)
    current = "vad/energy/grid/main/current/value"
    with pytest.raises(PayloadError):
        historian_row(current, b"1.2e29", received_at=NOW)
    assert historian_row(topic, b"5e9", received_at=NOW) is not None  # 5 GW: plausible
    # A metric outside the vocabulary has no unit to judge by: only finite is required.
    assert historian_row("vad/energy/load/x/custom_thing/value", b"1e300", received_at=NOW)
