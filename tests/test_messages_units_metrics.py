from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from energybus import (
    CANONICAL_UNITS,
    DELIVERY,
    METRICS,
    Message,
    PolicyError,
    TopicError,
    UnitError,
    canonical_unit,
    check_delivery,
    conversion,
    convert,
    message,
    metric_class,
    metric_info,
    parse_topic,
)


def test_delivery_policy_table() -> None:
    assert {stream: tuple(d) for stream, d in DELIVERY.items()} == {
        "value": (1, False),
        "last": (1, True),
        "meta": (1, True),
        "availability": (1, True),
        "set": (1, False),
    }


def test_message_takes_flags_from_the_policy() -> None:
    assert message("vad/energy/storage/b/soc/last", b"{}") == Message(
        "vad/energy/storage/b/soc/last", b"{}", 1, True
    )
    assert message("vad/energy/load/x/shed_power/set", b"0").retain is False
    with pytest.raises(TopicError):
        message("vad/energy/storage/b/soc", b"1")


def test_retained_set_is_refused() -> None:
    with pytest.raises(PolicyError) as info:
        check_delivery("vad/energy/load/x/shed_power/set", retain=True)
    assert info.value.code == "retained_set"
    check_delivery("vad/energy/load/x/shed_power/set", retain=False)
    check_delivery("vad/energy/load/x/active_power/last", retain=True)


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (1.5, "kW", (1500.0, "W")),
        (1.1, "kW", (1100.0, "W")),
        (2, "MW", (2_000_000, "W")),
        (12.5, "kWh", (12500.0, "Wh")),
        (0.001, "MWh", (1000.0, "Wh")),
        (1500, "mA", (1.5, "A")),
        (11.4, "kV", (11400.0, "V")),
        (3.2, "kVA", (3200.0, "VA")),
        (-0.7, "kvar", (-700.0, "var")),
        (230.1, "V", (230.1, "V")),
        (50.0, "Hz", (50.0, "Hz")),
        (21.5, "degC", (21.5, "°C")),
        (1e-5, "kW", (0.01, "W")),
    ],
)
def test_unit_conversion(value: float, unit: str, expected: tuple[float, str]) -> None:
    assert convert(value, unit) == expected


def test_scaled_registers_stay_exact() -> None:
    tenths = conversion("V", scale=0.1)
    assert tenths(2301) == 230.1
    assert tenths.unit == "V"
    assert conversion("kW", scale=0.01)(12345) == 123450  # 123.45 kW
    assert conversion("W", scale=0.5)(7) == 3.5
    assert conversion(None)(True) is True
    assert conversion("kW")(True) is True  # booleans are never scaled


@given(st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False))
def test_kilo_conversion_matches_decimal_arithmetic(value: object) -> None:
    from decimal import Decimal

    assert isinstance(value, Decimal)
    assert convert(float(value), "kW")[0] == float(value * 1000)


def test_unit_errors() -> None:
    with pytest.raises(UnitError) as info:
        convert(1, "horsepower")
    assert info.value.code == "unknown_unit" and info.value.unit == "horsepower"
    with pytest.raises(UnitError):
        conversion("W", scale=0)
    assert canonical_unit("kvar") == "var"
    assert {canonical_unit(u) for u in ("kW", "kWh", "kV", "mA", "kVA", "kvar")} <= CANONICAL_UNITS


def test_metric_classes() -> None:
    assert metric_class("import_energy_total") == "counter"
    assert metric_class("active_power") == "measurement"
    assert metric_class("totalizer") == "measurement"
    for name in (
        "active_power",
        "voltage",
        "current",
        "frequency",
        "soc",
        "charge_power",
        "discharge_power",
        "import_power",
        "export_power",
        "energy_total",
        "import_energy_total",
        "export_energy_total",
        "power",
    ):
        info = metric_info(name)
        assert info is not None, name
    assert metric_info("energy_total").metric_class == "counter"  # type: ignore[union-attr]
    assert metric_info("soc").unit == "%"  # type: ignore[union-attr]
    assert metric_info("enabled").value_type == "boolean"  # type: ignore[union-attr]
    assert metric_info("made_up") is None
    for name, info in METRICS.items():
        # Every vocabulary entry is a valid metric level with a canonical unit.
        parse_topic(f"vad/energy/load/x/{name}/value")
        assert info.unit is None or info.unit in CANONICAL_UNITS
        if name.endswith("_total"):
            assert info.unit == "Wh"


@given(
    st.integers(min_value=-(10**12), max_value=10**12),
    st.integers(min_value=0, max_value=9),
    st.sampled_from(["kW", "MW", "kWh", "kV"]),
)
def test_scaling_up_is_exact_for_decimal_input(mantissa: int, decimals: int, unit: str) -> None:
    from decimal import Decimal

    from energybus.units import Conversion

    value = float(Decimal(mantissa).scaleb(-decimals))
    conversion = Conversion(unit)
    fast = conversion.fast()
    assert fast is not None
    expected = float(Decimal(repr(value)).scaleb(3 if unit[0] == "k" else 6))
    assert fast(value) == expected
    assert conversion(value) == expected
