"""The dispatcher: what happens to every delivered message, whatever its source.

Route it to its adapter's pipeline (by topic for the MQTT source, by source for a
source bound to one adapter), translate it, publish the result on the bus with a
token per QoS 1 publish, dead-letter every refusal, hand the readings to the historian
sink and availability, and count it. It never awaits and never raises on a message: an
adapter bug becomes a dead letter (``worker_error``) and a log line.

Its bus side is a :class:`Publisher`, its historian side a :class:`RowSink`; both are
protocols so that tests drive the dispatcher without a broker or a database.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from energybus.adapters import Pipeline, Rejection
from energybus.commands import CommandRecord
from energybus.errors import EnergyBusError
from energybus.filters import matches
from energybus.messages import Message
from energybus.payloads import too_large
from energybus.rows import Row, historian_row
from energybus.samples import Reading

from .acks import Entry
from .availability import Availability
from .bus import BusError, reason_text
from .config import site_member
from .deadletter import dead_letter
from .metrics import Metrics
from .series import SeriesBound
from .sources.base import CommandToken, Delivery

__all__ = ["Dispatcher", "Outlet", "Publisher", "RowSink"]

log = logging.getLogger("energybus.worker")
_ROUTE_CACHE: Final = 100_000
_REFUSED_LOG_EVERY_S: Final = 60.0


class Publisher(Protocol):
    """The bus connection as the dispatcher uses it (:class:`~.bus.BusClient`)."""

    @property
    def room(self) -> bool: ...

    async def wait_room(self) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, token: Any) -> None: ...

    def flush(self) -> None: ...

    def flush_soon(self) -> None: ...


class RowSink(Protocol):
    """The historian side (:class:`~.sink.HistorianSink`): holds ``entry`` until the
    rows of ``readings`` and ``rows``, and the records, are committed or in the outbox."""

    def add(
        self,
        readings: Sequence[Reading],
        commands: Sequence[CommandRecord],
        entry: Entry | None,
        rows: Sequence[Row] = (),
    ) -> None: ...


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

    def __init__(
        self, entry: Entry, pipeline: Pipeline, command_id: str, sink: RowSink | None
    ) -> None:
        self.entry = entry
        self.pipeline = pipeline
        self.command_id = command_id
        self.sink = sink

    def release(self) -> None:
        record = self.pipeline.command_sent(self.command_id, datetime.now(UTC))
        if record is not None and self.sink is not None:
            self.sink.add((), [record], None)
        self.entry.release()

    def fail(self, reason: str) -> None:
        """The command was surely not sent (its source is down, or the broker returned
        it): it is rejected with ``reason``, stored, and its ``set`` acknowledged."""
        record = self.pipeline.command_failed(self.command_id, reason)
        if record is not None:
            log.warning("command %s rejected: %s", self.command_id, reason)
            if self.sink is not None:
                self.sink.add((), [record], None)
        self.entry.release()

    def uncertain(self, reason: str) -> None:
        """Whether the broker took the command cannot be known: its record waits for
        the answer, or expires; its ``set`` is acknowledged (sending the command again
        could run it twice)."""
        log.warning("command %s: %s", self.command_id, reason)
        self.entry.release()


class Outlet(Protocol):
    """A source connection that carries an adapter's commands (an AMQP source)."""

    def publish(self, message: Message, token: CommandToken) -> None: ...


