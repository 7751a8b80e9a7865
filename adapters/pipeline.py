"""One adapter plus one renderer: source messages in, wire messages out.

This is the whole translation as the worker, ``energybus normalize`` and the golden tests
run it, so the three cannot drift apart. It does no I/O either: the caller publishes
:attr:`Output.messages` and stores :attr:`Output.commands`.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

import msgspec

from energybus.errors import EnergyBusError
from energybus.filters import matches
from energybus.messages import Message, check_delivery
from energybus.render import Renderer
from energybus.samples import Sample

from .base import Adapter, Rejection
from .commands import CommandRecord

__all__ = ["Output", "Pipeline"]


class Output(msgspec.Struct, kw_only=True):
    """What one input became: messages to publish in order, refusals, command records,
    and the samples behind the messages (for the historians; a sample the bus refused is
    not among them)."""

    messages: list[Message] = msgspec.field(default_factory=list)
    rejections: list[Rejection] = msgspec.field(default_factory=list)
    commands: list[CommandRecord] = msgspec.field(default_factory=list)
    samples: list[Sample] = msgspec.field(default_factory=list)
    duplicate: bool = False


class Pipeline:
    """Routes a message to the adapter's ``normalize`` or, for a canonical ``set``, its
    ``format``, and renders the samples.

    ``rejected`` counts refusals by code, for metrics; ``samples`` counts samples
    produced.
    """

    def __init__(self, adapter: Adapter[Any, Any], *, renderer: Renderer | None = None) -> None:
        self.adapter = adapter
        self.renderer = renderer or Renderer(source=adapter.name)
        self.rejected: Counter[str] = Counter()
        self.samples = 0
        self._command_filters = adapter.command_filters

    def is_command(self, topic: str) -> bool:
        return topic.endswith("/set") and any(matches(f, topic) for f in self._command_filters)

    def feed(
        self, topic: str, payload: bytes, *, received_at: datetime, retain: bool = False
    ) -> Output:
        if self.is_command(topic):
            return self._command(topic, payload, received_at, retain)
        result = self.adapter.normalize(topic, payload, received_at)
        out = Output(
            rejections=result.rejections,
            commands=result.commands,
            samples=result.samples,
            duplicate=result.duplicate,
        )
        render = self.renderer.render_into
        messages = out.messages
        refused = None
        for index, (sample, spec) in enumerate(zip(result.samples, result.specs, strict=True)):
            try:
                render(sample, messages, spec)
            except EnergyBusError as error:  # a value the mapping let through but JSON cannot carry
                out.rejections.append(Rejection.of(error, topic))
                refused = refused or set()
                refused.add(index)
        if refused:
            out.samples = [s for i, s in enumerate(result.samples) if i not in refused]
        for rejection in out.rejections:
            self.rejected[rejection.code] += 1
        self.samples += len(out.samples)
        return out

    def expire(self, now: datetime) -> Output:
        """Commands whose answer is overdue, as ``expired`` records."""
        return Output(commands=self.adapter.expire(now))

    def _command(self, topic: str, payload: bytes, received_at: datetime, retain: bool) -> Output:
        try:
            # A retained command would run again for every new subscriber: refuse it.
            check_delivery(topic, retain=retain)
            formatted = self.adapter.format(topic, payload, received_at=received_at)
        except EnergyBusError as error:
            rejection = Rejection.of(error, topic)
            self.rejected[rejection.code] += 1
            return Output(rejections=[rejection])
        return Output(messages=list(formatted.messages), commands=[formatted.record])
