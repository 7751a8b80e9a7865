"""A source in the worker's own process: messages put by Python code.

For embedding energybus in a program that already has its messages, and for testing
the dispatcher without a broker. A message leaves the queue only when the gate is open,
so one put while the bus is away waits in :attr:`pending`, and pausing loses nothing
that was not handed over. Acknowledgements are recorded in :attr:`acked`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from ..acks import AckQueue
from .base import Delivery, Gate, Source

__all__ = ["MemorySource"]


class MemorySource(Source):
    transport = "memory"

    def __init__(
        self, *, name: str = "memory", deliver: Callable[[Delivery], None], gate: Gate
    ) -> None:
        super().__init__(deliver=deliver, gate=gate)
        self.name = name
        self.acked: list[int] = []
        """Sequence numbers of the acknowledged messages, in acknowledgement order."""
        self.pending: deque[tuple[int, str, bytes, bool]] = deque()
        """Messages put and not yet handed over."""
        self._arrived = asyncio.Event()
        self._acks = AckQueue(self.acked.append)
        self._next = 0

    def put(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Queue a message; its sequence number (1, 2, ...)."""
        self._next += 1
        self.pending.append((self._next, topic, payload, retain))
        self._arrived.set()
        return self._next

    async def run(self) -> None:
        gate = self.gate
        while True:
            if not self.pending:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            if not self.consuming:
                await asyncio.Event().wait()  # paused for shutdown: until cancelled
            if not gate.is_open():
                await gate.wait_open()
                continue
            number, topic, payload, retain = self.pending.popleft()
            entry = self._acks.add(number)
            now = datetime.now(UTC)
            self.deliver(Delivery(self.name, topic, payload, now, entry, retain=retain))