class Dispatcher:
    """Handles deliveries from every source; also the sources' :class:`Gate`."""

    def __init__(
        self,
        *,
        pipelines: dict[str, Pipeline],
        sink: RowSink | None,
        metrics: Metrics,
        availability: Availability,
        dead_letter_prefix: str,
        worker_id: str,
        member: tuple[int, int] | None = None,
        series: SeriesBound | None = None,
        ingest_series: SeriesBound | None = None,
        max_ingest_bytes: int | None = None,
    ) -> None:
        self.pipelines = pipelines
        self.series = series
        """The bound on series per site the pipelines' renderers ask for theirs."""
        self.ingest_series = ingest_series if ingest_series is not None else series
        """The bus ingest's bound, asked here: a budget of its own, so that a flood of
        invented series on the bus (any publisher can invent sites there) cannot take
        the room of the sources' series (default: ``series``)."""
        self.max_ingest_bytes = max_ingest_bytes
        """``worker.max_payload_bytes``: the largest canonical message ingested (``None``:
        any, for a dispatcher driven without a configuration)."""
        self.member = member
        """``(index, count)`` in a partitioned group: messages about other members' sites
        are acknowledged and left to them. That holds for every ``set`` and for the source
        messages of adapters whose sources are MQTT topics, which every member receives;
        the messages of a connection of an adapter's own (an AMQP account, a Modbus
        device) reach only the member that configures it, whose sites they are about
        (the configuration is refused otherwise: ``Adapter.connected_sites``)."""
        self._partitioned = {
            name
            for name, pipeline in pipelines.items()
            if any(d.transport == "mqtt" for d in pipeline.sources)
        }
        self.sink = sink
        self.metrics = metrics
        self.availability = availability
        self.dead_letter_prefix = dead_letter_prefix
        self.worker_id = worker_id
        self.bus: Publisher | None = None
        self._up = asyncio.Event()
        self._filters: dict[str, list[tuple[str, Pipeline]]] = {}
        self._bound: dict[str, Pipeline] = {}
        self._outlets: dict[str, Outlet] = {}
        self._cache: dict[tuple[str, str], Pipeline | None] = {}
        self._refused: dict[int, tuple[int, float]] = {}
        """Per refusal reason: refusals not logged yet, and when the last was logged."""
        self._counters = {
            name: (
                metrics.messages_in.labels(name),
                metrics.samples_out.labels(name),
                metrics.suppressed.labels(name),
            )
            for name in pipelines
        }

    # Set-up -----------------------------------------------------------------------------

    def route(self, source: str, filters: Sequence[str], pipeline: Pipeline) -> None:
        """Messages of ``source`` on topics matching ``filters`` go to ``pipeline``."""
        self._filters.setdefault(source, []).extend((f, pipeline) for f in filters)

    def bind(self, source: str, pipeline: Pipeline) -> None:
        """Every message of ``source`` goes to ``pipeline`` (a queue or device source)."""
        self._bound[source] = pipeline

    def outlet(self, destination: str, outlet: Outlet) -> None:
        """Command messages for ``destination`` (an AMQP routing key) go to ``outlet``,
        not to the bus."""
        self._outlets[destination] = outlet

    def use(self, bus: Publisher) -> None:
        """Publish through ``bus`` from now on (a new connection, not yet subscribed:
        the gate stays as it is, so sources hand over nothing yet)."""
        self.bus = bus

    def attach(self, bus: Publisher) -> None:
        """The bus is connected and subscribed: open the gate."""
        self.bus = bus
        self._up.set()

    def detach(self) -> None:
        """The bus is gone: close the gate; sources hold what they have."""
        self._up.clear()

    # The gate ---------------------------------------------------------------------------

    def is_open(self) -> bool:
        bus = self.bus
        return bus is not None and self._up.is_set() and bus.room

    async def wait_open(self) -> None:
        """Until the gate may be open; the caller checks :meth:`is_open` again."""
        bus = self.bus
        if bus is None or not self._up.is_set():
            await self._up.wait()
            return
        try:
            await bus.wait_room()
        except BusError:
            # Lost while full: the connection's loop detaches it in a moment.
            await asyncio.sleep(0.01)

    # Per message ------------------------------------------------------------------------

    def _pipeline(self, source: str, topic: str) -> Pipeline | None:
        bound = self._bound.get(source)
        if bound is not None:
            return bound
        key = (source, topic)
        cache = self._cache
        if key in cache:
            return cache[key]
        found = None
        for f, pipeline in self._filters.get(source, ()):
            if not matches(f, topic):
                continue
            if found is None:
                found = pipeline
            elif pipeline is not found and topic.endswith("/set"):
                # Several adapters take this set (CPI and Voke plants share metrics): it
                # goes to the one that knows its device (an adapter that does not say
                # claims none), else to the first, which refuses it. Not cached: a device
                # may become known later (a VEN, when it reports).
                return next(
                    (
                        p
                        for _, p in self._filters[source]
                        if p.knows_target(topic) and p.is_command(topic)
                    ),
                    found,
                )
        if len(cache) >= _ROUTE_CACHE:
            cache.clear()
        cache[key] = found
        return found

    def handle(self, delivery: Delivery) -> None:
        """Translate and hand on one message; releases the delivery's entry. Never
        raises: a defect anywhere on the way is logged and the message dead-lettered
        (``worker_error``), so no message can stop a source or come back to do it again."""
        try:
            self._handle(delivery)
        except Exception:  # an adapter's or the worker's defect: logged, never fatal
            try:  # routing asks adapters (knows_target), and may be what failed
                pipeline = self._pipeline(delivery.source, delivery.topic)
            except Exception:
                pipeline = None
            source = pipeline.name if pipeline is not None else "router"
            log.exception("%s failed on a message from %s", source, delivery.topic)
            self._fail(delivery.entry, source, delivery.topic, delivery.payload)

    def _fail(self, entry: Entry, source: str, topic: str, payload: bytes) -> None:
        rejection = Rejection(
            code="worker_error",
            message="handling this message failed (a defect); see the log",
            topic=topic,
        )
        try:
            self.dead_letter(entry, source, topic, payload, datetime.now(UTC), [rejection])
            if self.bus is not None:
                self.bus.flush()
        finally:
            entry.release()

    def _handle(self, delivery: Delivery) -> None:
        born = time.perf_counter()
        bus = self.bus
        entry = delivery.entry
        topic, payload, now = delivery.topic, delivery.payload, delivery.received_at
        assert bus is not None, "a source delivered while the gate was closed"
        pipeline = self._pipeline(delivery.source, topic)
        if pipeline is None:
            rejection = Rejection(
                code="unrouted", message="no adapter consumes this topic", topic=topic
            )
            self.dead_letter(entry, "router", topic, payload, now, [rejection])
            bus.flush()
            entry.release()
            return
        if (
            self.member is not None
            and (pipeline.name in self._partitioned or pipeline.is_command(topic))
            and not self._mine(pipeline, delivery)
        ):
            self.metrics.elsewhere.labels(pipeline.name).inc()
            entry.release()
            return
        name = pipeline.name
        messages_in, samples_out, suppressed_out = self._counters[name]
        messages_in.inc()
        out = pipeline.feed(topic, payload, received_at=now, retain=delivery.retain)
        if out.rejections:
            self.dead_letter(entry, name, topic, payload, now, out.rejections)
            if delivery.retain and out.rejections[0].code == "retained_set":
                # Delete it at the broker, once, so it fires nowhere later (the deletion
                # comes back as an empty retained set, which the pipeline ignores).
                bus.publish(topic, b"", 1, True, None)
                log.info("clearing the retained set on %s at the broker", topic)
        for record in out.commands:
            if record.state == "refused":
                self.metrics.command_refusals.labels(name, record.code or "").inc()
        publish = bus.publish
        messages = out.messages
        if messages:
            if out.commands and pipeline.is_command(topic):
                command_id = out.commands[0].id
                for message in messages:
                    entry.hold()
                    sent = _CommandSent(entry, pipeline, command_id, self.sink)
                    outlet = self._outlets.get(message.topic)
                    if outlet is not None:
                        outlet.publish(message, sent)
                    elif message.topic in pipeline.destinations:
                        # Declared for a source connection the worker does not have: it
                        # must not leave on the bus instead.
                        sent.fail(f"no connection carries commands to {message.topic}")
                    else:
                        publish(message.topic, message.payload, message.qos, message.retain, sent)
            else:
                # The broker acknowledges QoS 1 publishes in the order it received them
                # (MQTT 5, 4.6), and a resend keeps that order: the PUBACK of the
                # message's last QoS 1 publish is also that of every one before it, so
                # only that publish carries a token.
                probe = len(messages) - 1
                while probe >= 0 and not messages[probe].qos:
                    probe -= 1
                for index, message in enumerate(messages):
                    token: Any = None
                    if index == probe:
                        entry.hold()
                        token = _Probe(entry, born, self.metrics.publish_latency)
                    publish(message.topic, message.payload, message.qos, message.retain, token)
            self.metrics.published.inc(len(messages))
        readings = out.readings
        sink = self.sink
        if readings:
            samples_out.inc(out.values)
            self.availability.seen(readings, self._publish_availability)
            if sink is not None:
                sink.add(readings, out.commands, entry)
        elif out.commands and sink is not None:
            sink.add((), out.commands, entry)
        if out.unavailable:
            self.availability.gone(out.unavailable, self._publish_availability)
        suppressed = pipeline.take_suppressed()
        if suppressed:
            suppressed_out.inc(suppressed)
        bus.flush_soon()
        entry.release()

    def _mine(self, pipeline: Pipeline, delivery: Delivery) -> bool:
        """Whether this member handles the message's site (:func:`.config.site_member`)."""
        assert self.member is not None
        index, count = self.member
        return site_member(pipeline.site_of(delivery.topic, delivery.payload), count) == index

    def ingest(self, topic: str, payload: bytes, entry: Entry) -> None:
        """Canonical traffic from other publishers: validate, then into the historians.
        Never raises, like :meth:`handle`."""
        now = datetime.now(UTC)
        try:
            limit = self.max_ingest_bytes
            if limit is not None and len(payload) > limit:
                raise too_large(len(payload), limit, prefix="worker.")
            row = historian_row(topic, payload, received_at=now)
            if row is not None and self.ingest_series is not None:
                # After the row is made: a message refused for what it is takes no
                # place in the bound.
                self.ingest_series.admit_row(row.site, row.device_id, row.metric_name)
        except EnergyBusError as error:
            self.dead_letter(entry, "bus", topic, payload, now, [Rejection.of(error, topic)])
            entry.release()
            return
        except Exception:
            log.exception("failed on a bus message on %s", topic)
            self._fail(entry, "bus", topic, payload)
            return
        if row is not None and self.sink is not None:
            self.sink.add((), (), entry, (row,))
        entry.release()

    def on_puback(self, token: Any, reason: int) -> None:
        if reason >= 0x80:
            self.metrics.publish_failures.labels(f"0x{reason:02x}").inc()
        if token is not None:
            token.release()

    def on_refused(self, topic: str, reason: int) -> None:
        """A publish the broker refused (an ACL that does not allow the topic, most
        often) is final: counted by :meth:`on_puback`, its rows still stored, its source
        message acknowledged, and said in the log at most once a minute per reason, so
        that a wrong ACL is seen without a line per sample."""
        now = time.monotonic()
        count, since = self._refused.get(reason, (0, 0.0))
        if now - since < _REFUSED_LOG_EVERY_S:
            self._refused[reason] = (count + 1, since)
            return
        self._refused[reason] = (0, now)
        more = f" ({count} more since the last report)" if count else ""
        log.warning(
            "bus: the broker refused a publish on %s: %s%s; not sent again (check the"
            " worker's ACL, docs/security.md)",
            topic,
            reason_text(reason),
            more,
        )

    def dead_letter(
        self,
        entry: Entry | None,
        source: str,
        topic: str,
        payload: bytes,
        now: datetime,
        rejections: Sequence[Rejection],
    ) -> None:
        """One dead letter for the message, whatever number of refusals it had; each
        refusal is counted."""
        bus = self.bus
        assert bus is not None
        for rejection in rejections:
            self.metrics.rejections.labels(source, rejection.code).inc()
        letter = dead_letter(
            rejections,
            source=source,
            topic=topic,
            payload=payload,
            received_at=now,
            worker=self.worker_id,
        )
        if entry is not None:
            entry.hold()
        bus.publish(f"{self.dead_letter_prefix}/{source}", letter, 1, False, entry)
        first = rejections[0]
        log.debug("dead letter from %s: %s (%s)", topic, first.code, first.message)

    # Housekeeping -----------------------------------------------------------------------

    def _publish_availability(self, topic: str, state: bytes) -> None:
        bus = self.bus
        if bus is not None:
            bus.publish(topic, state, 1, True, None)

    def housekeeping(self, now: datetime) -> None:
        """Expire unanswered commands, report freshness, mark silent entities offline."""
        up = self._up.is_set() and self.bus is not None
        freshness = self.metrics.freshness
        self.availability.sweep(
            self._publish_availability if up else None,
            lambda site, device, age: freshness.labels(site, device).set(age),
        )
        for pipeline in self.pipelines.values():
            expired = pipeline.expire(now).commands
            if expired and self.sink is not None:
                self.sink.add((), expired, None)
        if up and self.bus is not None:
            self.bus.flush()
