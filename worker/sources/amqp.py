"""The AMQP source: one connection to a broker account, consuming its queues (aio-pika).

An adapter declares the account (:class:`~energybus.adapters.AmqpEndpoint`: where, as
whom, which queues, what to say when one is missing); this source connects, checks the
queues passively (it never creates a queue on someone else's broker), consumes them
with manual acknowledgement and reconnects by itself with capped backoff and jitter,
logging each change of state once.

A message is acknowledged once its effects are safe (worker/acks.py), in arrival order
across the connection's queues, so one ``basic.ack`` with ``multiple`` covers all the
messages settled within :data:`ACK_EVERY_S`. While the dispatcher's gate is closed,
messages are held here; the broker sends at most ``prefetch`` unacknowledged messages
per queue, so what waits stays at the broker.

After a reconnect the broker redelivers what was not acknowledged, marked
``redelivered``. A redelivered message this process already handed over (it is among
the last ones handed over, since acknowledgements go in order) is acknowledged behind
the previous connection's unfinished work instead of being handled twice; a redelivery
after a restart of the worker is handled again, and the historian's key stores its rows
once.

It reconnects by its own loop rather than aio-pika's ``connect_robust``: that one retries
at a fixed interval and restores consumers behind the source's back, while the source
must know each new channel (delivery tags start again, acknowledgements of the old one
are void) and back off with jitter like every other connection of the worker.

The connection also publishes the adapter's commands (``publishes``), with publisher
confirms and ``mandatory``: a command the broker cannot route is returned, and the
command is rejected with that reason rather than lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import aio_pika
import msgspec
from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import (
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ProbableAuthenticationError,
    PublishError,
)
from pamqp.commands import Basic

from energybus.adapters import AmqpEndpoint
from energybus.messages import Message

from ..acks import AckQueue
from ..logs import StateLog
from ..metrics import Metrics
from ..retry import Backoff
from .base import CommandToken, Delivery, Gate, Holding, Source

if TYPE_CHECKING:
    from aiormq.abc import DeliveredMessage

__all__ = ["AmqpSource"]

log = logging.getLogger("energybus.worker.source")

CONNECT_TIMEOUT_S: Final = 15.0
CONFIRM_TIMEOUT_S: Final = 15.0
ACK_EVERY_S: Final = 0.005
"""How long settled messages wait to share one ``basic.ack``: a socket write costs about
as much as handling a message, and one write per message doubled the source's cost."""


class _Link:
    """One connection's channel and what is tied to it; acknowledgements for a channel
    that is gone are dropped (the broker redelivers those messages)."""

    __slots__ = ("ack_scheduled", "ack_upto", "channel", "closed", "underlay")

    def __init__(self, channel: AbstractChannel, underlay: Any) -> None:
        self.channel = channel
        self.underlay = underlay
        self.closed = False
        self.ack_upto = 0
        self.ack_scheduled = False


_Kept = bytes | tuple[int, bytes]
_KEPT_BODY: Final = 1024
"""Bodies up to this size are kept as they are to recognize a redelivery; larger ones
by a digest (a 256 KiB message in each of 3,500 prefetch slots would be 875 MB)."""


def _digest(body: bytes) -> tuple[int, bytes]:
    return len(body), hashlib.blake2b(body, digest_size=16).digest()


