"""Canonical SI units and the conversions into them.

A conversion is compiled once (when a mapping loads) into a :class:`Conversion`; the
per-message work is then one call. Scaling by a power of ten goes through the decimal
text of the value, so ``1.1 kW`` becomes ``1100.0 W`` and not ``1100.0000000000002 W``,
which plain float multiplication gives for about one value in seventy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import Final

from energybus.errors import PayloadError, UnitError

__all__ = [
    "CANONICAL_UNITS",
    "PLAUSIBLE",
    "SOURCE_UNITS",
    "Conversion",
    "canonical_unit",
    "conversion",
    "convert",
]

CANONICAL_UNITS: Final = frozenset({"W", "Wh", "V", "A", "Hz", "%", "VA", "var", "°C"})
"""The units values carry on the bus. Energy is always Wh, never kWh, so sums add up."""

PLAUSIBLE: Final = MappingProxyType(
    {
        "W": (-1e10, 1e10),
        "VA": (-1e10, 1e10),
        "var": (-1e10, 1e10),
        "Wh": (-1e16, 1e16),
        "V": (-2e6, 2e6),
        "A": (-1e6, 1e6),
        "Hz": (0.0, 1e4),
        "%": (-1000.0, 1000.0),
        "°C": (-273.15, 1e4),
    }
)
"""The default plausible range of a value per canonical unit, wide enough for any real
site (10 GW, 10 PWh, 2 MV, 1 MA) and narrow enough to catch a corrupted register or a
unit slip (1.2e29 A). A mapping row may narrow it with ``range``; a value outside is
refused, not published. Values without a unit are only held to being finite."""

# source unit -> (canonical unit, power of ten to multiply by)
SOURCE_UNITS: Final = MappingProxyType(
    {
        "W": ("W", 0),
        "mW": ("W", -3),
        "kW": ("W", 3),
        "MW": ("W", 6),
        "Wh": ("Wh", 0),
        "kWh": ("Wh", 3),
        "MWh": ("Wh", 6),
        "V": ("V", 0),
        "mV": ("V", -3),
        "kV": ("V", 3),
        "A": ("A", 0),
        "mA": ("A", -3),
        "kA": ("A", 3),
        "Hz": ("Hz", 0),
        "mHz": ("Hz", -3),
        "%": ("%", 0),
        "VA": ("VA", 0),
        "kVA": ("VA", 3),
        "MVA": ("VA", 6),
        "var": ("var", 0),
        "VAr": ("var", 0),
        "kvar": ("var", 3),
        "kVAr": ("var", 3),
        "Mvar": ("var", 6),
        "°C": ("°C", 0),
        "degC": ("°C", 0),
    }
)


class Conversion:
    """Scale a source value and state its canonical unit; built once, applied per message.

    ``scale`` is the source's own factor (a register holding tenths of a volt has
    ``scale=0.1``); it combines with the unit's power of ten.
    """

    __slots__ = ("_exponent", "_factor", "_fn", "_power", "unit")

    def __init__(self, source_unit: str | None, scale: float = 1.0) -> None:
        if not math.isfinite(scale) or scale == 0:
            raise UnitError(
                "bad_scale",
                f"scale must be a finite, non-zero number, not {scale!r}",
                unit=str(source_unit),
            )
        if source_unit is None or source_unit == "":
            self.unit: str | None = None
            exponent = 0
        else:
            self.unit, exponent = _lookup(source_unit)
        # A scale like 0.1 or 1000 folds into the exponent and stays exact.
        scale_exponent = _power_of_ten(scale)
        if scale_exponent is not None:
            self._exponent: int | None = exponent + scale_exponent
            self._power: int = 10 ** abs(self._exponent)
            self._factor = 1.0
        else:
            self._exponent = None
            self._power = 1
            self._factor = scale * 10.0**exponent
        self._fn = self._build()

    def __call__(self, value: float) -> float:
        return value if self._fn is None else self._fn(value)

    def fast(self) -> Callable[[float], float] | None:
        """The same conversion as a plain function, for hot loops; ``None`` for identity.

        A closure skips the class-call machinery, which costs as much as the arithmetic.
        """
        return self._fn

    def _build(self) -> Callable[[float], float] | None:
        exponent = self._exponent
        if exponent == 0:
            return None
        if exponent is None:
            factor = self._factor

            def multiply(value: float) -> float:
                if type(value) is bool:
                    return value
                try:
                    return _finite(value * factor)
                except OverflowError:  # an integer too large for a double
                    raise PayloadError("non_finite", _OVERFLOW) from None

            return multiply
        if exponent < 0:
            divisor = self._power

            def scale_down(value: float) -> float:
                if type(value) is bool:
                    return value
                try:
                    return value / divisor
                except OverflowError:  # an integer too large for a double
                    raise PayloadError("non_finite", _OVERFLOW) from None

            return scale_down
        power = self._power
        scale = float(power)
        suffix = f"e{exponent}"

        def scale_up(value: float) -> float:
            if type(value) is float:
                # Most readings scale to a whole number (2.1 kW is 2100 W). Then ``whole``
                # is the exact answer if it divides back to the same double and is small
                # enough (< 1e12) that both decimals have at most 15 significant digits,
                # which doubles keep apart. Otherwise go through the decimal text.
                scaled = value * scale
                if -1e12 < scaled < 1e12:
                    if scaled.is_integer():
                        # Already whole (1.5 kW): no round() and int on the way. + 0.0
                        # makes -0.0 the 0.0 that the path below gives.
                        if scaled / scale == value:
                            return scaled + 0.0
                    else:
                        whole = round(scaled)
                        if whole / scale == value:
                            return float(whole)
                text = repr(value)
                if "e" not in text:
                    return _finite(float(text + suffix))
                if "n" in text:  # inf or nan: nothing to keep exact
                    return _finite(value * power)
                mantissa, _, shift = text.partition("e")
                return _finite(float(f"{mantissa}e{int(shift) + exponent}"))
            if type(value) is bool:
                return value
            return value * power  # an int stays an int: exact, and never infinite

        return scale_up

    def inverse(self) -> Conversion:
        """The conversion back, from the canonical unit to the source's (for commands)."""
        back = Conversion.__new__(Conversion)
        back.unit = None
        if self._exponent is not None:
            back._exponent = -self._exponent
            back._power = 10 ** abs(back._exponent)
            back._factor = 1.0
        else:
            back._exponent = None
            back._power = 1
            back._factor = 1.0 / self._factor
        back._fn = back._build()
        return back

    def __repr__(self) -> str:
        return f"Conversion(unit={self.unit!r}, exponent={self._exponent}, factor={self._factor})"


