"""What a source is and what it hands over."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Generic, Protocol, TypeVar

from ..acks import Entry

__all__ = ["CommandToken", "Delivery", "Gate", "Holding", "Source"]

T = TypeVar("T")


class Delivery:
    """One source message, in arrival order on its connection.

    ``source`` names the source (``mqtt``, or the adapter of a queue or device
    source); ``topic`` is the topic, routing key or device address; ``entry`` is the
    acknowledgement handle, held once for the dispatcher, which releases it when it has
    handed every effect on (the message is acknowledged once all of them are safe).
    """

    __slots__ = ("entry", "payload", "received_at", "retain", "source", "topic")

    def __init__(
        self,
        source: str,
        topic: str,
        payload: bytes,
        received_at: datetime,
        entry: Entry,
        *,
        retain: bool = False,
    ) -> None:
        self.source = source
        self.topic = topic
        self.payload = payload
        self.received_at = received_at
        self.entry = entry
        self.retain = retain


class Gate(Protocol):
    """The dispatcher's readiness: a source hands over a message only while it is open
    (the bus is connected and has room), so nothing is taken that cannot be published."""

    def is_open(self) -> bool: ...

    async def wait_open(self) -> None: ...


class CommandToken(Protocol):
    """What the dispatcher hands a source with a command it is to send: told when the
    broker has the command (``release``), that it surely did not (``fail``), or that it
    cannot be known (``uncertain``: the command may have left; its record waits for an
    answer or expires)."""

    def release(self) -> None: ...

    def fail(self, reason: str) -> None: ...

    def uncertain(self, reason: str) -> None: ...


class Source(ABC):
    """A transport the worker consumes. Subclasses set ``name`` and implement :meth:`run`.

    A source never translates: it delivers bytes with a topic and acknowledges when
    told to. It reconnects by itself with backoff, logs each state change once, and
    notices the loss of its own connection at once, whatever the other connections do.
    """

    name: str
    transport: str

    def __init__(self, *, deliver: Callable[[Delivery], None], gate: Gate) -> None:
        self.deliver = deliver
        self.gate = gate
        self.consuming = True

    @abstractmethod
    async def run(self) -> None:
        """Connect, consume and reconnect until cancelled."""

    def pause(self) -> None:
        """Hand over nothing more (shutdown). What was not acknowledged is delivered
        again, by the broker or queue, to the next run."""
        self.consuming = False

    async def settle(self, timeout: float) -> None:  # noqa: B027 (a hook, like close)
        """Shutdown, before the historian's last flush: finish what this source sends
        (commands it publishes), so their records and acknowledgements are not lost."""

    async def close(self) -> None:  # noqa: B027 (a hook: most sources have nothing to say)
        """Last words before the worker exits (an MQTT source marks the worker offline)."""


class Holding(Generic[T]):
    """What a source received while the dispatcher's gate was closed, handed over in
    arrival order when it opens.

    A source offers every message with :meth:`take`; while nothing is held and the gate
    is open it hands the message over itself, so the common path costs one call. Held
    messages were not acknowledged: when the connection drops, :meth:`clear` forgets
    them and the broker delivers them again. ``after_batch`` hears how many are still
    held after each batch (an MQTT source resumes reading below a bound).
    """

    __slots__ = ("_after_batch", "_draining", "_hand_over", "_items", "_source")

    def __init__(
        self,
        source: Source,
        hand_over: Callable[[T], None],
        after_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._source = source
        self._hand_over = hand_over
        self._after_batch = after_batch
        self._items: deque[T] = deque()
        self._draining: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def take(self, item: T) -> bool:
        """Hold ``item`` if others wait or the gate is closed (True); else the caller
        hands it over now (False)."""
        items = self._items
        if not items and self._source.gate.is_open():
            return False
        items.append(item)
        if self._draining is None or self._draining.done():
            self._draining = asyncio.get_running_loop().create_task(self._drain())
        return True

    def clear(self) -> None:
        self._items.clear()

    def stop(self) -> None:
        if self._draining is not None:
            self._draining.cancel()

    async def _drain(self) -> None:
        items = self._items
        source = self._source
        gate = source.gate
        while items:
            if not gate.is_open():
                await gate.wait_open()
                continue
            for _ in range(1000):  # then let the loop read acknowledgements and write
                if not items or not gate.is_open() or not source.consuming:
                    break
                self._hand_over(items.popleft())
            if not source.consuming:
                items.clear()
            if self._after_batch is not None:
                self._after_batch(len(items))
            await asyncio.sleep(0)
