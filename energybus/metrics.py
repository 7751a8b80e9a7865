"""The vocabulary of canonical metrics: name, unit, class and value type.

The class rule is the contract's and is purely lexical, so any consumer can apply it
without this table: a metric whose name ends in ``_total`` is a cumulative counter,
every other metric is a measurement. The table adds the unit a known metric must be
published in, so a mapping that puts volts on ``active_power`` fails when it loads.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final, Literal

import msgspec

__all__ = [
    "METRICS",
    "MetricClass",
    "MetricInfo",
    "ValueType",
    "metric_class",
    "metric_info",
]

MetricClass = Literal["measurement", "counter"]
ValueType = Literal["number", "boolean"]


class MetricInfo(msgspec.Struct, frozen=True):
    """What the bus knows about one canonical metric."""

    name: str
    unit: str | None
    description: str
    value_type: ValueType = "number"

    @property
    def metric_class(self) -> MetricClass:
        return metric_class(self.name)


def metric_class(name: str) -> MetricClass:
    """``counter`` for names ending in ``_total``, else ``measurement`` (the contract's rule)."""
    return "counter" if name.endswith("_total") else "measurement"


def metric_info(name: str) -> MetricInfo | None:
    """The vocabulary entry for ``name``; ``None`` for a metric outside the vocabulary.

    Metrics outside the vocabulary are allowed on the bus (the grammar is what the
    contract fixes); they just carry no unit check.
    """
    return METRICS.get(name)


def _table() -> dict[str, MetricInfo]:
    rows: list[tuple[str, str | None, str]] = [
        # seed 004: measurement-style
        ("active_power", "W", "Active (real) power; positive in the entity's natural direction"),
        ("voltage", "V", "RMS voltage"),
        ("current", "A", "RMS current"),
        ("frequency", "Hz", "Grid frequency"),
        ("soc", "%", "Battery state of charge"),
        ("charge_power", "W", "Power flowing into storage"),
        ("discharge_power", "W", "Power flowing out of storage"),
        ("import_power", "W", "Power imported from the grid at a connection point"),
        ("export_power", "W", "Power exported to the grid at a connection point"),
        ("power", "W", "Power flowing along a transfer between subsystems"),
        # seed 004: counter-style
        ("energy_total", "Wh", "Cumulative energy through the entity"),
        ("import_energy_total", "Wh", "Cumulative energy imported from the grid"),
        ("export_energy_total", "Wh", "Cumulative energy exported to the grid"),
        # meters, inverters and batteries (seed 001)
        ("reactive_power", "var", "Reactive power"),
        ("apparent_power", "VA", "Apparent power"),
        ("power_factor", None, "Power factor, -1 to 1"),
        ("temperature", "°C", "Device temperature"),
        ("soh", "%", "Battery state of health"),
        ("charge_energy_total", "Wh", "Cumulative energy charged into storage"),
        ("discharge_energy_total", "Wh", "Cumulative energy discharged from storage"),
        ("max_charge_power", "W", "Charge power limit currently allowed"),
        ("max_discharge_power", "W", "Discharge power limit currently allowed"),
        # demand response (seed 002)
        ("shed_power", "W", "Load currently shed by demand response"),
        ("requested_reduction_power", "W", "Load reduction requested by the active event"),
        ("baseline_power", "W", "Baseline consumption the reduction is measured against"),
        ("shed_capability_power", "W", "Load that could be shed on request"),
        ("utilization", "%", "Share of the panel's rated capacity in use"),
    ]
    for phase in ("l1", "l2", "l3"):
        rows += [
            (f"voltage_{phase}", "V", f"RMS voltage, phase {phase.upper()} to neutral"),
            (f"current_{phase}", "A", f"RMS current, phase {phase.upper()}"),
            (f"active_power_{phase}", "W", f"Active power, phase {phase.upper()}"),
        ]
    table = {name: MetricInfo(name, unit, text) for name, unit, text in rows}
    for name, text in [
        ("enabled", "Whether the circuit or load is switched on"),
        ("online", "Whether the device answers its source"),
        ("alarm", "Whether an alarm is active"),
    ]:
        table[name] = MetricInfo(name, None, text, "boolean")
    return table


METRICS: Final = MappingProxyType(_table())
