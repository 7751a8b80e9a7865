"""What a source is and what it hands over."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from ..acks import Entry

__all__ = ["CommandToken", "Delivery", "Gate", "Source"]


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
