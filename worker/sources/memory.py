"""A source in the worker's own process: messages put by Python code.

For embedding energybus in a program that already has its messages, and for testing
the dispatcher without a broker. Acknowledgements are recorded in :attr:`acked`.
"""

from __future__ import annotations

import asyncio
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
        self._queue: asyncio.Queue[tuple[int, str, bytes, bool]] = asyncio.Queue()
        self._acks = AckQueue(self.acked.append)
        self._next = 0

    def put(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Queue a message; its sequence number (1, 2, ...)."""
        self._next += 1
        self._queue.put_nowait((self._next, topic, payload, retain))
        return self._next

    async def run(self) -> None:
        while True:
            number, topic, payload, retain = await self._queue.get()
            if not self.consuming:
                await asyncio.Event().wait()  # paused for shutdown: until cancelled
            while not self.gate.is_open():
                await self.gate.wait_open()
            entry = self._acks.add(number)
            now = datetime.now(UTC)
            self.deliver(Delivery(self.name, topic, payload, now, entry, retain=retain))
