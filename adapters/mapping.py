"""Mapping files as data: the schemas every mapping shares, and their compiler.

A mapping file describes a source platform as data: per source field its entity,
metric, unit, scale and named transforms (``lookup``, ``enum``, ``bits``, ``range``),
static fields that go to ``meta``, and fields ignored on purpose with the reason. The
file is read with :mod:`energybus.documents` (strict, errors name file and line); the
:class:`Compiler` then checks each row against the contract (metric names, units of the
vocabulary, id templates) and hands it to :mod:`.engine`, which turns it into the plain
tuples the per-message path reads.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec

from energybus.admission import Interlock, SeriesPolicy
from energybus.documents import Located
from energybus.errors import MappingError, TopicError, UnitError
from energybus.metrics import MetricInfo, metric_info
from energybus.payloads import HistorianMode
from energybus.render import SeriesSpec
from energybus.topics import EntityType, build_topic
from energybus.units import PLAUSIBLE, Conversion

__all__ = [
    "AttributeRow",
    "BitRow",
    "CommandOptions",
    "Compiler",
    "Document",
    "EntityGroup",
    "MappingDocument",
    "NonNegative",
    "Positive",
    "SeriesRow",
    "SeriesSettings",
    "SourceOptions",
    "ValueType",
]

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
ValueType = Literal["number", "boolean"]


class Document(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every mapping and options schema: immutable, unknown keys are errors."""


class SeriesSettings(Document, frozen=True, kw_only=True):
    """How a series is published; unset (``None``) means inherit from ``[defaults]``.

    TOML has no null, so ``max_interval_s = 0`` is how a file turns the heartbeat off.
    """

    profile: Literal["A", "B"] | None = None
    dedupe: bool | None = None
    deadband: NonNegative | None = None
    max_interval_s: NonNegative | None = None
    last_min_interval_s: NonNegative | None = None
    historian_mode: HistorianMode | None = None


class BitRow(SeriesSettings, frozen=True, kw_only=True):
    """One bit of a bitmask field, published as a boolean metric."""

    metric: str
    description: str | None = None


class SeriesRow(SeriesSettings, frozen=True, kw_only=True):
    """One source field becoming one canonical metric (or, with ``bits``, several).

    The transforms, applied in this order: ``lookup`` (a source code or word to a
    number or boolean) or ``enum`` (a numeric state code, published as is, its names
    in ``meta``); then ``unit`` and ``scale``; then ``range``, the plausible values in
    the canonical unit (default: :data:`energybus.units.PLAUSIBLE` for the unit).
    ``bits`` instead reads the field as a bitmask, one boolean metric per bit number.
    """

    metric: str | None = None
    unit: str | None = None
    scale: float = 1.0
    type: ValueType | None = None
    description: str | None = None
    precision: Positive | None = None
    range: tuple[float, float] | None = None
    lookup: dict[str, int | float | bool] | None = None
    enum: dict[str, str] | None = None
    bits: dict[str, BitRow] | None = None


class AttributeRow(Document, frozen=True, kw_only=True):
    """One static source field becoming a ``meta.attributes`` entry."""

    attribute: str
    unit: str | None = None
    scale: float = 1.0


class EntityGroup(Document, frozen=True, kw_only=True):
    """The values of one JSON object that describe one entity.

    Without ``each`` the object is the message itself; with it, every item of that
    array is one entity, named by the item's ``key`` field. ``id`` is a template over
    the placeholders the adapter documents (``{id}`` is the kebab-case item key).
    """

    type: EntityType
    id: str
    each: str | None = None
    key: str | None = None
    fields: dict[str, SeriesRow] = {}
    meta: dict[str, AttributeRow] = {}
    ignore: dict[str, str] = {}


class SourceOptions(Document, frozen=True, kw_only=True):
    """The input limits in the options of every adapter (docs/worker.md, "Input limits"):
    a message past one is refused before anything decodes it, by the worker and
    ``energybus normalize`` alike (:class:`~energybus.adapters.Pipeline`)."""

    max_payload_bytes: Annotated[int, msgspec.Meta(ge=1)] = 262_144
    """The largest source message (or canonical ``set``) taken, in bytes; a larger one
    is refused as ``too_large`` and dead-lettered with its size, without its body."""
    max_depth: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32
    """The deepest nesting of JSON arrays and objects taken in a source message; a
    deeper one is refused as ``too_deep`` (Modbus polls are not JSON: not checked)."""


class CommandOptions(SourceOptions, frozen=True, kw_only=True):
    """The admission gate's settings, in the options of every adapter that takes commands
    (docs/commands.md): how old a timed ``set`` may be, per adapter and per series, and
    the interlocks no command may cross."""

    command_max_age_s: NonNegative = 30.0
    """How old a timed (Profile B) ``set`` may be when it arrives: older ones are stale."""
    command_max_future_s: NonNegative = 5.0
    """How far ahead of the receive time a ``set`` may be stamped: allowed clock skew."""
    command_series: list[SeriesPolicy] = []
    """Other ages for the ``set`` topics a filter matches (first match wins)."""
    interlocks: list[Interlock] = []
    """Bounds no command may cross, in the canonical unit, each a ``[[...interlocks]]``
    table."""


class MappingDocument(Document, frozen=True, kw_only=True):
    """What every mapping file has: the adapter it is for and the series defaults."""

    adapter: str
    description: str = ""
    defaults: SeriesSettings = SeriesSettings()


