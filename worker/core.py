"""The worker: source traffic in, canonical bus and historians out, nothing lost.

Two MQTT connections, both with persistent sessions so that the broker queues what
arrives while the worker is away:

- ``<client_id>-src`` (aiomqtt): QoS 1 subscriptions to every adapter's source and
  command filters, acknowledged by hand (see docs/worker.md for why and how), the
  worker's status topic and its last will.
- ``<client_id>-bus`` (:class:`BusClient`): every publish, and the bus-ingest
  subscription with No Local, so the worker never ingests its own canonical messages.

A source message is acknowledged once its publishes have their PUBACKs and its rows are
committed or in the outbox (:mod:`.acks`), in arrival order.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple

import aiomqtt
import msgspec
from energybus.adapters import Pipeline, Rejection, create_adapter
from energybus.historian import Historian, Outbox
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from energybus.errors import EnergyBusError
from energybus.filters import matches
from energybus.rows import historian_row, to_row
from energybus.topics import build_topic

from .acks import AckQueue, Entry
from .bus import BusClient, BusError, Received
from .config import Config
from .logs import StateLog
from .metrics import Metrics
from .sink import HistorianSink

__all__ = ["Plan", "Worker", "run_worker"]

log = logging.getLogger("energybus.worker")
_encode: Final = msgspec.json.Encoder().encode
_ROUTE_CACHE: Final = 100_000


class _DeadLetter(msgspec.Struct, omit_defaults=True):
    reason: str
    message: str
    source: str
    topic: str
    received_at: datetime
    worker: str
    path: str | None = None
    payload: str | None = None
    payload_base64: str | None = None


class _Entity:
    __slots__ = ("metrics", "online", "seen")

    def __init__(self) -> None:
        self.metrics: set[str] = set()
        self.online = True
        self.seen = 0.0


class _Probe:
    """The token of a message's last publish: PUBACKs arrive in order, so its PUBACK
    ends the message's publish latency."""

    __slots__ = ("born", "entry", "histogram")

    def __init__(self, entry: Entry, born: float, histogram: Any) -> None:
        self.entry = entry
        self.born = born
        self.histogram = histogram

    def release(self) -> None:
        self.histogram.observe(time.perf_counter() - self.born)
        self.entry.release()


class _CommandSent:
    """The token of a command's publish: its PUBACK moves the record to ``sent``."""

    __slots__ = ("command_id", "entry", "pipeline", "sink")

    def __init__(self, entry: Entry, pipeline: Pipeline, command_id: str, sink: Any) -> None:
        self.entry = entry
        self.pipeline = pipeline
        self.command_id = command_id
        self.sink = sink

    def release(self) -> None:
        record = self.pipeline.adapter.commands.sent(self.command_id, datetime.now(UTC))
        if record is not None:
            self.sink.add((), [record], None)
        self.entry.release()


class _Backoff:
    def __init__(self, low: float, high: float) -> None:
        self.low, self.high, self.attempt = low, high, 0

    def next(self) -> float:
        delay = min(self.high, self.low * 2**self.attempt)
        self.attempt += 1
        return float(delay * random.uniform(0.5, 1.0))  # jitter: workers do not reconnect in step

    def reset(self) -> None:
        self.attempt = 0


class Plan(NamedTuple):
    """What a configuration makes the worker do; ``energybus check`` prints it."""

    adapters: list[tuple[str, list[str], list[str]]]
    """(adapter, source filters, command filters), as subscribed (with ``$share``)."""
    ingest: list[str]
    status_topic: str
    dead_letter_prefix: str


