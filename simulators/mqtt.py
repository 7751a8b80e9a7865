"""Platforms that speak MQTT, played: telemetry on a steady schedule, and each command
answered after a delay.

A platform (the VEN, a CPI plant) is pure: it builds its telemetry and its answers to a
command as ``(topic, payload)`` pairs and keeps its own model, so a test or a load
generator can use it without a broker. :class:`Player` runs one over a :class:`Link`, an
MQTT connection the caller makes: the MQTT client energybus has is the worker's, and
simulators sit beside the worker, so the CLI joins the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

__all__ = ["Link", "Outgoing", "Platform", "Played", "Player"]


class Outgoing(NamedTuple):
    """One message a platform publishes (QoS 1, not retained)."""

    topic: str
    payload: bytes


class Platform(Protocol):
    """What :class:`Player` needs of a simulated platform."""

    @property
    def filters(self) -> tuple[str, ...]:
        """The topics the platform takes commands on."""
        ...

    def telemetry(self, now: float) -> list[Outgoing]:
        """What the platform publishes at ``now`` (Unix seconds), once per interval."""
        ...

    def answer(self, topic: str, payload: bytes, now: float) -> list[Outgoing]:
        """The answers to a message on one of :attr:`filters` (none: it is ignored)."""
        ...

    def summary(self) -> str:
        """What the platform did with the commands it received, in one line."""
        ...


class Link(Protocol):
    """An MQTT connection: ``publish`` returns once the broker took the message (QoS 1)
    and raises ConnectionError when the connection is gone; ``closed`` completes then."""

    @property
    def closed(self) -> asyncio.Future[Any]: ...

    async def publish(self, topic: str, payload: bytes) -> None: ...


@dataclass
class Played:
    """What a run did: messages the broker took, by kind."""

    telemetry: int = 0
    received: int = 0
    answers: int = 0


class Player:
    """Plays ``platform`` over ``link``: its telemetry every ``interval_s`` on a fixed
    schedule (message round k is due k x interval after the start, so there is no drift),
    and the answers to each message handed to :meth:`received` after ``answer_delay_s``.
    """

    def __init__(
        self,
        platform: Platform,
        link: Link,
        *,
        interval_s: float,
        answer_delay_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, not {interval_s}")
        if not answer_delay_s >= 0:
            raise ValueError(f"answer_delay_s must be >= 0, not {answer_delay_s}")
        self.platform = platform
        self.link = link
        self.interval_s = interval_s
        self.answer_delay_s = answer_delay_s
        self.clock = clock
        self.played = Played()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()

    def received(self, topic: str, payload: bytes) -> None:
        """A message arrived on one of the platform's filters: answer it after the delay."""
        self.played.received += 1
        self._spawn(self._answer(topic, payload))

    async def run(self, *, stop: asyncio.Event, duration_s: float | None = None) -> Played:
        """Play until ``stop`` is set or ``duration_s`` has passed; what was done. Raises
        ConnectionError when the link is lost."""
        telemetry = asyncio.create_task(self._telemetry())
        waits = [
            telemetry,
            asyncio.create_task(stop.wait()),
            asyncio.create_task(self._failed.wait()),
            asyncio.ensure_future(asyncio.shield(self.link.closed)),
        ]
        try:
            done, _ = await asyncio.wait(
                waits, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED
            )
            if telemetry in done and not telemetry.cancelled():
                telemetry.result()  # a publish that failed: the link is gone
            if self._failure is not None:
                raise self._failure
            if waits[3] in done:
                raise ConnectionError("the broker closed the connection")
        finally:
            for task in (*waits, *self._tasks):
                task.cancel()
            await asyncio.gather(*waits, *self._tasks, return_exceptions=True)
        return self.played

    async def _telemetry(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for k in itertools.count():
            await asyncio.sleep(max(0.0, start + k * self.interval_s - loop.time()))
            messages = self.platform.telemetry(self.clock())
            await asyncio.gather(*(self.link.publish(m.topic, m.payload) for m in messages))
            self.played.telemetry += len(messages)

    async def _answer(self, topic: str, payload: bytes) -> None:
        await asyncio.sleep(self.answer_delay_s)
        for message in self.platform.answer(topic, payload, self.clock()):
            await self.link.publish(message.topic, message.payload)
            self.played.answers += 1

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        with contextlib.suppress(asyncio.CancelledError):
            error = task.exception()
            if error is not None and self._failure is None:
                self._failure = error
                self._failed.set()
