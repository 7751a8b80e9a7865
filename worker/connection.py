"""The bus connection's life: connect, resend what had no PUBACK, subscribe the bus
ingest, and reconnect with backoff when it drops.

``<client_id>-bus`` carries every publish of the worker and the bus-ingest
subscription, with No Local so that the worker never ingests its own output. Its
received messages are acknowledged through their own :class:`AckQueue`, which, like a
source's, waits behind the previous connection's before acknowledging anything.

Its session has an expiry of its own (``mqtt.ingest_session_expiry_s``, an hour by
default), shorter than the source session's: what waits in it is other publishers'
canonical values, the whole bus, which a worker gone for good must not leave the broker
queuing for a week. Without bus ingest it subscribes to nothing, so its session expiry
is 0 and it starts clean: nothing to keep, and no subscription left over from an earlier
configuration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .acks import AckQueue, Entry
from .bus import BusClient, BusError, Received
from .config import MqttConfig
from .dispatch import Dispatcher
from .logs import StateLog
from .metrics import Metrics
from .retry import Backoff

__all__ = ["BusConnection"]

log = logging.getLogger("energybus.worker.bus")


class BusConnection:
    def __init__(
        self,
        *,
        config: MqttConfig,
        ingest_filters: list[str],
        session_expiry_s: int,
        dispatcher: Dispatcher,
        metrics: Metrics,
        on_ingest: Callable[[Received, Entry], None],
        properties: bytes = b"",
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.prepare = prepare
        """Awaited once, after the first connect and before the gate first opens (the
        worker reads the bus's retained ``last`` values there)."""
        self.properties = properties
        """Sent with every publish (the worker's group mark, when it has a group)."""
        self.ingest_filters = ingest_filters
        self.session_expiry_s = session_expiry_s
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.on_ingest = on_ingest
        self.client: BusClient | None = None
        self._acks: AckQueue | None = None

    def _received(self, received: Received) -> None:
        acks = self._acks
        assert acks is not None
        self.on_ingest(received, acks.add(received.packet_id))

    async def run(self) -> None:
        m = self.config
        backoff = Backoff(m.reconnect_min_s, m.reconnect_max_s)
        state = StateLog(log)
        connected = self.metrics.connected.labels("bus")
        previous: BusClient | None = None
        first = True
        while True:
            client = BusClient(
                on_message=self._received,
                on_puback=self.dispatcher.on_puback,
                on_refused=self.dispatcher.on_refused,
                max_inflight=m.max_inflight,
                properties=self.properties,
            )
            acks = AckQueue(client.ack)
            if self._acks is not None:
                acks.after(self._acks)
            self._acks = acks
            try:
                await client.connect(
                    **m.broker(),
                    client_id=f"{m.client_id}-bus",
                    clean_start=self.session_expiry_s == 0,
                    session_expiry=self.session_expiry_s,
                    receive_maximum=m.receive_maximum,
                )
                # Everything published from now on (resends, dead letters of ingested
                # messages) goes through the new connection, never the dead one.
                self.dispatcher.use(client)
                if previous is not None:
                    resent = client.resend(previous)
                    if resent:
                        log.info("bus: resent %d publishes that had no PUBACK", resent)
                await client.subscribe(self.ingest_filters)
            except (OSError, BusError, TimeoutError) as error:
                client.abort()
                if client.inflight:
                    previous = client  # it took the resends: the next connection resends them
                connected.set(0)
                state.change("down", logging.WARNING, "bus: cannot connect: %s", error)
                await asyncio.sleep(backoff.next())
                continue
            if self.prepare is not None:
                prepare, self.prepare = self.prepare, None
                await prepare()
            if not first:
                self.metrics.reconnects.labels("bus").inc()
            first = False
            backoff.reset()
            self.client = client
            self.dispatcher.attach(client)
            connected.set(1)
            state.change(
                "up", logging.INFO, "bus: connected to %s:%d as %s-bus", m.host, m.port, m.client_id
            )
            reason = await asyncio.shield(client.closed)
            self.dispatcher.detach()
            connected.set(0)
            previous = client
            state.change("down", logging.WARNING, "bus: connection lost: %s", reason)
            await asyncio.sleep(backoff.next())

    @property
    def inflight(self) -> int:
        return self.client.inflight if self.client is not None else 0

    async def disconnect(self) -> None:
        if self.client is not None:
            await self.client.disconnect()
