"""The physics every simulated plant shares: a PV inverter, a battery and a load behind a
grid connection.

PV output and load wobble on slow cycles, the battery follows its setpoint (or covers the
load minus PV) within its power and state of charge, and the energy counters integrate
the powers between two steps, so they only grow. Each platform's simulator names the
fields its devices send; the model is the same whoever plays the plant (Voke over AMQP,
a CPI plant over MQTT).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

__all__ = ["PlantModel", "clamp"]


def clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


@dataclass
class PlantModel:
    """One plant: a PV inverter, a battery and a load behind a grid connection."""

    id: str
    rng: random.Random
    pv_kwp: float = 0.0
    battery_kwh: float = 0.0
    battery_max_kw: float = 0.0
    base_load_kw: float = 0.0
    phase: float = 0.0
    soc: float = 50.0
    soh: float = 97.0
    mode: str = "AUTO"
    setpoint_kw: float | None = None  # None: self-consumption (cover load minus PV)
    pv_limit_kw: float | None = None
    pv_kw: float = 0.0
    load_kw: float = 0.0
    battery_kw: float = 0.0  # positive: discharge
    import_kwh: float = 0.0
    export_kwh: float = 0.0
    charged_kwh: float = 0.0
    discharged_kwh: float = 0.0
    load_kwh: float = 0.0
    pv_kwh: float = 0.0
    last_ms: int | None = None
    alarms: set[tuple[str | None, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        r = self.rng
        self.pv_kwp = round(r.uniform(8, 60), 1)
        self.battery_kwh = round(r.choice((10.0, 13.5, 20.0, 30.0, 50.0)), 1)
        self.battery_max_kw = round(self.battery_kwh / 2, 1)
        self.base_load_kw = round(r.uniform(2, 25), 1)
        self.phase = r.uniform(0, 2 * math.pi)
        self.soc = r.uniform(30, 80)
        self.soh = r.uniform(92, 99.5)
        self.import_kwh = r.uniform(5_000, 80_000)
        self.export_kwh = r.uniform(1_000, 40_000)
        self.charged_kwh = r.uniform(500, 9_000)
        self.discharged_kwh = self.charged_kwh * r.uniform(0.85, 0.95)
        self.load_kwh = r.uniform(5_000, 90_000)
        self.pv_kwh = r.uniform(2_000, 60_000)

    @property
    def grid_kw(self) -> float:
        """Positive: import."""
        return self.load_kw - self.pv_kw - self.battery_kw

    def has_alarm(self, code: str) -> bool:
        """Whether alarm ``code`` is active on any device of the plant."""
        return any(c == code for _, c in self.alarms)

    def hold_power(self, kw: float) -> str | None:
        """Hold the battery at ``kw`` (positive discharges); None when done, else why not
        (the reason a platform answers with)."""
        limit = self.battery_max_kw
        if abs(kw) > limit:
            return f"out_of_range: {kw:g} kW is beyond the battery's ±{limit:g} kW"
        self.setpoint_kw = kw
        return None

    def limit_pv(self, kw: float) -> str | None:
        """Cap the PV inverter's output at ``kw``; None when done, else why not."""
        if kw < 0:
            return f"out_of_range: a limit of {kw:g} kW is negative"
        self.pv_limit_kw = kw
        return None

    def advance(self, ts_ms: int) -> None:
        """Integrate the counters up to ``ts_ms`` with the powers held since the last step,
        then draw the new powers."""
        dt_h = 0.0 if self.last_ms is None else max(0, ts_ms - self.last_ms) / 3_600_000
        if self.last_ms is None or ts_ms > self.last_ms:
            self.last_ms = ts_ms
        grid = self.grid_kw
        self.import_kwh += max(grid, 0.0) * dt_h
        self.export_kwh += max(-grid, 0.0) * dt_h
        self.load_kwh += self.load_kw * dt_h
        self.pv_kwh += self.pv_kw * dt_h
        energy = self.battery_kw * dt_h
        if energy > 0:
            self.discharged_kwh += energy
        else:
            self.charged_kwh -= energy
        self.soc = clamp(self.soc - energy / self.battery_kwh * 100, 0.0, 100.0)
        self._draw(ts_ms / 1000)

    def _draw(self, t: float) -> None:
        r = self.rng
        sun = 0.55 + 0.3 * math.sin(2 * math.pi * t / 900 + self.phase) + r.gauss(0, 0.03)
        pv = self.pv_kwp * clamp(sun, 0.0, 1.0)
        if self.pv_limit_kw is not None:
            pv = min(pv, self.pv_limit_kw)
        self.pv_kw = pv
        wobble = 1 + 0.25 * math.sin(2 * math.pi * t / 420 + 2 * self.phase)
        self.load_kw = max(0.1, self.base_load_kw * wobble + r.gauss(0, 0.05 * self.base_load_kw))
        limit = self.battery_max_kw
        if self.mode == "MAINTENANCE" or self.has_alarm("BMS_FAULT"):
            target = 0.0
        elif self.setpoint_kw is not None:
            target = self.setpoint_kw
        else:
            target = self.load_kw - self.pv_kw
        target = clamp(target, -limit, limit)
        if (target > 0 and self.soc <= 5) or (target < 0 and self.soc >= 100):
            target = 0.0
        self.battery_kw = target * (1 + r.gauss(0, 0.02))