class Worker:
    @staticmethod
    def plan(config: Config, pipelines: dict[str, Pipeline] | None = None) -> Plan:
        w, m = config.worker, config.mqtt
        if pipelines is None:
            pipelines = {
                name: Pipeline(create_adapter(name, options=options))
                for name, options in config.adapters.items()
            }
        share = f"$share/{w.shared_group}/" if w.shared_group else ""
        return Plan(
            adapters=[
                (
                    name,
                    [share + f for f in p.adapter.source_filters],
                    [share + f for f in p.adapter.command_filters],
                )
                for name, p in pipelines.items()
            ],
            ingest=[share + f for f in w.bus_ingest],
            status_topic=f"{w.topic_prefix}/worker/{m.client_id}/status",
            dead_letter_prefix=f"{w.topic_prefix}/dead_letter",
        )

    def __init__(self, config: Config) -> None:
        self.config = config
        w, h = config.worker, config.historian
        self.metrics = Metrics()
        self.pipelines = {
            name: Pipeline(create_adapter(name, options=options))
            for name, options in config.adapters.items()
        }
        plan = self.plan(config, self.pipelines)
        self.status_topic = plan.status_topic
        self.dead_letter_prefix = plan.dead_letter_prefix
        self.source_filters = [
            f for _, sources, commands in plan.adapters for f in sources + commands
        ]
        self.ingest_filters = plan.ingest
        self._routes = [
            (f, p)
            for p in self.pipelines.values()
            for f in (*p.adapter.source_filters, *p.adapter.command_filters)
        ]
        self._route_cache: dict[str, Pipeline | None] = {}
        self._counters = {
            name: (
                self.metrics.messages_in.labels(name),
                self.metrics.samples_out.labels(name),
                self.metrics.suppressed.labels(name),
            )
            for name in self.pipelines
        }
        self._suppressed = dict.fromkeys(self.pipelines, 0)
        """Each renderer's dedupe count when last exported, to add only the difference."""
        self.historian = Historian(h.dsn.get_secret_value()) if h.dsn is not None else None
        self.outbox = Outbox(
            w.data_dir / "outbox.sqlite3", max_bytes=int(h.outbox_max_mb * 1024 * 1024)
        )
        self.sink = HistorianSink(
            historian=self.historian,
            outbox=self.outbox,
            metrics=self.metrics,
            batch_rows=h.batch_rows,
            interval_s=h.batch_interval_s,
            retry_s=h.retry_s,
        )
        self.bus: BusClient | None = None
        self._bus_up = asyncio.Event()
        self._bus_acks: AckQueue | None = None
        self._source_acks: AckQueue | None = None
        self._source: aiomqtt.Client | None = None
        self._redelivered: set[tuple[str, bytes]] = set()
        self._entities: dict[tuple[str, str, str], _Entity] = {}
        self._stop = asyncio.Event()
        self._consuming = True

    # Running ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        w = self.config.worker
        if w.metrics_port is not None:
            self.metrics.serve(w.metrics_host, w.metrics_port)
        if self.outbox:
            log.info(
                "outbox holds %d rows from an earlier run; replaying them first", self.outbox.rows
            )
        await self._declare_counters()
        tasks = [
            asyncio.create_task(self.sink.run(), name="historian"),
            asyncio.create_task(self._bus_loop(), name="bus"),
            asyncio.create_task(self._source_loop(), name="source"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and task.exception() is not None:
                log.error("worker task %s failed", task.get_name(), exc_info=task.exception())
                self._stop.set()
        log.info("stopping: no new messages; flushing")
        await self._shutdown(tasks)
        return 0

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        self._consuming = False
        timeout = self.config.worker.shutdown_timeout_s
        deadline = time.monotonic() + timeout
        stored = await self.sink.flush(timeout)
        bus = self.bus
        while bus is not None and bus.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not stored or (bus is not None and bus.inflight):
            log.warning(
                "shutdown timeout: some messages stay unacknowledged; the broker redelivers them"
            )
        await asyncio.sleep(0.05)  # let the last acknowledgements leave
        source = self._source
        if source is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    source.publish(self.status_topic, b"offline", qos=1, retain=True), 5
                )
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if bus is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(bus.disconnect(), 5)
        if self.historian is not None:
            await self.historian.close()
        self.outbox.close()
        log.info("stopped")

    async def _declare_counters(self) -> None:
        counters = self.config.historian.counters
        if not counters or self.historian is None:
            return
        rows = [(c.site, c.device, c.metric, c.wrap_at, c.max_rate) for c in counters]
        try:
            await self.historian.declare_counters(rows)
        except Exception as error:
            log.warning("counter declarations not stored yet (%s); retried at next start", error)

    # Connections ------------------------------------------------------------------------

    async def _bus_loop(self) -> None:
        m = self.config.mqtt
        backoff = _Backoff(m.reconnect_min_s, m.reconnect_max_s)
        state = StateLog(logging.getLogger("energybus.worker.bus"))
        previous: BusClient | None = None
        first = True
        while True:
            client = BusClient(
                on_message=self._on_bus_message,
                on_puback=self._on_puback,
                max_inflight=m.max_inflight,
            )
            acks = AckQueue(client.ack)
            if self._bus_acks is not None:
                acks.after(self._bus_acks)
            self._bus_acks = acks
            try:
                await client.connect(
                    host=m.host,
                    port=m.port,
                    client_id=f"{m.client_id}-bus",
                    username=m.username,
                    password=m.password.get_secret_value() if m.password else None,
                    tls=m.tls.context() if m.tls else None,
                    keepalive=m.keepalive_s,
                    session_expiry=m.session_expiry_s,
                    receive_maximum=m.receive_maximum,
                )
                if previous is not None:
                    resent = client.resend(previous)
                    if resent:
                        log.info("bus: resent %d publishes that had no PUBACK", resent)
                await client.subscribe(self.ingest_filters)
            except (OSError, BusError, TimeoutError) as error:
                client.abort()
                self.metrics.connected.labels("bus").set(0)
                state.change("down", logging.WARNING, "bus: cannot connect: %s", error)
                await asyncio.sleep(backoff.next())
                continue
            if not first:
                self.metrics.reconnects.labels("bus").inc()
            first = False
            backoff.reset()
            self.bus = client
            self._bus_up.set()
            self.metrics.connected.labels("bus").set(1)
            state.change(
                "up", logging.INFO, "bus: connected to %s:%d as %s-bus", m.host, m.port, m.client_id
            )
            reason = await asyncio.shield(client.closed)
            self._bus_up.clear()
            self.metrics.connected.labels("bus").set(0)
            previous = client
            state.change("down", logging.WARNING, "bus: connection lost: %s", reason)
            await asyncio.sleep(backoff.next())

    def _source_client(self) -> aiomqtt.Client:
        m = self.config.mqtt
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
        # aiomqtt 2.x has no manual-ack option; paho's is reached through the client it
        # wraps. Pinned in pyproject and held by tests/test_worker_acks.py.
        client._client.manual_ack_set(True)
        return client

    async def _source_loop(self) -> None:
        m = self.config.mqtt
        backoff = _Backoff(m.reconnect_min_s, m.reconnect_max_s)
        state = StateLog(logging.getLogger("energybus.worker.source"))
        first = True
        while self._consuming:
            await self._bus_up.wait()
            client = self._source_client()
            paho = client._client
            acks = AckQueue(lambda mid, paho=paho: paho.ack(mid, 1))  # type: ignore[misc]
            try:
                async with client:
                    if self._source_acks is not None:
                        self._redelivered = self._source_acks.pending_keys()
                        acks.after(self._source_acks)
                    self._source_acks = acks
                    self._source = client
                    await client.publish(self.status_topic, b"online", qos=1, retain=True)
                    await client.subscribe(
                        [(f, SubscribeOptions(qos=1)) for f in self.source_filters]
                    )
                    if not first:
                        self.metrics.reconnects.labels("source").inc()
                    first = False
                    backoff.reset()
                    self.metrics.connected.labels("source").set(1)
                    state.change(
                        "up",
                        logging.INFO,
                        "source: connected to %s:%d as %s-src, %d filters",
                        m.host,
                        m.port,
                        m.client_id,
                        len(self.source_filters),
                    )
                    await self._consume(client, acks)
                    if not self._consuming or self._stop.is_set():
                        await asyncio.Event().wait()  # shutdown disconnects by cancelling
            except aiomqtt.MqttError as error:
                self._source = None
                self.metrics.connected.labels("source").set(0)
                state.change("down", logging.WARNING, "source: connection lost: %s", error)
                await asyncio.sleep(backoff.next())

    async def _consume(self, client: aiomqtt.Client, acks: AckQueue) -> None:
        messages = client.messages
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while self._consuming and not self._stop.is_set():
                bus = self.bus
                if bus is None or not self._bus_up.is_set():
                    await self._bus_up.wait()
                    continue
                if not bus.room:
                    await bus.wait_room()
                    continue
                pending = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait((pending, stop), return_when=asyncio.FIRST_COMPLETED)
                if pending not in done:
                    pending.cancel()
                    return
                message = pending.result()
                self.handle_source(
                    message.topic.value, message.payload, message.qos, message.retain,
                    message.mid, acks, bus,
                )  # fmt: skip
        finally:
            stop.cancel()

    # Per message ------------------------------------------------------------------------

    def _route(self, topic: str) -> Pipeline | None:
        cache = self._route_cache
        if topic in cache:
            return cache[topic]
        found = next((p for f, p in self._routes if matches(f, topic)), None)
        if len(cache) >= _ROUTE_CACHE:
            cache.clear()
        cache[topic] = found
        return found

    def handle_source(
        self,
        topic: str,
        payload: Any,
        qos: int,
        retain: bool,
        mid: int,
        acks: AckQueue,
        bus: BusClient,
    ) -> None:
        born = time.perf_counter()
        payload = bytes(payload)
        key = (topic, payload)
        entry = acks.add(mid if qos else 0, key)
        if key in self._redelivered:
            # Redelivered after a reconnect while the first delivery's work is still in
            # flight: the barrier in ``acks`` acknowledges it once that work is done.
            self._redelivered.discard(key)
            entry.release()
            return
        now = datetime.now(UTC)
        pipeline = self._route(topic)
        if pipeline is None:
            self._dead_letter(
                bus, entry, "router", topic, payload, now,
                Rejection(code="unrouted", message="no adapter consumes this topic", topic=topic),
            )  # fmt: skip
            bus.flush()
            entry.release()
            return
        name = pipeline.adapter.name
        messages_in, samples_out, suppressed_out = self._counters[name]
        messages_in.inc()
        try:
            out = pipeline.feed(topic, payload, received_at=now, retain=retain)
        except Exception:  # an adapter bug must not stop the worker or lose the message
            log.exception("adapter %s failed on a message from %s", name, topic)
            out = None
        if out is None:
            self._dead_letter(
                bus, entry, name, topic, payload, now,
                Rejection(code="adapter_error", message="the adapter failed; see the log",
                          topic=topic),
            )  # fmt: skip
            bus.flush()
            entry.release()
            return
        for rejection in out.rejections:
            self._dead_letter(bus, entry, name, topic, payload, now, rejection)
        publish = bus.publish
        messages = out.messages
        if messages:
            if out.commands and pipeline.is_command(topic):
                for message in messages:
                    entry.hold()
                    sent = _CommandSent(entry, pipeline, out.commands[0].id, self.sink)
                    publish(message.topic, message.payload, message.qos, message.retain, sent)
            else:
                last = len(messages) - 1
                for index, message in enumerate(messages):
                    if message.qos:
                        entry.hold()
                        token: Any = (
                            entry
                            if index < last
                            else _Probe(entry, born, self.metrics.publish_latency)
                        )
                    else:
                        token = None
                    publish(message.topic, message.payload, message.qos, message.retain, token)
            self.metrics.published.inc(len(messages))
        samples = out.samples
        if samples:
            samples_out.inc(len(samples))
            self._seen(samples, bus)
            if self.historian is not None:
                self.sink.add([to_row(s) for s in samples], out.commands, entry)
        elif out.commands and self.historian is not None:
            self.sink.add((), out.commands, entry)
        suppressed = pipeline.renderer.suppressed
        if suppressed != self._suppressed[name]:
            suppressed_out.inc(suppressed - self._suppressed[name])
            self._suppressed[name] = suppressed
        bus.flush()
        entry.release()

    def _on_bus_message(self, received: Received) -> None:
        """Canonical traffic from other publishers: validate, then into the historians."""
        if not self._consuming:
            return  # not acknowledged: the broker redelivers it to the next run
        acks = self._bus_acks
        assert acks is not None
        entry = acks.add(received.packet_id)
        now = datetime.now(UTC)
        try:
            row = historian_row(received.topic, received.payload, received_at=now)
        except EnergyBusError as error:
            bus = self.bus
            if bus is not None:
                self._dead_letter(
                    bus, entry, "bus", received.topic, received.payload, now,
                    Rejection.of(error, received.topic),
                )  # fmt: skip
            entry.release()
            return
        if row is not None and self.historian is not None:
            self.sink.add([row], (), entry)
        entry.release()

    def _on_puback(self, token: Any, reason: int) -> None:
        if reason >= 0x80:
            self.metrics.publish_failures.labels(f"0x{reason:02x}").inc()
        if token is not None:
            token.release()

    def _dead_letter(
        self,
        bus: BusClient,
        entry: Entry | None,
        source: str,
        topic: str,
        payload: bytes,
        now: datetime,
        rejection: Rejection,
    ) -> None:
        self.metrics.rejections.labels(source, rejection.code).inc()
        try:
            text: str | None = payload.decode("utf-8")
            raw = None
        except UnicodeDecodeError:
            text, raw = None, base64.b64encode(payload).decode()
        letter = _DeadLetter(
            reason=rejection.code,
            message=rejection.message,
            source=source,
            topic=topic,
            received_at=now,
            worker=self.config.mqtt.client_id,
            path=rejection.path,
            payload=text,
            payload_base64=raw,
        )
        if entry is not None:
            entry.hold()
        bus.publish(f"{self.dead_letter_prefix}/{source}", _encode(letter), 1, False, entry)
        log.debug("dead letter from %s: %s (%s)", topic, rejection.code, rejection.message)

    # Availability -----------------------------------------------------------------------

    def _seen(self, samples: list[Any], bus: BusClient) -> None:
        now = time.monotonic()
        entities = self._entities
        for sample in samples:
            key = (sample.site, sample.entity_type, sample.entity_id)
            entity = entities.get(key)
            if entity is None:
                entity = entities[key] = _Entity()
            entity.seen = now
            if not entity.online:
                entity.online = True
                self._availability(bus, key, entity.metrics, b"online")
            if sample.metric not in entity.metrics:
                entity.metrics.add(sample.metric)
                self._availability(bus, key, (sample.metric,), b"online")

    def _availability(
        self, bus: BusClient, key: tuple[str, str, str], metrics: Any, state: bytes
    ) -> None:
        site, entity_type, entity_id = key
        for metric in metrics:
            topic = build_topic(site, entity_type, entity_id, metric, "availability")
            bus.publish(topic, state, 1, True, None)

    async def _housekeeping(self) -> None:
        timeout = self.config.worker.availability_timeout_s
        period = min(5.0, timeout / 4)
        freshness = self.metrics.freshness
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            bus = self.bus if self._bus_up.is_set() else None
            for key, entity in self._entities.items():
                age = now - entity.seen
                freshness.labels(key[0], f"{key[1]}.{key[2]}").set(age)
                if entity.online and age > timeout and bus is not None:
                    entity.online = False
                    self._availability(bus, key, entity.metrics, b"offline")
            wall = datetime.now(UTC)
            for pipeline in self.pipelines.values():
                expired = pipeline.expire(wall).commands
                if expired and self.historian is not None:
                    self.sink.add((), expired, None)
            if bus is not None:
                bus.flush()


def run_worker(config: Config, *, on_ready: Callable[[Worker], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT; the exit status."""

    async def main() -> int:
        worker = Worker(config)
        if on_ready is not None:
            on_ready(worker)
        return await worker.run()

    return asyncio.run(main())
