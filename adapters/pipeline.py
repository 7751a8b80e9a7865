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
from typing import Any, Final

import msgspec

from energybus.commands import CommandRecord
from energybus.errors import EnergyBusError, LimitError, TopicError
from energybus.filters import matches
from energybus.messages import Message
from energybus.payloads import (
    Scalar,
    SetEnvelope,
    decode_set,
    deeper_than,
    over_limit,
    too_large,
)
from energybus.render import Renderer
from energybus.samples import Reading, Sample
from energybus.topics import parse_topic

from .base import Adapter, Rejection, SourceDeclaration
from .mapping import SourceOptions

__all__ = ["Output", "Pipeline"]

_LIMITS: Final = SourceOptions()
"""The limits of an adapter whose options do not derive from :class:`SourceOptions`."""


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

    Every message is first held to the adapter's input limits (``max_payload_bytes``,
    and for JSON sources ``max_depth``; :class:`~.mapping.SourceOptions`): here, so
    that the worker and ``energybus normalize`` refuse the same messages with the same
    code, and before the adapter decodes anything of them.

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
        options = adapter.options
        self.max_payload_bytes: int = getattr(
            options, "max_payload_bytes", _LIMITS.max_payload_bytes
        )
        self.max_depth: int | None = (
            getattr(options, "max_depth", _LIMITS.max_depth) if adapter.json_sources else None
        )
        """``None`` for an adapter whose source messages are not JSON."""
        self._settings = f"adapters.{adapter.name}."

    @property
    def sources(self) -> tuple[SourceDeclaration, ...]:
        return self.adapter.sources

    @property
    def command_filters(self) -> tuple[str, ...]:
        return self._command_filters

    def is_command(self, topic: str) -> bool:
        return topic.endswith("/set") and any(matches(f, topic) for f in self._command_filters)

    def knows_target(self, topic: str) -> bool:
        """Whether the ``set`` on ``topic`` names a device of this adapter
        (:meth:`Adapter.knows_target`); False for a topic that is not canonical."""
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return False
        return self.adapter.knows_target(parsed)

    def site_of(self, topic: str, payload: bytes) -> str:
        """What a partitioned group's members split messages by: the site, for a
        ``set`` the first level of its topic, for a source message what the adapter
        tells (``Adapter.site_of``), else the topic itself."""
        if self.is_command(topic):
            return topic.partition("/")[0]
        if self._over(payload):
            return topic  # refused, by the one member the topic hashes to
        return self.adapter.site_of(topic, payload) or topic

    def _over(self, payload: bytes) -> bool:
        """Whether ``payload`` is past an input limit (the per-message test: the reason
        is worked out only for a message that is)."""
        depth = self.max_depth
        return len(payload) > self.max_payload_bytes or (
            depth is not None and deeper_than(payload, depth)
        )

    def _limit(self, payload: bytes) -> LimitError | None:
        return over_limit(payload, self.max_payload_bytes, self.max_depth, prefix=self._settings)

    def feed(
        self, topic: str, payload: bytes, *, received_at: datetime, retain: bool = False
    ) -> Output:
        if self.is_command(topic):
            return self._command(topic, payload, received_at, retain)
        if self._over(payload):
            error = self._limit(payload)
            assert error is not None
            self.rejected[error.code] += 1
            return Output(rejections=[Rejection.of(error, topic)])
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
            if len(payload) > self.max_payload_bytes:
                # Only the size: a set's decoder is typed, and refuses an array or an
                # object where the value belongs at its first bracket, however deep.
                raise too_large(len(payload), self.max_payload_bytes, prefix=self._settings)
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
        value: Scalar | None = None
        if not isinstance(error, LimitError):  # what is past a limit is not decoded
            try:
                request = decode_set(payload)
                value = request.value if isinstance(request, SetEnvelope) else request
            except EnergyBusError:
                pass
        return CommandRecord.refusal(
            command_id=self.adapter.new_id(),
            adapter=self.name,
            topic=parsed,
            value=value,
            code=error.code,
            reason=error.message,
            at=at,
        )
