"""Steady load for the fault suite: VEN and CPI over MQTT, Voke over AMQP, each at a fixed
rate, from threads of the test process, recording every message in the ledger.

Senders deliver at least once whatever a broker does: MQTT publishes go through a paho
connection that reconnects by itself and sends again what had no PUBACK; AMQP publishes
wait for the broker's confirm and are sent again, on a new connection, when it did not
come. What is sent again may reach the broker twice, so it is marked at risk in the
ledger: a copy of it refused as a replay is the sender's doing, not the worker's.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import aio_pika
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.faults.ledger import Ledger
from tests.faults.traffic import Traffic
from tests.voke import Org
from tools.services import Service


class MqttSender:
    """QoS 1 publishes on one connection; :meth:`settle` waits for every PUBACK."""

    def __init__(self, mqtt: Service, name: str, ledger: Ledger) -> None:
        self.ledger = ledger
        self._lock = threading.Lock()
        self._pending: deque[tuple[Any, bytes]] = deque()
        self._connected = threading.Event()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"faults-{name}-{uuid.uuid4().hex[:8]}"
        )
        self.client.max_inflight_messages_set(0)  # no limit: the worker's receive maximum is
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.on_disconnect = self._lost
        self.client.connect(mqtt.host, mqtt.port)
        self.client.loop_start()
        assert self._connected.wait(10), f"{name}: no connection to the broker"

    def send(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        if info.rc == paho.MQTT_ERR_NO_CONN:
            # Queued all the same, and sent on the next connection: its PUBACK then is
            # what counts, which is_published() reports only without this code.
            info.rc = paho.MQTT_ERR_SUCCESS
        with self._lock:
            self._pending.append((info, payload))
            if len(self._pending) > 5000:
                self._pending = deque(p for p in self._pending if not p[0].is_published())

    def _lost(self, *_: Any) -> None:
        # Whatever had no PUBACK goes out again on the next connection; the broker may
        # have had it already.
        with self._lock:
            unacknowledged = [payload for info, payload in self._pending if not info.is_published()]
        self.ledger.mark_at_risk(unacknowledged)

    def settle(self, timeout: float = 120) -> None:
        """Until every message sent so far has its PUBACK."""
        _until_none(self._unacknowledged, "MQTT publishes without PUBACK", timeout)

    def _unacknowledged(self) -> int:
        with self._lock:
            self._pending = deque(p for p in self._pending if not p[0].is_published())
            return len(self._pending)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AmqpSender:
    """Publishes to an org's ``vcp`` exchange with confirms, from an event loop of its own."""

    def __init__(self, org: Org, ledger: Ledger) -> None:
        self.org = org
        self.ledger = ledger
        self.loop = asyncio.new_event_loop()
        self._queue: deque[tuple[str, bytes]] = deque()
        self._wake: asyncio.Event | None = None
        self._outstanding = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),))
        self._thread.daemon = True
        self._thread.start()
        assert self._ready.wait(30), "no AMQP connection for the load"

    def send(self, routing_key: str, body: bytes) -> None:
        with self._lock:
            self._outstanding += 1
        self.loop.call_soon_threadsafe(self._put, routing_key, body)

    def _put(self, routing_key: str, body: bytes) -> None:
        self._queue.append((routing_key, body))
        assert self._wake is not None
        self._wake.set()

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        while not self._stop:
            try:
                connection = await asyncio.wait_for(self.org.connect(), 5)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            try:
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.get_exchange("vcp")
                    self._ready.set()
                    await self._publish(exchange)
            except Exception:
                await asyncio.sleep(0.2)

    async def _publish(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        queue = self._queue
        assert self._wake is not None
        while not self._stop:
            if not queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), 500))]
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                            key,
                        )
                        for key, body in batch
                    ),
                    return_exceptions=True,
                ),
                30,
            )
            failed = [
                m for m, r in zip(batch, results, strict=True) if isinstance(r, BaseException)
            ]
            with self._lock:
                self._outstanding -= len(batch) - len(failed)
            if failed:
                # Not confirmed: sent again once the broker is back (it may have them).
                self.ledger.mark_at_risk(body for _, body in failed)
                queue.extendleft(reversed(failed))
                raise ConnectionError("publishes not confirmed")

    def settle(self, timeout: float = 120) -> None:
        """Until the broker confirmed every message sent so far."""
        _until_none(lambda: self._outstanding, "AMQP publishes unconfirmed", timeout)

    def close(self) -> None:
        self._stop = True
        self.loop.call_soon_threadsafe(lambda: self._wake.set() if self._wake else None)
        self._thread.join(10)


def _until_none(left: Callable[[], int], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while count := left():
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} {what} after {timeout:.0f}s")
        time.sleep(0.05)


class Load:
    """VEN, CPI and Voke messages at fixed rates (messages a second), until paused."""

    def __init__(
        self,
        traffic: Traffic,
        ledger: Ledger,
        send: Callable[[str, str, bytes], None],
        rates: dict[str, float],
    ) -> None:
        self.traffic = traffic
        self.ledger = ledger
        self._send = send
        self.rates = rates
        self._made = dict.fromkeys(rates, 0)
        self._running = threading.Event()
        self._idle = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def valid(self, adapter: str, n: int) -> bytes:
        """Make valid message ``n`` of ``adapter``, record it in the ledger, send it; its
        bytes."""
        doc = self.traffic.make(adapter, n)
        payload = doc.encode()
        self.ledger.record(adapter, doc.topic, payload, time.time())
        self._send(adapter, doc.topic, payload)
        return payload

    def _run(self) -> None:
        while not self._closed:
            if not self._running.is_set():
                self._idle.set()
                self._running.wait(0.5)
                continue
            start = time.monotonic()
            done = dict.fromkeys(self.rates, 0)
            while self._running.is_set() and not self._closed:
                elapsed = time.monotonic() - start
                for adapter, rate in self.rates.items():
                    while done[adapter] < int(elapsed * rate):
                        self.valid(adapter, self._made[adapter])
                        self._made[adapter] += 1
                        done[adapter] += 1
                time.sleep(0.005)

    def resume(self) -> None:
        self._idle.clear()
        self._running.set()

    def pause(self) -> None:
        """Make nothing more (the brokers' confirmations are the senders' to wait for)."""
        self._running.clear()
        assert self._idle.wait(10), "the load did not stop"

    def close(self) -> None:
        self._closed = True
        self._running.set()
        self._thread.join(10)
