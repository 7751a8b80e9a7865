"""One adapter plus one renderer: source messages in, wire messages out.

This is the whole translation as the worker, ``energybus normalize`` and the golden tests
run it, so the three cannot drift apart. It does no I/O either: the caller publishes
:attr:`Output.messages`, stores :attr:`Output.readings` and :attr:`Output.commands`, and
reports what the pipeline counted through its methods, never by reaching into the
adapter or the renderer.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import msgspec

from energybus.commands import CommandRecord
from energybus.errors import EnergyBusError
from energybus.filters import matches
from energybus.messages import Message
from energybus.payloads import Scalar, SetEnvelope, decode_set
from energybus.render import Renderer
from energybus.samples import Reading, Sample
from energybus.topics import parse_topic

from .base import Adapter, Rejection, SourceDeclaration

__all__ = ["Output", "Pipeline"]


class Output(msgspec.Struct, kw_only=True):
    """What one input became: messages to publish in order, refusals, command records,
    and the readings behind the messages (for the historians; a value the bus refused is
    not among them)."""

    messages: list[Message] = msgspec.field(default_factory=list)
    rejections: list[Rejection] = msgspec.field(default_factory=list)
    commands: list[CommandRecord] = msgspec.field(default_factory=list)
    readings: list[Reading] = msgspec.field(default_factory=list)
    values: int = 0
    """How many values the readings hold (counted while rendering them)."""
    duplicate: bool = False
    unavailable: list[tuple[str, str, str]] = msgspec.field(default_factory=list)
    """Entities the source reports unreachable (their series go ``offline``)."""

    @property
    def samples(self) -> list[Sample]:
        """The readings as one :class:`Sample` per value."""
        return [sample for reading in self.readings for sample in reading.samples()]


class Pipeline:
    """Routes a message to the adapter's ``normalize`` or, for a canonical ``set``, its
    ``format``, and renders the readings.

    ``rejected`` counts refusals by code, for metrics; ``samples`` counts values
    produced.
    """

    def __init__(self, adapter: Adapter[Any, Any], *, renderer: Renderer | None = None) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.renderer = renderer or Renderer(source=adapter.name)
        self.rejected: Counter[str] = Counter()
        self.samples = 0
        self._command_filters = adapter.command_filters
        self._suppressed_seen = 0
        self.destinations = frozenset(d for s in adapter.sources for d in s.publishes)
        """Where this adapter's commands go on its source connections (AMQP routing
        keys), never on the bus."""

    @property
    def sources(self) -> tuple[SourceDeclaration, ...]:
        return self.adapter.sources

    @property
    def command_filters(self) -> tuple[str, ...]:
        return self._command_filters

    def is_command(self, topic: str) -> bool:
        return topic.endswith("/set") and any(matches(f, topic) for f in self._command_filters)

    def owns(self, topic: str) -> bool:
        """Whether the ``set`` on ``topic`` is for a device of this adapter
        (:meth:`Adapter.owns`); a topic that is no series is nobody's."""
        try:
            series = parse_topic(topic)
        except EnergyBusError:
            return False
        return self.adapter.owns(series)

    def feed(
        self, topic: str, payload: bytes, *, received_at: datetime, retain: bool = False
    ) -> Output:
        if self.is_command(topic):
            return self._command(topic, payload, received_at, retain)
        result = self.adapter.normalize(topic, payload, received_at)
        out = Output(
            rejections=result.rejections,
            commands=result.commands,
            readings=result.readings,
            duplicate=result.duplicate,
            unavailable=result.unavailable,
        )
        render = self.renderer.render_reading
        messages = out.messages
        count = 0
        emptied = False
        for index, reading in enumerate(result.readings):
            refused = render(reading, messages)
            if refused:
                # A value the mapping let through but JSON cannot carry (a plug-in's NaN).
                out.rejections += [Rejection.of(error, topic) for _, error in refused]
                skip = {i for i, _ in refused}
                kept = [v for i, v in enumerate(reading.values) if i not in skip]
                reading = out.readings[index] = msgspec.structs.replace(reading, values=kept)
                emptied = emptied or not kept
            count += len(reading.values)
        if emptied:
            out.readings = [r for r in out.readings if r.values]
        for rejection in out.rejections:
            self.rejected[rejection.code] += 1
        self.samples += count
        out.values = count
        return out

    def expire(self, now: datetime) -> Output:
        """Commands whose answer is overdue, as ``expired`` records."""
        return Output(commands=self.adapter.expire(now))

    def command_sent(self, command_id: str, at: datetime) -> CommandRecord | None:
        """The broker took command ``command_id``: its record, now ``sent`` (``None``
        when it already has an outcome)."""
        return self.adapter.commands.sent(command_id, at)

    def command_failed(self, command_id: str, reason: str) -> CommandRecord | None:
        """Command ``command_id`` could not be sent: its record, now ``rejected`` with
        ``reason`` (``None`` when it already has an outcome)."""
        return self.adapter.failed(command_id, reason)

    def take_suppressed(self) -> int:
        """How many values dedupe held back since the last call (for a counter metric)."""
        total = self.renderer.suppressed
        new, self._suppressed_seen = total - self._suppressed_seen, total
        return new

    def _command(self, topic: str, payload: bytes, received_at: datetime, retain: bool) -> Output:
        """The admission gate, then the adapter; a refusal from either is a rejection
        (for the dead-letter stream) and a ``refused`` record (for ``command_logs``)."""
        if retain and not payload:
            # The deletion of a retained set (ours, after refusing it, or anyone's): no
            # command, nothing to refuse.
            return Output()
        adapter = self.adapter
        try:
            admitted = adapter.gate.admit(topic, payload, retain=retain, received_at=received_at)
            formatted = adapter.format(admitted, received_at=received_at)
        except EnergyBusError as error:
            rejection = Rejection.of(error, topic)
            self.rejected[rejection.code] += 1
            record = self._refusal(topic, payload, error, received_at)
            return Output(rejections=[rejection], commands=[] if record is None else [record])
        return Output(messages=list(formatted.messages), commands=[formatted.record])

    def _refusal(
        self, topic: str, payload: bytes, error: EnergyBusError, at: datetime
    ) -> CommandRecord | None:
        """The record of a refused ``set``; ``None`` when its topic names no series."""
        try:
            parsed = parse_topic(topic)
        except EnergyBusError:
            return None
        try:
            request = decode_set(payload)
            value: Scalar | None = request.value if isinstance(request, SetEnvelope) else request
        except EnergyBusError:
            value = None
        return CommandRecord.refusal(
            command_id=self.adapter.new_id(),
            adapter=self.name,
            topic=parsed,
            value=value,
            code=error.code,
            reason=error.message,
            at=at,
        )
