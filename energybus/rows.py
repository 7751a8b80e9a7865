"""The historian mapping: which samples become which rows.

The rules are the contract's "Historian Relationship": ``value`` streams of measurement
metrics go to the measurement historian as ``(metric_name, device_id, value,
observed_at)`` with ``device_id = <entity_type>.<entity_id>``; ``*_total`` counters go to
the counter historian instead; ``last`` is never ingested (it repeats ``value``), nor
are ``meta``, ``availability`` or ``set``. Booleans are stored as 0 and 1, since the
historians hold numbers.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Final, TypeAlias

import msgspec

from energybus.errors import PayloadError
from energybus.metrics import metric_info
from energybus.samples import Reading, Sample, decode_sample
from energybus.topics import parse_topic
from energybus.units import PLAUSIBLE

__all__ = [
    "COUNTER_SUFFIX",
    "CounterRow",
    "MeasurementRow",
    "Row",
    "RowTuple",
    "append_rows",
    "device_id",
    "historian_row",
    "reading_rows",
    "to_row",
]

COUNTER_SUFFIX: Final = "_total"
"""Metrics ending so are counters, stored raw in the counter historian."""
RowTuple: TypeAlias = tuple[str, str, str, float, datetime, str]
"""A row as a plain tuple: (site, device_id, metric_name, value, observed_at, quality)."""


class _RowBase(msgspec.Struct, frozen=True, gc=False):
    site: str
    device_id: str
    metric_name: str
    value: float
    observed_at: datetime
    quality: str


class MeasurementRow(_RowBase, frozen=True, gc=False):
    """A row of the measurement historian."""


class CounterRow(_RowBase, frozen=True, gc=False):
    """A raw cumulative reading for the counter historian, which derives energy from deltas."""


Row = MeasurementRow | CounterRow


def device_id(entity_type: str, entity_id: str) -> str:
    """The historians' ``device_id``: ``<entity_type>.<entity_id>``, as the contract recommends."""
    return f"{entity_type}.{entity_id}"


def to_row(sample: Sample) -> Row:
    """The historian row for ``sample``: a counter row for ``*_total``, else a measurement row."""
    cls = CounterRow if sample.metric.endswith(COUNTER_SUFFIX) else MeasurementRow
    return cls(
        sample.site,
        device_id(sample.entity_type, sample.entity_id),
        sample.metric,
        float(sample.value),
        sample.observed_at,
        sample.quality,
    )


def append_rows(reading: Reading, measurements: list[RowTuple], counters: list[RowTuple]) -> None:
    """The rows of every value of ``reading``, by the rule of :func:`to_row`, as plain
    tuples appended to the two lists: the worker's path, where a row object per sample
    would be built only to be taken apart again."""
    site, at, quality = reading.site, reading.observed_at, reading.quality
    device = device_id(reading.entity_type, reading.entity_id)
    for metric, value, _, _ in reading.values:
        if value is None:
            continue  # "no value" (quality bad): nothing to store
        (counters if metric.endswith(COUNTER_SUFFIX) else measurements).append(
            (site, device, metric, float(value), at, quality)
        )


def reading_rows(reading: Reading) -> list[Row]:
    """:func:`append_rows` as row objects: measurements first, then counters."""
    measurements: list[RowTuple] = []
    counters: list[RowTuple] = []
    append_rows(reading, measurements, counters)
    return [MeasurementRow(*row) for row in measurements] + [CounterRow(*row) for row in counters]


def historian_row(topic: str | bytes, payload: bytes, *, received_at: datetime) -> Row | None:
    """The row a bus message becomes, or ``None`` for streams that are not ingested.

    Raises :class:`TopicError` or :class:`PayloadError` for a message that breaks the
    contract, so the caller can dead-letter it; also (``implausible_value``) for a metric
    of the vocabulary whose value is outside the plausible range of its unit, the same
    bound the adapters apply, so another publisher cannot store 1e305 W either.
    """
    parsed = parse_topic(topic)
    if parsed.stream != "value":
        return None
    sample = decode_sample(parsed, payload, received_at=received_at)
    info = metric_info(sample.metric)
    if info is not None and info.unit is not None and type(sample.value) is not bool:
        low, high = PLAUSIBLE.get(info.unit, (-math.inf, math.inf))
        if not low <= sample.value <= high:
            raise PayloadError(
                "implausible_value",
                f"{sample.metric} is outside its plausible range [{low:g}, {high:g}] {info.unit}",
                path="$.value" if payload.lstrip().startswith(b"{") else "$",
            )
    return to_row(sample)
