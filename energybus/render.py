"""Turning samples into wire messages: ``value``, retained ``last``, retained ``meta``.

The :class:`Renderer` keeps one small record per series with its topics built once, the
last value it emitted and its meta bytes, so the per-sample work is a dict lookup, a
comparison and at most two encodes.

Dedupe with heartbeat: a ``value`` equal to the last one emitted (within ``deadband``)
is suppressed, but never for longer than ``max_interval_s`` of observation time; that
interval is announced in ``meta``, so a consumer that sees nothing for longer knows the
source is dead rather than unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import msgspec

from energybus.errors import EnergyBusError, PayloadError
from energybus.messages import DELIVERY, Message
from energybus.metrics import metric_class
from energybus.payloads import (
    QUALITIES,
    HistorianMeta,
    HistorianMode,
    Meta,
    Quality,
    Scalar,
    encode,
    encode_scalar,
)
from energybus.samples import Reading, Sample, SeriesKey, utc
from energybus.topics import build_topic

__all__ = ["DEFAULT_SPEC", "Renderer", "SeriesSpec"]


class SeriesSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one series is published; adapters compile one per mapping row.

    ``max_interval_s=None`` turns the heartbeat off (an unchanged value is then never
    repeated); ``dedupe=False`` publishes every sample. ``last_min_interval_s`` thins
    the retained ``last`` (0: every sample, as the contract says).
    """

    profile: Literal["A", "B"] = "A"
    dedupe: bool = True
    deadband: float = 0.0
    max_interval_s: float | None = 60.0
    last_min_interval_s: float = 0.0
    description: str | None = None
    precision: float | None = None
    historian_mode: HistorianMode = "sample"
    attributes: dict[str, str | int | float | bool] | None = None

    def __post_init__(self) -> None:
        if not (self.deadband >= 0 and math.isfinite(self.deadband)):
            raise ValueError(f"deadband must be a finite number >= 0, not {self.deadband!r}")
        if self.max_interval_s is not None and not self.max_interval_s > 0:
            raise ValueError(f"max_interval_s must be > 0, not {self.max_interval_s!r}")
        if not self.last_min_interval_s >= 0:
            raise ValueError(f"last_min_interval_s must be >= 0, not {self.last_min_interval_s!r}")


DEFAULT_SPEC: Final = SeriesSpec()

_VALUE_QOS, _VALUE_RETAIN = DELIVERY["value"]
_LAST_QOS, _LAST_RETAIN = DELIVERY["last"]
_META_QOS, _META_RETAIN = DELIVERY["meta"]
_NEVER: Final = datetime.min.replace(tzinfo=UTC)
_QUALITY_TAIL: Final = {q: b',"quality":"' + q.encode() + b'"}' for q in QUALITIES}
_encode: Final = msgspec.json.Encoder().encode
_MAX_DOUBLE: Final = 1.7976931348623157e308
_BEYOND_DOUBLE: Final = "value is out of the range of a finite number"
_NO_VALUE: Final = "a value may be missing only with quality bad"


class _Series:
    """Per-series state; plain slots because it is touched on every sample."""

    __slots__ = (
        "deadband",
        "emitted_at",
        "emitted_quality",
        "emitted_value",
        "last_at",
        "last_min_interval",
        "last_topic",
        "max_interval",
        "meta",
        "meta_topic",
        "middle",
        "profile_b",
        "spec",
        "unit",
        "value_topic",
    )

    def __init__(self, key: SeriesKey) -> None:
        site, entity_type, entity_id, metric = key
        self.value_topic = build_topic(site, entity_type, entity_id, metric, "value")
        self.last_topic = build_topic(site, entity_type, entity_id, metric, "last")
        self.meta_topic = build_topic(site, entity_type, entity_id, metric, "meta")
        # The longest stream name: a series whose availability topic cannot exist is
        # refused here, before anything of it is published.
        build_topic(site, entity_type, entity_id, metric, "availability")
        self.spec: SeriesSpec | None = None
        self.unit: str | None = None
        self.profile_b = False
        self.deadband: float | None = None
        """``None`` when dedupe is off for the series."""
        self.middle = b""
        """The envelope between value and time: ``,"unit":"W","observed_at":``."""
        self.meta: bytes = b""
        self.emitted_value: Scalar | None = None
        self.emitted_quality: str = ""
        self.emitted_at = _NEVER
        self.last_at = _NEVER
        # The spec's intervals as timedeltas: datetime arithmetic is several times
        # cheaper per sample than datetime.timestamp().
        self.max_interval: timedelta | None = None
        self.last_min_interval = timedelta(0)


def _at(values: Sequence[object], entry: object) -> int:
    """The index of ``entry`` in ``values``, by identity (a refused value's place)."""
    return next(i for i, item in enumerate(values) if item is entry)