class AmqpSource(Source):
    transport = "amqp"

    def __init__(
        self,
        *,
        name: str,
        endpoint: AmqpEndpoint,
        queues: list[str],
        metrics: Metrics,
        deliver: Callable[[Delivery], None],
        gate: Gate,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
    ) -> None:
        super().__init__(deliver=deliver, gate=gate)
        self.name = name
        self.endpoint = endpoint
        self.queues = queues
        self.metrics = metrics
        self._backoff = (reconnect_min_s, reconnect_max_s)
        parts = urlsplit(endpoint.uri)
        self._tls = parts.scheme == "amqps"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (5671 if self._tls else 5672)
        self._acks: AckQueue | None = None
        self._link: _Link | None = None
        self._connection: AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._held: Holding[tuple[DeliveredMessage, str]] = Holding(
            self, lambda held: self._hand_over(*held)
        )
        self._recent: deque[tuple[str, _Kept]] = deque(maxlen=endpoint.prefetch * len(queues))
        self._redelivered: set[tuple[str, _Kept]] = set()
        self._consumers: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def where(self) -> str:
        """The account, for people: never the password."""
        e = self.endpoint
        return f"{e.username}@{self._host}:{self._port} vhost {e.vhost}"

    # Connecting -------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(*self._backoff)
        state = StateLog(log)
        connected = self.metrics.connected.labels(self.name)
        first = True
        while True:
            lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            try:
                await self._connect(lost)
            except Exception as error:
                await self._drop()
                connected.set(0)
                if self._closing:
                    return
                state.change(
                    f"down:{type(error).__name__}",
                    logging.ERROR if _permanent(error) else logging.WARNING,
                    "%s: cannot connect to %s: %s",
                    self.endpoint.name,
                    self.where,
                    self._explain(error),
                )
                await asyncio.sleep(backoff.next())
                continue
            if not first:
                self.metrics.reconnects.labels(self.name).inc()
            first = False
            backoff.reset()
            connected.set(1)
            state.change(
                "up",
                logging.INFO,
                "%s: connected to %s, consuming %d queues",
                self.endpoint.name,
                self.where,
                len(self.queues),
            )
            reason = await lost
            if self._closing:
                return
            await self._drop()
            connected.set(0)
            name = self.endpoint.name
            state.change("down", logging.WARNING, "%s: connection lost: %s", name, reason)
            await asyncio.sleep(backoff.next())

    async def _connect(self, lost: asyncio.Future[str]) -> None:
        e = self.endpoint
        context: ssl.SSLContext | None = None
        if self._tls:
            context = ssl.create_default_context(cafile=e.ca_file)
        connection = await aio_pika.connect(
            host=self._host,
            port=self._port,
            login=e.username,
            password=e.password,
            virtualhost=e.vhost,
            ssl=self._tls,
            ssl_context=context,
            timeout=CONNECT_TIMEOUT_S,
            client_properties={"connection_name": f"energybus {e.name}"},
        )
        self._connection = connection

        def gone(_: Any, error: BaseException | None = None) -> None:
            if not lost.done():
                lost.set_result(_explain_closed(error))

        connection.close_callbacks.add(gone)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        channel.close_callbacks.add(gone)
        await channel.set_qos(prefetch_count=e.prefetch)
        queues = []
        for name in self.queues:
            try:
                queues.append(await channel.get_queue(name, ensure=True))
            except ChannelNotFoundEntity:
                raise _MissingQueue(name, e.missing_queue) from None
        if e.exchange:
            self._exchange = await channel.get_exchange(e.exchange, ensure=True)
        link = _Link(channel, await channel.get_underlay_channel())
        acks = AckQueue(lambda tag: self._ack(link, tag))
        if self._acks is not None:
            # Kept over attempts that fail half-way, within a bound: only the first
            # deliveries after a reconnect can be these redeliveries.
            candidates = self._redelivered | set(self._recent)
            limit = 2 * (self._recent.maxlen or 1)
            self._redelivered = candidates if len(candidates) <= limit else set(self._recent)
            acks.after(self._acks)
        self._recent.clear()
        self._acks = acks
        self._link = link
        self._consumers = {}
        for queue in queues:
            # The tag is known before the first delivery, which may come before
            # basic_consume returns. On the channel under aio-pika's: its consumer wraps
            # every message in an object and a task of its own, which cost more than
            # the worker's handling of the message.
            tag = f"energybus.{queue.name}.{uuid.uuid4().hex[:12]}"
            self._consumers[tag] = queue.name
            await link.underlay.basic_consume(
                queue.name, self._on_message, no_ack=False, consumer_tag=tag
            )

    async def _drop(self) -> None:
        """Forget the connection: what it held was never acknowledged, so the broker
        delivers it again on the next one."""
        link, self._link = self._link, None
        if link is not None:
            link.closed = True
        self._held.clear()
        self._exchange = None
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    def _explain(self, error: BaseException) -> str:
        if isinstance(error, _MissingQueue):
            return f"queue {error.queue} is missing. {error.hint}"
        if isinstance(error, ProbableAuthenticationError):
            return (
                f"the broker refused user {self.endpoint.username!r}: check the API key"
                " (its secret, its vcp:connect scope) and that it is not revoked"
            )
        if isinstance(error, ChannelNotFoundEntity):
            e = self.endpoint
            return f"exchange {e.exchange!r} does not exist on vhost {e.vhost}"
        text = str(error) or type(error).__name__
        if "Connection.OpenOk" in text or "NOT_ALLOWED" in text or "access to vhost" in text:
            return (
                f"the broker refused vhost {self.endpoint.vhost!r} to user"
                f" {self.endpoint.username!r}: check the key's vhost"
            )
        return _oneline(text)

    # Consuming --------------------------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage) -> None:
        try:
            self._received(message)
        except Exception:
            # A defect: aiormq would log it where the worker's log does not look, and
            # acknowledgements behind this message would wait forever. Said here, and
            # the connection dropped, so the broker delivers everything unacknowledged
            # again.
            log.exception("%s: handing over a message failed; reconnecting", self.endpoint.name)
            self._abandon()

    def _abandon(self) -> None:
        """Acknowledge nothing more on this connection and close it."""
        if self._link is not None:
            self._link.closed = True
        if self._connection is not None:
            self._spawn(self._connection.close())

    def _received(self, message: DeliveredMessage) -> None:
        if not self.consuming:
            return  # not acknowledged: delivered again to the next run
        delivery: Any = message.delivery  # a Basic.Deliver: this is a consumer's callback
        queue = self._consumers.get(delivery.consumer_tag)
        if queue is None:
            # Not one of this connection's consumers: never acknowledged, nor anything
            # after it (an ack covers every earlier delivery); the broker redelivers.
            log.error("%s: a delivery for an unknown consumer; reconnecting", self.endpoint.name)
            self._abandon()
            return
        if not self._held.take((message, queue)):
            self._hand_over(message, queue)

    def _hand_over(self, message: DeliveredMessage, queue: str) -> None:
        acks = self._acks
        assert acks is not None
        body = message.body
        # The key of a message that may come again: small bodies as they are, large ones
        # by digest, so that the prefetch window's keys stay small whatever is sent.
        key = (queue, body if len(body) <= _KEPT_BODY else _digest(body))
        delivery: Any = message.delivery
        entry = acks.add(delivery.delivery_tag or 0)
        if delivery.redelivered and key in self._redelivered:
            self._redelivered.discard(key)
            self._recent.append(key)  # a candidate again should this connection drop too
            entry.release()
            return
        self._recent.append(key)
        self.deliver(Delivery(self.name, queue, body, datetime.now(UTC), entry))

    def _ack(self, link: _Link, tag: int) -> None:
        """Acknowledge up to ``tag``: one ``basic.ack`` (multiple) for what settles within
        :data:`ACK_EVERY_S`."""
        if link.closed:
            return
        link.ack_upto = tag
        if not link.ack_scheduled:
            link.ack_scheduled = True
            asyncio.get_running_loop().call_later(ACK_EVERY_S, self._send_acks, link)

    def _send_acks(self, link: _Link) -> None:
        link.ack_scheduled = False
        if link.closed:
            return
        self._spawn(self._basic_ack(link, link.ack_upto))

    async def _basic_ack(self, link: _Link, tag: int) -> None:
        try:
            await link.underlay.basic_ack(delivery_tag=tag, multiple=True)
        except Exception as error:
            log.debug("%s: acknowledgement not sent: %s", self.endpoint.name, error)

    # Publishing commands ----------------------------------------------------------------

    def publish(self, message: Message, token: CommandToken) -> None:
        """Publish a command to the endpoint's exchange under ``message.topic`` (a routing
        key); ``token`` hears of the broker's confirmation or of the failure."""
        exchange = self._exchange
        if exchange is None or self._link is None:
            token.fail(f"{self.endpoint.name} is not connected; the command was not sent")
            return
        self._spawn(self._publish(exchange, message, token))

    async def _publish(
        self, exchange: aio_pika.abc.AbstractExchange, message: Message, token: CommandToken
    ) -> None:
        amqp = aio_pika.Message(
            message.payload,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=_command_id(message.payload),
        )
        try:
            confirmation = await exchange.publish(
                amqp, message.topic, mandatory=True, timeout=CONFIRM_TIMEOUT_S
            )
        except PublishError:
            token.fail(
                f"the broker could not route it: no queue is bound to {message.topic!r}"
                f" on exchange {self.endpoint.exchange!r}"
            )
            return
        except ChannelInvalidStateError:
            # The channel had closed before the publish: the command did not leave.
            token.fail(f"{self.endpoint.name} is not connected; the command was not sent")
            return
        except asyncio.CancelledError:
            token.uncertain(f"{self.endpoint.name}: stopped before the broker confirmed it")
            raise
        except Exception as error:
            # Lost or timed out after the command was written: the broker may have routed
            # it, so it is not rejected; an answer confirms it, or it expires.
            why = _oneline(str(error)) or type(error).__name__
            token.uncertain(f"{self.endpoint.name}: no confirmation from the broker ({why})")
            return
        if isinstance(confirmation, Basic.Ack):
            token.release()
        else:
            token.fail(f"the broker refused it ({type(confirmation).__name__})")

    # Housekeeping -----------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self, timeout: float) -> None:
        """Wait for the commands being published to be confirmed (or not)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    async def close(self) -> None:
        self._closing = True
        self._held.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self._drop()


class _MissingQueue(Exception):
    def __init__(self, queue: str, hint: str) -> None:
        super().__init__(queue)
        self.queue = queue
        self.hint = hint


def _permanent(error: BaseException) -> bool:
    """Failures an operator must fix (retried all the same: someone may fix them)."""
    return isinstance(error, _MissingQueue | ProbableAuthenticationError | ChannelNotFoundEntity)


def _explain_closed(error: BaseException | None) -> str:
    if error is None:
        return "closed"
    return _oneline(str(error)) or type(error).__name__


def _oneline(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."


def _command_id(payload: bytes) -> str | None:
    """The ``cmdId`` of a command body, for the AMQP ``message_id``."""
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    found = body.get("cmdId") if isinstance(body, dict) else None
    return found if isinstance(found, str) else None