class Checked:
    """A row checked against the contract: what the engine needs to compile it."""

    __slots__ = ("conversion", "hi", "lo", "metric", "spec", "value_type")

    def __init__(
        self,
        metric: str,
        value_type: ValueType,
        conversion: Conversion | None,
        spec: SeriesSpec,
        lo: float,
        hi: float,
    ) -> None:
        self.metric = metric
        self.value_type = value_type
        self.conversion = conversion
        """``None`` for booleans; otherwise the conversion (``unit`` is the canonical one)."""
        self.spec = spec
        self.lo = lo
        self.hi = hi


class Compiler:
    """Checks mapping rows against the contract, pointing every fault at its line."""

    def __init__(self, where: Located, defaults: SeriesSettings) -> None:
        self.where = where
        self.defaults = defaults

    def error(self, code: str, message: str, path: str) -> MappingError:
        return self.where.error(code, message, path)

    def metric(self, metric: str, path: str) -> MetricInfo | None:
        try:
            build_topic("site", "load", "entity", metric)
        except TopicError as exc:
            raise self.error(exc.code, exc.message, f"{path}.metric") from None
        return metric_info(metric)

    def check(
        self,
        row: SeriesRow | BitRow,
        path: str,
        *,
        value_type: ValueType | None = None,
        unit: str | None = None,
        scale: float = 1.0,
        dedupe: bool | None = None,
    ) -> Checked:
        """Check one output of a row: its metric, type, unit and publishing settings.

        ``value_type`` is forced by the transform (``bits`` and boolean lookups give
        booleans); ``unit`` and ``scale`` are the source's.
        """
        info = self.metric(row.metric or "", path)
        declared = getattr(row, "type", None)
        kind: ValueType = value_type or declared or (info.value_type if info else "number")
        if value_type is not None and declared not in (None, value_type):
            raise self.error("wrong_type", f"this row is always a {value_type}", f"{path}.type")
        conversion: Conversion | None = None
        lo, hi = -float("inf"), float("inf")
        if kind == "boolean":
            if unit is not None or scale != 1.0:
                raise self.error(
                    "unit_on_boolean", f"boolean metric {row.metric!r} takes no unit or scale", path
                )
        else:
            conversion = self._conversion(unit, scale, path)
            lo, hi = PLAUSIBLE.get(conversion.unit or "", (lo, hi))
        if info is not None and info.value_type != kind:
            raise self.error(
                "wrong_type", f"metric {row.metric!r} is a {info.value_type}, not a {kind}", path
            )
        canonical = conversion.unit if conversion is not None else None
        if info is not None and kind == "number" and info.unit != canonical:
            raise self.error(
                "unit_mismatch",
                f"metric {row.metric!r} is published in {info.unit or 'no unit'}, "
                f"but unit {unit!r} converts to {canonical or 'no unit'}",
                f"{path}.unit",
            )
        bounds = getattr(row, "range", None)
        if bounds is not None:
            if kind == "boolean":
                raise self.error("unit_on_boolean", "a boolean metric takes no range", path)
            if not bounds[0] <= bounds[1]:
                raise self.error("out_of_range", "range is [min, max] with min <= max", path)
            lo, hi = bounds

        defaults = self.defaults

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(row, name)
            if value is None:
                value = getattr(defaults, name)
            return fallback if value is None else value

        interval = pick("max_interval_s", 60.0)
        spec = SeriesSpec(
            profile=pick("profile", "A"),
            dedupe=pick("dedupe", True) if dedupe is None else dedupe,
            deadband=pick("deadband", 0.0),
            max_interval_s=interval or None,
            last_min_interval_s=pick("last_min_interval_s", 0.0),
            description=row.description or (info.description if info else None),
            precision=getattr(row, "precision", None),
            historian_mode=pick("historian_mode", "sample"),
        )
        return Checked(row.metric or "", kind, conversion, spec, lo, hi)

    def attribute(self, row: AttributeRow, path: str) -> Conversion | None:
        """Check a static field; its conversion, or ``None`` when it passes unchanged."""
        if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", row.attribute):
            raise self.error(
                "not_snake_case", f"attribute {row.attribute!r} must be snake_case", path
            )
        if row.unit is None and row.scale == 1.0:
            return None
        return self._conversion(row.unit, row.scale, path)

    def template(self, template: str, placeholders: Iterable[str], path: str) -> str:
        """Check an id template: known placeholders only, kebab-case once filled in."""
        allowed = set(placeholders)
        try:
            names = [
                name for _, name, _, _ in string.Formatter().parse(template) if name is not None
            ]
        except ValueError as exc:
            raise self.error("bad_template", f"id template {template!r}: {exc}", path) from None
        unknown = sorted(set(names) - allowed)
        if unknown or any(not name for name in names):
            known = ", ".join("{" + name + "}" for name in sorted(allowed)) or "none"
            raise self.error(
                "bad_template",
                f"id template {template!r} uses {unknown or ['{}']}; known placeholders: {known}",
                path,
            )
        sample = template.format(**dict.fromkeys(allowed, "x1"))
        try:
            build_topic("site", "load", sample, "metric")
        except TopicError as exc:
            raise self.error(
                "bad_template", f"id template {template!r} gives {sample!r}: {exc.message}", path
            ) from None
        return template

    def _conversion(self, unit: str | None, scale: float, path: str) -> Conversion:
        try:
            return Conversion(unit, scale)
        except UnitError as exc:
            raise self.error(exc.code, exc.message, f"{path}.unit") from None
