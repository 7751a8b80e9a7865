"""Safety interlocks and control priority: what every command to a device must pass.

Two rules, both pure and both checked in one place, after the admission gate and before
anything is encoded for a device (the Modbus adapter's ``format`` calls :meth:`Safety.check`
for every ``set``, whoever sent it):

- **Interlocks** (:class:`Limits`): hard bounds on a setpoint, from the device's register
  map and from the site configuration (the stricter of both wins): ``min``/``max`` in the
  metric's canonical unit (W for power, A for current), no discharge at or below a
  state-of-charge floor, no charge at or above a ceiling, a maximum rate of change, and
  temperature bounds read from the device. A rule that needs the device's state refuses
  any non-zero setpoint while that state is unknown or stale: the safe answer to "is the
  battery hot?" when nobody knows is "do not push it". Zero ("stop") passes every
  state-dependent rule and the rate limit; it still has to lie within ``min``/``max``.
- **Priority** (:class:`Arbiter`): a command carries a class, ``safety`` > ``manual`` >
  ``scheduled`` > ``optimization``, and holds its setpoint for its ``duration_s`` (or a
  default hold). While it holds, a command of a lower class is refused; the same or a
  higher class replaces it.

A refusal is a :class:`~energybus.errors.CommandError` with code ``interlock`` or
``priority`` and a reason for people; nothing is written.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Annotated, Any, Final, Literal, NamedTuple

import msgspec

from energybus.errors import CommandError

__all__ = [
    "PRIORITIES",
    "Arbiter",
    "DeviceState",
    "Limits",
    "Priority",
    "Safety",
    "check_limits",
]

Priority = Literal["safety", "manual", "scheduled", "optimization"]
PRIORITIES: Final[tuple[Priority, ...]] = ("safety", "manual", "scheduled", "optimization")
"""Highest first: a command may replace a held one of its own class or a lower one."""
_RANK: Final = {name: rank for rank, name in enumerate(PRIORITIES)}

NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Interlocks of one writable metric, in its canonical unit; ``None`` is no bound.

    The setpoint's sign says charge or discharge: with ``discharge_positive`` (the
    default, as the bus's ``active_power`` of a battery) a positive value discharges.
    """

    min: float | None = None
    """The lowest setpoint; none: no lower bound."""
    max: float | None = None
    """The highest setpoint; none: no upper bound."""
    max_rate_per_s: NonNegative | None = None
    """The largest change of the setpoint per second since the last accepted one."""
    soc_floor: float | None = None
    """Percent: no discharge while the device's ``soc`` is at or below it."""
    soc_ceiling: float | None = None
    """Percent: no charge while the device's ``soc`` is at or above it."""
    temperature_min: float | None = None
    """degC: no non-zero setpoint while the device's ``temperature`` is below it."""
    temperature_max: float | None = None
    """degC: no non-zero setpoint while the device's ``temperature`` is above it."""
    discharge_positive: bool = True
    """A positive setpoint discharges; ``false`` for a device whose positive value
    charges."""

    def __post_init__(self) -> None:
        for low, high, what in (
            (self.min, self.max, "min is above max"),
            (self.soc_floor, self.soc_ceiling, "soc_floor is above soc_ceiling"),
            (self.temperature_min, self.temperature_max, "temperature_min is above its max"),
        ):
            if low is not None and high is not None and low > high:
                raise ValueError(what)
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if type(value) is float and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number")

    def tighten(self, other: Limits) -> Limits:
        """The stricter of ``self`` and ``other``, bound by bound (the map's ratings and
        the site's own limits both hold)."""
        if other.discharge_positive != self.discharge_positive:
            raise ValueError("the two limits disagree on the sign of discharge")

        def low(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else max(a, b)

        def high(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else min(a, b)

        return Limits(
            min=low(self.min, other.min),
            max=high(self.max, other.max),
            max_rate_per_s=high(self.max_rate_per_s, other.max_rate_per_s),
            soc_floor=low(self.soc_floor, other.soc_floor),
            soc_ceiling=high(self.soc_ceiling, other.soc_ceiling),
            temperature_min=low(self.temperature_min, other.temperature_min),
            temperature_max=high(self.temperature_max, other.temperature_max),
            discharge_positive=self.discharge_positive,
        )

    @property
    def needs_soc(self) -> bool:
        return self.soc_floor is not None or self.soc_ceiling is not None

    @property
    def needs_temperature(self) -> bool:
        return self.temperature_min is not None or self.temperature_max is not None


class DeviceState(NamedTuple):
    """What the interlocks know of a device: its latest readings (``None``: unknown or
    stale) and the last accepted setpoint with its time."""

    soc: float | None = None
    temperature: float | None = None
    setpoint: float | None = None
    setpoint_at: datetime | None = None


def check_limits(
    value: float | bool, limits: Limits, state: DeviceState, now: datetime
) -> str | None:
    """Why ``value`` may not be written under ``limits`` in ``state``; ``None`` if it may."""
    if type(value) is bool:
        return "an interlocked setpoint takes a number"
    if not math.isfinite(value):
        return "the setpoint is not a finite number"
    if limits.min is not None and value < limits.min:
        return f"below the minimum {limits.min:g}"
    if limits.max is not None and value > limits.max:
        return f"above the maximum {limits.max:g}"
    if value == 0:
        return None  # stopping is always allowed by the state and rate rules
    discharging = (value > 0) == limits.discharge_positive
    if limits.needs_soc:
        soc = state.soc
        if soc is None:
            return "the state of charge is unknown or stale"
        if discharging and limits.soc_floor is not None and soc <= limits.soc_floor:
            return f"state of charge {soc:g} % is at or below the floor {limits.soc_floor:g} %"
        if not discharging and limits.soc_ceiling is not None and soc >= limits.soc_ceiling:
            return f"state of charge {soc:g} % is at or above the ceiling {limits.soc_ceiling:g} %"
    if limits.needs_temperature:
        temperature = state.temperature
        if temperature is None:
            return "the device temperature is unknown or stale"
        if limits.temperature_min is not None and temperature < limits.temperature_min:
            return f"temperature {temperature:g} degC is below {limits.temperature_min:g} degC"
        if limits.temperature_max is not None and temperature > limits.temperature_max:
            return f"temperature {temperature:g} degC is above {limits.temperature_max:g} degC"
    rate = limits.max_rate_per_s
    if rate is not None:
        if state.setpoint is None or state.setpoint_at is None:
            return "the current setpoint is unknown, so the rate of change cannot be bounded"
        seconds = max((now - state.setpoint_at).total_seconds(), 0.0)
        step = abs(value - state.setpoint)
        if step > rate * seconds:
            return (
                f"a change of {step:g} in {seconds:.1f} s exceeds the maximum rate"
                f" {rate:g} per second"
            )
    return None


class _Hold:
    """One accepted command's hold on a setpoint. ``before`` is the hold it replaced,
    back in force if this command does not happen; once this one's outcome is known
    (it is on the device, or may be), nothing comes back and ``before`` is dropped."""

    __slots__ = ("before", "command_id", "rank", "until")

    def __init__(self, rank: int, until: datetime, command_id: str, before: _Hold | None) -> None:
        self.rank = rank
        self.until = until
        self.command_id = command_id
        self.before = before


class Arbiter:
    """Which priority class holds each setpoint, and until when."""

    def __init__(self) -> None:
        self._holds: dict[object, _Hold] = {}

    def holder(self, key: object, now: datetime) -> tuple[Priority, datetime] | None:
        hold = self._holds.get(key)
        if hold is None or now >= hold.until:
            return None
        return PRIORITIES[hold.rank], hold.until

    def check(self, key: object, priority: Priority, now: datetime) -> str | None:
        """Why a command of class ``priority`` may not replace the held one."""
        held = self.holder(key, now)
        if held is not None and _RANK[priority] > _RANK[held[0]]:
            return (
                f"a {held[0]} command holds this setpoint until {held[1].isoformat()};"
                f" one of class {priority} cannot override it"
            )
        return None

    def hold(
        self, key: object, priority: Priority, now: datetime, hold_s: float, command_id: str
    ) -> None:
        until = now + timedelta(seconds=hold_s)
        # Holds that have ended can never come back: the chain keeps only live ones, so
        # it is never longer than the holds running at once.
        head: _Hold | None = None
        tail: _Hold | None = None
        node = self._holds.get(key)
        while node is not None:
            following = node.before
            if now < node.until:
                if tail is None:
                    head = node
                else:
                    tail.before = node
                tail = node
            node = following
        if tail is not None:
            tail.before = None
        self._holds[key] = _Hold(_RANK[priority], until, command_id, head)

    def settle(self, key: object, command_id: str) -> None:
        """The command's outcome is known (or may have happened): its hold stays, and
        what it replaced will not come back."""
        hold = self._holds.get(key)
        while hold is not None:
            if hold.command_id == command_id:
                hold.before = None
                return
            hold = hold.before

    def release(self, key: object, command_id: str) -> None:
        """The command did not happen (refused by the device, never written): its hold
        goes, wherever it is in the chain, and the hold it replaced is in force again
        (until its own end), so a failed override frees nothing a higher class held."""
        hold = self._holds.get(key)
        if hold is None:
            return
        if hold.command_id == command_id:
            if hold.before is None:
                del self._holds[key]
            else:
                self._holds[key] = hold.before
            return
        while hold.before is not None:
            if hold.before.command_id == command_id:
                hold.before = hold.before.before
                return
            hold = hold.before


class Safety:
    """Interlocks and priority of one adapter's writable setpoints, keyed by the caller
    (a device and metric).

    The rate limit starts from the setpoint the device last reported (each poll of it),
    or from the last command accepted while one is in flight, whichever is newer; after
    ``state_max_age_s`` without either it is unknown. A command's outcome moves it on:
    on the device (:meth:`done`), not on it (:meth:`failed`: back to what was before), or
    unknown (:meth:`uncertain`: unknown until the next poll says).
    """

    def __init__(
        self, *, default_priority: Priority, hold_s: float, state_max_age_s: float = 60.0
    ) -> None:
        self.default_priority: Priority = default_priority
        self.hold_s = hold_s
        self.max_age = timedelta(seconds=state_max_age_s)
        self.arbiter = Arbiter()
        self._last: dict[object, tuple[float, datetime]] = {}
        self._tried: dict[str, tuple[tuple[float, datetime] | None, tuple[float, datetime]]] = {}
        """Per command in flight: the rate limit's start before it, and its own."""
        self._inflight: dict[object, int] = {}

    def state(
        self, key: object, *, soc: float | None, temperature: float | None, now: datetime
    ) -> DeviceState:
        last = self._last.get(key)
        if last is None or now - last[1] > self.max_age:
            return DeviceState(soc, temperature)
        return DeviceState(soc, temperature, last[0], last[1])

    def observe_setpoint(self, key: object, value: float, at: datetime) -> None:
        """The device reported its setpoint (a poll): the rate limit starts from it,
        unless a command to it is in flight (the poll may predate the write)."""
        if not self._inflight.get(key):
            last = self._last.get(key)
            if last is None or at >= last[1]:
                self._last[key] = (value, at)

    def forget_setpoint(self, key: object) -> None:
        """The device's setpoint is unknown (it did not answer, or not with a number)."""
        if not self._inflight.get(key):
            self._last.pop(key, None)

    def check(
        self,
        key: object,
        value: float | bool,
        limits: Limits,
        state: DeviceState,
        *,
        priority: Priority | None,
        duration_s: float | None,
        command_id: str,
        now: datetime,
        topic: str,
    ) -> Priority:
        """Admit one command or raise; on admission it holds the setpoint and becomes
        the rate limit's starting point. Returns the class it was admitted under."""
        chosen = priority or self.default_priority
        refused = self.arbiter.check(key, chosen, now)
        if refused is not None:
            raise CommandError("priority", refused, topic=topic)
        reason = check_limits(value, limits, state, now)
        if reason is not None:
            raise CommandError("interlock", f"interlock: {reason}", topic=topic)
        self.arbiter.hold(key, chosen, now, duration_s or self.hold_s, command_id)
        mine = (float(value), now)
        self._tried[command_id] = (self._last.get(key), mine)
        self._last[key] = mine
        self._inflight[key] = self._inflight.get(key, 0) + 1
        return chosen

    def _settled(self, key: object, command_id: str) -> tuple[Any, ...] | None:
        tried = self._tried.pop(command_id, None)
        if tried is not None:
            left = self._inflight.get(key, 1) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)
        return tried

    def done(self, key: object, command_id: str) -> None:
        """The command's value is on the device (read back): it stays the rate limit's
        start and its hold stays."""
        self._settled(key, command_id)
        self.arbiter.settle(key, command_id)

    def failed(self, key: object, command_id: str) -> None:
        """The command's value never reached the device: its hold goes, and the rate
        limit starts again from the setpoint before it."""
        self.arbiter.release(key, command_id)
        tried = self._settled(key, command_id)
        if tried is None or self._last.get(key) != tried[1]:
            return  # a later command moved the start already
        before = tried[0]
        if before is None:
            del self._last[key]
        else:
            self._last[key] = before

    def uncertain(self, key: object, command_id: str) -> None:
        """Whether the value reached the device is unknown (the write or its read-back
        went unanswered, or the command expired): its hold stays, as if it had, and the
        setpoint is unknown until the device reports it again, so a rate-limited
        command waits for that poll."""
        self.arbiter.settle(key, command_id)
        tried = self._settled(key, command_id)
        if tried is not None and self._last.get(key) == tried[1]:
            del self._last[key]