class Renderer:
    """Renders samples to messages, remembering per series what it already said.

    One renderer serves one publisher (one worker, one CLI stream): dedupe state is
    local to it by design. ``specs`` gives per-metric settings; a spec passed to
    :meth:`render` wins over both it and ``default``.
    """

    def __init__(
        self,
        *,
        source: str | None = None,
        default: SeriesSpec = DEFAULT_SPEC,
        specs: dict[str, SeriesSpec] | None = None,
        admit: Callable[[SeriesKey], None] | None = None,
    ) -> None:
        self.source = source
        self.default = default
        self.specs = dict(specs or {})
        self.admit = admit
        """Asked once for each series this renderer has no record of, before it keeps
        anything of it; raises :class:`EnergyBusError` to refuse the sample (the
        worker's bound on series per site). Not asked again once it admitted one."""
        self.suppressed = 0
        """How many ``value`` messages dedupe has held back; the worker exports it."""
        self._series: dict[SeriesKey, _Series] = {}
        self.last_floors: dict[SeriesKey, datetime] = {}
        """The observation time each series' retained ``last`` already has on the bus,
        for series this renderer has not seen yet (a worker reads them at start-up): a
        series seen for the first time starts from its floor, so a sample older than what
        an earlier run published (one the broker gives again after a crash) does not
        replace it. Consulted once per series, when it is first seen."""
        # The samples of one source message share one observation time object, so its
        # encoding is kept for the next sample (an identity test, cheaper than encoding).
        self._time: datetime | None = None
        self._time_json = b""

    def render(self, sample: Sample, spec: SeriesSpec | None = None) -> list[Message]:
        """The messages ``sample`` calls for, in publish order (meta first)."""
        out: list[Message] = []
        self.render_into(sample, out, spec)
        return out

    def render_into(
        self, sample: Sample, out: list[Message], spec: SeriesSpec | None = None
    ) -> None:
        """Append the messages for ``sample`` to ``out``; raises on a sample the bus
        cannot carry, having changed nothing."""
        if spec is None:
            spec = self.specs.get(sample.metric, self.default) if self.specs else self.default
        refused = self._render(
            sample.site,
            sample.entity_type,
            sample.entity_id,
            sample.observed_at,
            sample.quality,
            ((sample.metric, sample.value, sample.unit, spec),),
            out,
        )
        if refused:
            raise refused[0][1]

    def render_reading(
        self, reading: Reading, out: list[Message]
    ) -> list[tuple[int, EnergyBusError]] | None:
        """Append the messages for every value of ``reading`` to ``out``.

        A value the bus cannot carry (NaN, a bad quality) is refused before it touches
        any state or output; the refusals come back as ``(index, error)``, the other
        values are rendered.
        """
        return self._render(
            reading.site,
            reading.entity_type,
            reading.entity_id,
            reading.observed_at,
            reading.quality,
            reading.values,
            out,
        )

    def _render(
        self,
        site: str,
        entity_type: str,
        entity_id: str,
        observed: datetime,
        quality: Quality,
        values: Sequence[tuple[str, Scalar | None, str | None, SeriesSpec]],
        out: list[Message],
    ) -> list[tuple[int, EnergyBusError]] | None:
        refused: list[tuple[int, EnergyBusError]] | None = None
        tail = _QUALITY_TAIL.get(quality)
        if tail is None:
            error = PayloadError("invalid_value", f"quality {quality!r} is not one of {QUALITIES}")
            return [(index, error) for index in range(len(values))]
        if observed.tzinfo is not UTC:
            try:
                observed = utc(observed)
            except PayloadError as error:
                return [(index, error) for index in range(len(values))]
        series_of = self._series
        # No enumerate: a value's index is wanted only when it is refused (_at).
        for entry in values:
            metric, value, unit, spec = entry
            if value is None:
                if quality == "bad":
                    # The source said it has no value (a register "not implemented"): a
                    # Profile B null with quality bad, never a number and never ``last``.
                    absent = self._absent(
                        site, entity_type, entity_id, observed, metric, unit, spec, out
                    )
                    if absent is not None:
                        refused = refused or []
                        refused.append((_at(values, entry), absent))
                else:
                    refused = refused or []
                    refused.append((_at(values, entry), PayloadError("wrong_type", _NO_VALUE)))
                continue
            kind = type(value)
            scalar = _encode(value) if kind is float or kind is int or kind is bool else b"null"
            if scalar == b"null":
                try:
                    encode_scalar(value)  # raises the error that says why
                except EnergyBusError as error:
                    refused = refused or []
                    refused.append((_at(values, entry), error))
                    continue
            if kind is int and not -_MAX_DOUBLE <= value <= _MAX_DOUBLE:
                refused = refused or []
                refused.append((_at(values, entry), PayloadError("non_finite", _BEYOND_DOUBLE)))
                continue
            key = (site, entity_type, entity_id, metric)
            series = series_of.get(key)
            if series is None:
                try:
                    series = self._new_series(key)
                except EnergyBusError as error:  # ids too long or malformed for a topic
                    refused = refused or []
                    refused.append((_at(values, entry), error))
                    continue
            if series.spec is not spec:
                # An equal spec from another object (a second device reporting the same
                # entity) changes nothing: only a different one reconfigures the series.
                if series.spec != spec or series.unit != unit:
                    self._configure(series, key, unit, spec, out)
                else:
                    series.spec = spec
            elif series.unit != unit:
                self._configure(series, key, unit, spec, out)

            emit = True
            deadband = series.deadband
            if deadband is not None:
                # Ordered so that a changed value (the common case) fails on the first test.
                previous = series.emitted_value
                if (
                    (
                        value == previous
                        if not deadband or kind is bool
                        else type(previous) is kind and abs(value - previous) <= deadband
                    )
                    and type(previous) is kind
                    and series.emitted_quality == quality
                ):
                    interval = series.max_interval
                    emit = interval is not None and observed - series.emitted_at >= interval
            # ``last`` only moves forward in observation time: it is the latest known sample.
            last = observed >= series.last_at and (
                emit or observed - series.last_at >= series.last_min_interval
            )
            if last or (emit and series.profile_b):
                # Byte for byte what encoding an Envelope gives (a test holds it to that),
                # assembled from parts fixed per series rather than a Struct built per sample.
                if observed is not self._time:
                    self._time = observed
                    self._time_json = _encode(observed)
                envelope = b"".join((b'{"value":', scalar, series.middle, self._time_json, tail))
            if emit:
                series.emitted_value = value
                series.emitted_quality = quality
                series.emitted_at = observed
                payload = envelope if series.profile_b else scalar
                out.append(Message(series.value_topic, payload, _VALUE_QOS, _VALUE_RETAIN))
            else:
                self.suppressed += 1
            if last:
                series.last_at = observed
                out.append(Message(series.last_topic, envelope, _LAST_QOS, _LAST_RETAIN))
        return refused

    def _absent(
        self,
        site: str,
        entity_type: str,
        entity_id: str,
        observed: datetime,
        metric: str,
        unit: str | None,
        spec: SeriesSpec,
        out: list[Message],
    ) -> EnergyBusError | None:
        """Render a "no value" sample; the error when the series is refused (its topic
        cannot be built, or it is past the worker's bound)."""
        key = (site, entity_type, entity_id, metric)
        series = self._series.get(key)
        if series is None:
            try:
                series = self._new_series(key)
            except EnergyBusError as error:
                return error
        if series.spec != spec or series.unit != unit:
            self._configure(series, key, unit, spec, out)
        if series.emitted_value is None and series.emitted_quality == "bad":
            interval = series.max_interval
            if interval is None or observed - series.emitted_at < interval:
                self.suppressed += 1
                return None
        series.emitted_value = None
        series.emitted_quality = "bad"
        series.emitted_at = observed
        payload = b"".join(
            (b'{"value":null', series.middle, _encode(utc(observed)), _QUALITY_TAIL["bad"])
        )
        out.append(Message(series.value_topic, payload, _VALUE_QOS, _VALUE_RETAIN))
        return None

    def meta(self, sample: Sample, spec: SeriesSpec | None = None) -> Meta:
        """The ``meta`` document for the sample's series under ``spec``."""
        if spec is None:
            spec = self.specs.get(sample.metric, self.default)
        return self._meta(sample.metric, sample.unit, spec)

    def _meta(self, metric: str, unit: str | None, spec: SeriesSpec) -> Meta:
        return Meta(
            unit=unit,
            description=spec.description,
            source=self.source,
            precision=spec.precision,
            historian=HistorianMeta(mode=spec.historian_mode),
            metric_class=metric_class(metric),
            max_interval_s=spec.max_interval_s if spec.dedupe else None,
            deadband=spec.deadband if spec.dedupe and spec.deadband else None,
            attributes=spec.attributes,
        )

    def _new_series(self, key: SeriesKey) -> _Series:
        # Topics first: a series whose ids cannot make a topic takes no place in the
        # bound that ``admit`` keeps.
        series = _Series(key)
        if self.admit is not None:
            self.admit(key)
        self._series[key] = series
        if self.last_floors:
            floor = self.last_floors.pop(key, None)
            if floor is not None:
                series.last_at = floor
        return series

    def forget(self, key: SeriesKey | None = None) -> None:
        """Drop what was said for one series (or all), so the next sample repeats everything.

        The worker calls this after a reconnect with a clean session, when retained
        ``meta`` may be all a new subscriber lacks.
        """
        if key is None:
            self._series.clear()
        else:
            self._series.pop(key, None)

    def _configure(
        self,
        series: _Series,
        key: SeriesKey,
        unit: str | None,
        spec: SeriesSpec,
        out: list[Message],
    ) -> None:
        """Fix what the per-sample path reads from ``spec`` and the unit; send meta if new."""
        series.spec = spec
        series.unit = unit
        series.profile_b = spec.profile == "B"
        series.deadband = spec.deadband if spec.dedupe else None
        interval = spec.max_interval_s
        series.max_interval = None if interval is None else timedelta(seconds=interval)
        series.last_min_interval = timedelta(seconds=spec.last_min_interval_s)
        unit_json = b"" if unit is None else b',"unit":' + _encode(unit)
        series.middle = unit_json + b',"observed_at":'
        payload = encode(self._meta(key[3], unit, spec))
        if payload != series.meta:
            series.meta = payload
            out.append(Message(series.meta_topic, payload, _META_QOS, _META_RETAIN))
