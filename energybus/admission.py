"""The admission gate: what every canonical ``set`` passes before any adapter sees it.

One module, pure (no I/O), the same for every way a command arrives (the bus, ``energybus
normalize``, a library call): the checks run in a fixed order and the first one that
fails refuses the command with a stable code.

1. **Retained** (``retained_set``): the contract forbids retained ``set`` messages; one
   would fire again for every later subscriber.
2. **The topic** is a canonical ``set`` topic, and **the payload** a ``set`` payload
   (Profile A scalar or Profile B envelope; ``malformed_json``, ``wrong_type``,
   ``non_finite`` ...).
3. **Unit**: a Profile B ``unit`` must be the series' canonical unit (``unknown_unit``,
   ``unit_mismatch``); the bus carries SI, so a ``set`` in kW is refused, not guessed at.
4. **Age** (``stale_command``): a Profile B ``set`` whose ``observed_at`` is older than
   the series' ``max_age_s``, or further in the future than ``max_future_s`` (clock
   skew), is refused. A Profile A ``set`` has no time of its own; its age is bounded by
   the MQTT 5 message expiry its sender sets (docs/commands.md).
5. **Interlocks** (``interlock``): hard limits per series that no command passes, whoever
   sends it. Value bounds now; device-specific interlocks and priority classes plug in
   here, before any adapter formats anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Annotated, Final

import msgspec

from energybus.errors import CommandError, FilterError, UnitError
from energybus.filters import matches, validate_filter
from energybus.messages import check_delivery
from energybus.metrics import metric_info
from energybus.payloads import Scalar, SetEnvelope, decode_set
from energybus.topics import Topic, parse_topic
from energybus.units import CANONICAL_UNITS, SOURCE_UNITS

__all__ = ["Admitted", "CommandPolicy", "Gate", "Interlock", "SeriesPolicy"]

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
_CACHE: Final = 4096


class CommandPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How old (or how far ahead) a timed ``set`` may be."""

    max_age_s: NonNegative = 30.0
    """How old a timed (Profile B) ``set`` may be when it arrives: older ones are stale."""
    max_future_s: NonNegative = 5.0
    """How far ahead of the receive time a ``set`` may be stamped: allowed clock skew."""


class SeriesPolicy(CommandPolicy, frozen=True, kw_only=True):
    """A :class:`CommandPolicy` for the ``set`` topics ``filter`` matches (first match wins)."""

    filter: str
    """A canonical topic filter of ``set`` topics (``+/energy/load/+/shed_power/set``)."""


class Interlock(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds no command may cross on the ``set`` topics ``filter`` matches, in the
    series' canonical unit. ``why`` is told to whoever is refused."""

    filter: str
    """A canonical topic filter of the ``set`` topics it guards."""
    min: float | None = None
    """The lowest value a command may set; none: no lower bound."""
    max: float | None = None
    """The highest value a command may set; none: no upper bound."""
    why: str = ""
    """The reason given with a refusal (a PCS rating, a contract)."""


class Admitted(msgspec.Struct, frozen=True, gc=False):
    """A ``set`` the gate let through: its topic, value and (Profile B) envelope."""

    topic: Topic
    value: Scalar
    envelope: SetEnvelope | None


class _Rules:
    __slots__ = ("interlocks", "max_age", "max_future")

    def __init__(self, policy: CommandPolicy, interlocks: list[Interlock]) -> None:
        self.max_age = timedelta(seconds=policy.max_age_s)
        self.max_future = timedelta(seconds=policy.max_future_s)
        self.interlocks = interlocks


class Gate:
    """The gate for one adapter's commands, built once from its configuration."""

    def __init__(
        self,
        *,
        policy: CommandPolicy | None = None,
        series: Sequence[SeriesPolicy] = (),
        interlocks: Sequence[Interlock] = (),
    ) -> None:
        for pattern in [s.filter for s in series] + [lock.filter for lock in interlocks]:
            problem = validate_filter(pattern)
            if problem is not None:
                raise FilterError(problem.code, problem.message, filter=pattern)
        for lock in interlocks:
            low = -math.inf if lock.min is None else lock.min
            high = math.inf if lock.max is None else lock.max
            if not low <= high:
                raise FilterError(
                    "out_of_range", "an interlock's min is above its max", filter=lock.filter
                )
        self.policy = policy if policy is not None else CommandPolicy()
        self.series = list(series)
        self.interlocks = list(interlocks)
        self._rules: dict[str, _Rules] = {}

    def _for(self, topic: str) -> _Rules:
        """The rules for one topic, worked out once (filters are matched on first use)."""
        rules = self._rules.get(topic)
        if rules is None:
            policy = next((s for s in self.series if matches(s.filter, topic)), self.policy)
            locks = [lock for lock in self.interlocks if matches(lock.filter, topic)]
            rules = _Rules(policy, locks)
            if len(self._rules) >= _CACHE:
                self._rules.clear()
            self._rules[topic] = rules
        return rules

    def admit(self, topic: str, payload: bytes, *, retain: bool, received_at: datetime) -> Admitted:
        """The command, admitted; raises the first refusal (an :class:`EnergyBusError`)."""
        check_delivery(topic, retain=retain)
        parsed = parse_topic(topic)
        if parsed.stream != "set":
            raise CommandError("not_commandable", "only set topics carry commands", topic=topic)
        request = decode_set(payload)
        envelope: SetEnvelope | None = None
        if isinstance(request, SetEnvelope):
            envelope, value = request, request.value
        else:
            value = request
        rules = self._for(topic)
        if envelope is not None:
            if envelope.unit is not None:
                _check_unit(envelope.unit, parsed.metric)
            observed = envelope.observed_at
            if observed is not None:
                age = received_at - observed
                if age > rules.max_age:
                    raise CommandError(
                        "stale_command",
                        f"observed_at is {age.total_seconds():.0f} s old; commands older than "
                        f"{rules.max_age.total_seconds():g} s are refused",
                        topic=topic,
                    )
                if -age > rules.max_future:
                    raise CommandError(
                        "stale_command",
                        f"observed_at is {-age.total_seconds():.0f} s in the future; more than "
                        f"{rules.max_future.total_seconds():g} s of clock skew is refused",
                        topic=topic,
                    )
        for lock in rules.interlocks:
            if type(value) is bool:
                raise CommandError("interlock", "an interlocked series takes numbers", topic=topic)
            if (lock.min is not None and value < lock.min) or (
                lock.max is not None and value > lock.max
            ):
                bounds = f"[{_show(lock.min)}, {_show(lock.max)}]"
                why = f": {lock.why}" if lock.why else ""
                raise CommandError(
                    "interlock", f"the value is outside the interlock {bounds}{why}", topic=topic
                )
        return Admitted(parsed, value, envelope)


def _show(bound: float | None) -> str:
    return "-" if bound is None else f"{bound:g}"


def _check_unit(unit: str, metric: str) -> None:
    if unit not in CANONICAL_UNITS:
        if unit in SOURCE_UNITS:
            raise UnitError(
                "unit_mismatch",
                f"the bus carries SI units: send {SOURCE_UNITS[unit][0]}, not {unit}",
                unit=unit,
            )
        raise UnitError("unknown_unit", f"unknown unit {unit!r}", unit=unit)
    info = metric_info(metric)
    if info is not None and info.unit != unit:
        raise UnitError(
            "unit_mismatch",
            f"{metric} is set in {info.unit or 'no unit'}, not {unit}",
            unit=unit,
        )