_OVERFLOW: Final = "value is out of the range of a finite number once converted"


def _finite(value: float) -> float:
    """Refuse a scaled value that left the range of a double (1e306 kW in W)."""
    if value - value != 0:  # inf - inf and nan - nan are nan
        raise PayloadError(
            "non_finite", "value is out of the range of a finite number once converted"
        )
    return value


def _power_of_ten(scale: float) -> int | None:
    if scale <= 0:
        return None
    exponent = round(math.log10(scale))
    return exponent if 10.0**exponent == scale else None


def _lookup(unit: str) -> tuple[str, int]:
    try:
        return SOURCE_UNITS[unit]
    except KeyError:
        known = ", ".join(sorted(SOURCE_UNITS))
        raise UnitError(
            "unknown_unit", f"unknown unit {unit!r}; known: {known}", unit=unit
        ) from None


def canonical_unit(unit: str) -> str:
    """The canonical unit a source unit converts to: ``kW`` -> ``W``."""
    return _lookup(unit)[0]


def conversion(source_unit: str | None, scale: float = 1.0) -> Conversion:
    """Compile a conversion from ``source_unit`` (times ``scale``) to its canonical unit."""
    return Conversion(source_unit, scale)


def convert(value: float, source_unit: str, scale: float = 1.0) -> tuple[float, str]:
    """Convert one value: ``convert(1.5, "kW")`` is ``(1500.0, "W")``.

    For repeated use, compile once with :func:`conversion`.
    """
    conv = Conversion(source_unit, scale)
    assert conv.unit is not None
    return conv(value), conv.unit
