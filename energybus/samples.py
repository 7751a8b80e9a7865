"""The normalized sample: what every adapter produces and every sink consumes.

The contract's time rule lives here and only here (:func:`make_sample`): a sample keeps
the device's observation time; without one it takes the ingest time and its quality
drops to ``degraded``, so nobody mistakes broker time for device time.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from energybus.errors import PayloadError
from energybus.payloads import Envelope, Quality, Scalar, SetEnvelope, decode_set, decode_value
from energybus.topics import EntityType, Topic, build_topic, parse_topic

__all__ = [
    "Reading",
    "Sample",
    "SeriesKey",
    "decode_sample",
    "make_sample",
    "observation",
    "utc",
]

SeriesKey = tuple[str, str, str, str]
"""``(site, entity_type, entity_id, metric)``: one series, whatever its stream."""

_WORSE_THAN_DEGRADED: Final = frozenset({"stale", "bad"})


class Sample(msgspec.Struct, frozen=True, gc=False):
    """One observation of one metric of one entity, in canonical units.

    ``observed_at`` is timezone-aware; :func:`make_sample` and the decoders give UTC.
    """

    site: str
    entity_type: EntityType
    entity_id: str
    metric: str
    value: Scalar
    observed_at: datetime
    quality: Quality = "good"
    unit: str | None = None

    @property
    def key(self) -> SeriesKey:
        return (self.site, self.entity_type, self.entity_id, self.metric)

    @property
    def device_id(self) -> str:
        return f"{self.entity_type}.{self.entity_id}"

    def topic(self, stream: str = "value") -> str:
        """The sample's topic on ``stream``; raises :class:`TopicError` for bad ids."""
        return build_topic(self.site, self.entity_type, self.entity_id, self.metric, stream)


def utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is refused, since its zone is a guess."""
    tz = moment.tzinfo
    if tz is UTC:
        return moment
    if tz is None or tz.utcoffset(moment) is None:
        raise PayloadError(
            "naive_datetime",
            f"observation time {moment.isoformat()} has no time zone",
            path="$.observed_at",
        )
    return moment.astimezone(UTC)


def make_sample(
    site: str,
    entity_type: EntityType,
    entity_id: str,
    metric: str,
    value: Scalar,
    *,
    observed_at: datetime | None = None,
    received_at: datetime | None = None,
    quality: Quality = "good",
    unit: str | None = None,
) -> Sample:
    """Build a sample under the contract's time rule.

    With ``observed_at`` the device's time is kept (converted to UTC). Without it the
    sample takes ``received_at`` (or now) and ``good`` becomes ``degraded``; a worse
    quality the caller gave stays.
    """
    observed, quality = observation(observed_at, received_at, quality)
    return Sample(site, entity_type, entity_id, metric, value, observed, quality, unit)


def observation(
    observed_at: datetime | None,
    received_at: datetime | None = None,
    quality: Quality = "good",
) -> tuple[datetime, Quality]:
    """The contract's time rule alone: the observation time and quality a sample gets.

    Adapters call it once per message and share the result among its samples.
    """
    if observed_at is None:
        observed_at = received_at if received_at is not None else datetime.now(UTC)
        if quality not in _WORSE_THAN_DEGRADED:
            quality = "degraded"
    return utc(observed_at), quality


def decode_sample(
    topic: str | bytes | Topic, payload: bytes | str, *, received_at: datetime
) -> Sample:
    """Read a canonical ``value`` (or ``set``) message from the bus back into a sample.

    Raises :class:`TopicError` or :class:`PayloadError` on bad input. A Profile A
    payload has no observation time, so the sample is stamped ``received_at`` and
    marked ``degraded`` (the contract's fallback).
    """
    parsed = topic if isinstance(topic, Topic) else parse_topic(topic)
    if parsed.stream not in ("value", "set"):
        raise PayloadError(
            "not_a_sample",
            f"only value and set streams carry samples, not {parsed.stream!r}",
        )
    decoded = decode_value(payload) if parsed.stream == "value" else decode_set(payload)
    if isinstance(decoded, Envelope | SetEnvelope):
        return make_sample(
            parsed.site,
            parsed.entity_type,
            parsed.entity_id,
            parsed.metric,
            decoded.value,
            observed_at=decoded.observed_at,
            received_at=received_at,
            quality=decoded.quality or "good",
            unit=decoded.unit,
        )
    return make_sample(
        parsed.site,
        parsed.entity_type,
        parsed.entity_id,
        parsed.metric,
        decoded,
        received_at=received_at,
    )


class Reading(msgspec.Struct, gc=False):
    """The values of one entity observed at one moment: what adapters hand on.

    A source message usually describes a few entities with many metrics each. Keeping
    site, entity, time and quality once per entity rather than once per value is what
    lets the renderer, the historian rows and availability work per entity. ``values``
    holds ``(metric, value, unit, spec)`` tuples, ``spec`` being the series'
    :class:`energybus.render.SeriesSpec`.
    """

    site: str
    entity_type: EntityType
    entity_id: str
    observed_at: datetime
    quality: Quality = "good"
    values: list[tuple[str, Scalar | None, str | None, Any]] = msgspec.field(default_factory=list)
    """``None`` only with quality ``bad``: the source said it has no value."""

    def samples(self) -> list[Sample]:
        """One :class:`Sample` per value, for code that thinks in samples (a value the
        source said it does not have, ``None``, is no sample)."""
        site, etype, eid, at, quality = (
            self.site,
            self.entity_type,
            self.entity_id,
            self.observed_at,
            self.quality,
        )
        return [
            Sample(site, etype, eid, m, v, at, quality, u)
            for m, v, u, _ in self.values
            if v is not None
        ]
