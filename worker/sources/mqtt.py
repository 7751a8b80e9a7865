"""The MQTT source: the worker's ``<client_id>-src`` connection.

aiomqtt, MQTT 5, a persistent session (so the broker queues what arrives while the
worker is away; it keeps it for ``mqtt.session_expiry_s``, a week by default, since what
waits there is source data the worker must not lose) and QoS 1 subscriptions
acknowledged by hand: aiomqtt 2.x has no manual-ack option, so paho's is reached through
the client it wraps (pinned in pyproject and held by tests/test_worker_acks.py). The
connection also carries the worker's retained status topic and its last will, since the
broker must see it die (``energybus retire`` reads that status before it drops the
sessions of a worker that is gone).

It reconnects on its own, whatever the bus connection does: a broker restart is noticed
at once, even while the bus is down and nothing is being handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..acks import AckQueue
from ..config import MqttConfig
from ..logs import StateLog
from ..metrics import Metrics
from ..retry import Backoff
from .base import Delivery, Gate, Source

__all__ = ["MqttSource"]

log = logging.getLogger("energybus.worker.source")


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
        self._client: aiomqtt.Client | None = None
        self._redelivered: set[tuple[str, bytes]] = set()

    def _new_client(self) -> aiomqtt.Client:
        m = self.config
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = m.session_expiry_s
        properties.ReceiveMaximum = m.receive_maximum
        client = aiomqtt.Client(
            m.host,
            m.port,
            identifier=f"{m.client_id}-src",
            username=m.username,
            password=m.password.get_secret_value() if m.password else None,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=m.keepalive_s,
            tls_context=m.tls.context() if m.tls else None,
            will=aiomqtt.Will(self.status_topic, b"offline", qos=1, retain=True),
        )
        client._client.manual_ack_set(True)
        return client

    async def run(self) -> None:
        m = self.config
        backoff = Backoff(m.reconnect_min_s, m.reconnect_max_s)
        state = StateLog(log)
        connected = self.metrics.connected.labels("source")
        first = True
        while True:
            client = self._new_client()
            acks = AckQueue(_acker(client))
            try:
                async with client:
                    if self._acks is not None:
                        # Redelivered messages whose first delivery is still in flight are
                        # acknowledged behind the barrier, not handled twice.
                        self._redelivered = self._acks.pending_keys()
                        acks.after(self._acks)
                    self._acks = acks
                    self._client = client
                    await client.publish(self.status_topic, b"online", qos=1, retain=True)
                    await client.subscribe(
                        [(f, SubscribeOptions(qos=1)) for f in self.filters]
                        + [
                            (f, SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=1))
                            for f in self.commands
                        ]
                    )
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
                    await self._consume(client, acks)
            except aiomqtt.MqttError as error:
                self._client = None
                connected.set(0)
                state.change("down", logging.WARNING, "source: connection lost: %s", error)
                await asyncio.sleep(backoff.next())

    async def _consume(self, client: aiomqtt.Client, acks: AckQueue) -> None:
        messages = client.messages
        gate = self.gate
        # aiomqtt completes this future when the connection ends; waiting on it beside
        # the gate is how a loss is noticed while nothing can be handed over.
        disconnected: asyncio.Future[None] = client._disconnected
        while True:
            if not self.consuming:
                # Paused for shutdown: hold the connection until it is closed.
                await asyncio.wait((disconnected,))
            if not gate.is_open():
                waiting = asyncio.ensure_future(gate.wait_open())
                await asyncio.wait((waiting, disconnected), return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                if disconnected.done():
                    raise aiomqtt.MqttError("connection lost")
                continue
            message = await anext(messages)
            if not self.consuming:
                continue  # not acknowledged: the broker delivers it to the next run
            self._hand_over(message, acks)

    def _hand_over(self, message: Any, acks: AckQueue) -> None:
        topic = message.topic.value
        payload = bytes(message.payload)
        # Only QoS 1 messages are redelivered, so only they are matched against the
        # previous connection's unfinished work.
        key = (topic, payload) if message.qos else None
        entry = acks.add(message.mid if message.qos else 0, key)
        if key is not None and key in self._redelivered:
            self._redelivered.discard(key)
            entry.release()
            return
        self.deliver(
            Delivery(self.name, topic, payload, datetime.now(UTC), entry, retain=message.retain)
        )

    async def close(self) -> None:
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    client.publish(self.status_topic, b"offline", qos=1, retain=True), 5
                )


def _acker(client: aiomqtt.Client) -> Callable[[int], None]:
    paho = client._client

    def ack(mid: int) -> None:
        paho.ack(mid, 1)

    return ack
