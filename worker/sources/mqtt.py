"""The MQTT source: the worker's ``<client_id>-src`` connection.

MQTT 5, a persistent session (so the broker queues what arrives while the worker is
away; it keeps it for ``mqtt.session_expiry_s``, a week by default, since what waits
there is source data the worker must not lose) and QoS 1 subscriptions acknowledged by
hand, once a message's effects are safe (worker/acks.py). The connection also carries
the worker's retained status topic and its last will, since the broker must see it die
(``energybus retire`` reads that status before it drops the sessions of a worker that
is gone).

It runs on the bus connection's client (worker/bus.py), not on aiomqtt and paho.
Measured in the worker at 1,500 VEN messages/s, paho's side of receiving was a quarter
of the worker's CPU: a ``Properties`` object per received PUBLISH, a message-info object
with a ``threading.Condition`` per acknowledgement, a task per message, several reads
per packet. Here a PUBLISH is parsed from the buffer it arrived in, and the
acknowledgements of one loop iteration leave in one write. The client also gives
manual acknowledgement as an API, where aiomqtt 2.x had to be reached into.

The client pushes messages as they are read. While the dispatcher's gate is closed (the
bus is down or has no room) they are held here, in arrival order, and handed over when
it opens; the broker sends at most ``mqtt.receive_maximum`` unacknowledged QoS 1
messages, and past that many held the connection stops reading, so what waits stays at
the broker. Held messages were not acknowledged: if the connection drops they are
dropped too, and the broker delivers them again.

It reconnects on its own, whatever the bus connection does: a broker restart is noticed
at once, even while the bus is down and nothing is being handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

from ..acks import AckQueue
from ..bus import BusClient, BusError, Received
from ..config import MqttConfig
from ..logs import StateLog
from ..metrics import Metrics
from ..retry import Backoff
from .base import Delivery, Gate, Holding, Source

__all__ = ["MqttSource"]

log = logging.getLogger("energybus.worker.source")


class _Acked:
    """The token of a publish whose PUBACK someone waits for."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def release(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class MqttSource(Source):
    name = "mqtt"
    transport = "mqtt"

    def __init__(
        self,
        *,
        config: MqttConfig,
        filters: list[str],
        commands: list[str],
        status_topic: str,
        metrics: Metrics,
        deliver: Callable[[Delivery], None],
        gate: Gate,
    ) -> None:
        super().__init__(deliver=deliver, gate=gate)
        self.config = config
        self.filters = filters
        self.commands = commands
        """Canonical ``set`` filters, subscribed with Retain As Published so that a ``set``
        published retained shows its flag even when delivered live (and is refused), and
        Retain Handling 1, so a retained ``set`` the session already queued is not sent a
        second time when the subscription is renewed."""
        self.status_topic = status_topic
        self.metrics = metrics
        self._acks: AckQueue | None = None
        self._client: BusClient | None = None
        self._redelivered: set[tuple[str, bytes]] = set()
        self._recent: deque[tuple[int, str, int]] = deque(maxlen=config.receive_maximum)
        """(packet id, topic, hash of the payload) of the last QoS 1 messages handed over:
        the broker may not have had their acknowledgements when the connection dropped
        (at most Receive Maximum of them were unacknowledged)."""
        self._handled: set[tuple[int, str, int]] = set()
        self._early: list[Received] | None = None
        """What a connection not yet set up received: the broker sends what it redelivers
        right behind its CONNACK, before the new acknowledgements are in place."""
        self._hold_max = config.receive_maximum + 1000
        self._held: Holding[Received] = Holding(self, self._hand_over, self._resume)
        self._closing = False

    async def run(self) -> None:
        m = self.config
        backoff = Backoff(m.reconnect_min_s, m.reconnect_max_s)
        state = StateLog(log)
        connected = self.metrics.connected.labels("source")
        first = True
        while True:
            client = BusClient(on_message=self._received, on_puback=_released, max_inflight=100)
            acks = AckQueue(client.ack)
            self._early = []
            try:
                await client.connect(
                    **m.broker(),
                    client_id=f"{m.client_id}-src",
                    session_expiry=m.session_expiry_s,
                    receive_maximum=m.receive_maximum,
                    will=(self.status_topic, b"offline", 1, True),
                )
                self._renew(acks)
                self._client = client
                early, self._early = self._early, None
                for message in early:
                    self._received(message)
                client.publish(self.status_topic, b"online", 1, True, None)
                client.flush()
                await client.subscribe(self.filters, no_local=False)
                await client.subscribe(
                    self.commands, no_local=False, retain_as_published=True, retain_handling=1
                )
            except (OSError, BusError, TimeoutError) as error:
                self._early = None  # never acknowledged: the broker sends it again
                client.abort()
                self._lost(client)
                connected.set(0)
                state.change("down", logging.WARNING, "source: cannot connect: %s", error)
                await asyncio.sleep(backoff.next())
                continue
            if not first:
                self.metrics.reconnects.labels("source").inc()
            first = False
            backoff.reset()
            connected.set(1)
            state.change(
                "up",
                logging.INFO,
                "source: connected to %s:%d as %s-src, %d filters",
                m.host,
                m.port,
                m.client_id,
                len(self.filters) + len(self.commands),
            )
            reason = await asyncio.shield(client.closed)
            if self._closing:
                return
            self._lost(client)
            connected.set(0)
            state.change("down", logging.WARNING, "source: connection lost: %s", reason or "closed")
            await asyncio.sleep(backoff.next())

    def _renew(self, acks: AckQueue) -> None:
        """A new connection: its acknowledgements wait behind the previous one's.
        Redelivered messages whose first delivery is still in flight are acknowledged
        behind that barrier, not handled twice; so are those already handled whose
        acknowledgement the broker lost (it went down): it sends them again marked DUP,
        under their packet ids."""
        if self._acks is not None:
            self._redelivered = self._acks.pending_keys()
            self._handled = set(self._recent)
            acks.after(self._acks)
        self._acks = acks

    def _lost(self, client: BusClient) -> None:
        """The connection is gone: what it held was never acknowledged, and the broker
        sends it again on the next connection."""
        if self._client is client:
            self._client = None
            self._held.clear()

    def _received(self, message: Received) -> None:
        if not self.consuming:
            return  # not acknowledged: the broker delivers it to the next run
        if self._early is not None:
            self._early.append(message)
            return
        held = self._held
        if held.take(message):
            if len(held) >= self._hold_max and self._client is not None:
                self._client.pause_reading()
            return
        self._hand_over(message)

    def _resume(self, held: int) -> None:
        """Read again once the held messages are down to half the bound."""
        client = self._client
        if client is not None and held < self._hold_max // 2:
            client.resume_reading()

    def _hand_over(self, message: Received) -> None:
        acks = self._acks
        assert acks is not None
        topic, payload = message.topic, message.payload
        # Only QoS 1 messages are redelivered, so only they are matched against the
        # previous connection's unfinished work.
        key = (topic, payload) if message.qos else None
        entry = acks.add(message.packet_id, key)
        if key is not None:
            if key in self._redelivered:
                self._redelivered.discard(key)
                entry.release()
                return
            handed = (message.packet_id, topic, hash(payload))
            self._recent.append(handed)
            if message.dup and handed in self._handled:
                self._handled.discard(handed)
                entry.release()
                return
        self.deliver(
            Delivery(self.name, topic, payload, datetime.now(UTC), entry, retain=message.retain)
        )

    async def close(self) -> None:
        self._closing = True
        self._held.stop()
        client = self._client
        if client is not None:
            done = _Acked()
            client.publish(self.status_topic, b"offline", 1, True, done)
            client.flush()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(done.done), 5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)


def _released(token: object, reason: int) -> None:
    if isinstance(token, _Acked):
        token.release()
