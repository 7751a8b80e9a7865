"""The worker: sources in, canonical bus and historians out, nothing lost.

This module only assembles and runs the parts, each in a file of its own:
:mod:`.sources` (the transports that deliver source messages), :mod:`.dispatch` (what
happens to each message), :mod:`.connection` (the bus connection), :mod:`.sink` (the
historian batches and outbox), :mod:`.availability` and :mod:`.deadletter`. A message
is acknowledged to its source once its publishes have their PUBACKs and its rows are
committed or in the outbox (:mod:`.acks`), in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, NamedTuple

from energybus.adapters import (
    AmqpEndpoint,
    ModbusEndpoint,
    Pipeline,
    SourceDeclaration,
    create_adapter,
)
from energybus.errors import MappingError
from energybus.historian import Historian, Outbox
from energybus.render import Renderer

from .acks import Entry
from .availability import Availability
from .bus import Received, user_property
from .config import Config
from .connection import BusConnection
from .dispatch import Dispatcher
from .lasts import read_lasts
from .metrics import Metrics
from .series import SeriesBound
from .sink import HistorianSink
from .sources import AmqpSource, ModbusSource, MqttSource, Source

__all__ = ["Plan", "Worker", "run_worker"]

log = logging.getLogger("energybus.worker")

TRANSPORTS: Final = frozenset({"mqtt", "amqp", "modbus"})
"""The transports this worker has sources for (adapters declare theirs)."""
GROUP_PROPERTY: Final = "energybus-group"
"""The MQTT 5 User Property that marks each publish of a worker in a shared group; its
value is the group's name."""


class Plan(NamedTuple):
    """What a configuration makes the worker do; ``energybus check`` prints it."""

    adapters: list[tuple[str, list[str], list[str]]]
    """(adapter, source filters, command filters), as subscribed (with ``$share``)."""
    ingest: list[str]
    status_topic: str
    dead_letter_prefix: str
    sources: list[tuple[str, str, list[str]]]
    """(adapter, transport, patterns) of every source declaration."""
    connections: list[tuple[str, str, SourceDeclaration]]
    """(adapter, source name, declaration) of every source with a connection of its own
    (an AMQP account)."""
    devices: list[tuple[str, str, SourceDeclaration]]
    """(adapter, source name, declaration) of every polled device (Modbus)."""


def _pipelines(config: Config, series: SeriesBound | None = None) -> dict[str, Pipeline]:
    """The adapters ``load_config`` built, else new ones from the options; their
    renderers ask ``series`` before they keep a series."""
    admit = series.admit if series is not None else None
    return {
        name: Pipeline(
            config.built.get(name) or create_adapter(name, options=options),
            renderer=Renderer(source=name, admit=admit),
        )
        for name, options in config.adapters.items()
    }


class Worker:
    @staticmethod
    def plan(config: Config, pipelines: dict[str, Pipeline] | None = None) -> Plan:
        w, m = config.worker, config.mqtt
        if pipelines is None:
            pipelines = _pipelines(config)
        share = f"$share/{w.shared_group}/" if w.shared_group else ""
        # A member of a partitioned group takes every source message and keeps its own
        # sites' (Dispatcher.handle); only the bus ingest is shared.
        sources = "" if config.member is not None else share
        connections = []
        devices = []
        for name, pipeline in pipelines.items():
            for declaration in pipeline.sources:
                endpoint = declaration.endpoint
                if isinstance(endpoint, AmqpEndpoint):
                    connections.append((name, f"{name}:{endpoint.username}", declaration))
                elif isinstance(endpoint, ModbusEndpoint):
                    devices.append((name, f"{name}:poller", declaration))
                if declaration.transport not in TRANSPORTS:
                    raise MappingError(
                        "unsupported_transport",
                        f"adapter {name} declares a {declaration.transport} source, which this"
                        f" worker cannot consume; it consumes {', '.join(sorted(TRANSPORTS))}",
                        file=config.file,
                        path=f"$.adapters.{name}",
                    )
        return Plan(
            adapters=[
                (
                    name,
                    [sources + f for d in p.sources if d.transport == "mqtt" for f in d.patterns],
                    [sources + f for f in p.command_filters],
                )
                for name, p in pipelines.items()
            ],
            ingest=[share + f for f in w.bus_ingest],
            status_topic=f"{w.topic_prefix}/worker/{m.client_id}/status",
            dead_letter_prefix=f"{w.topic_prefix}/dead_letter",
            sources=[
                (name, d.transport, list(d.patterns))
                for name, p in pipelines.items()
                for d in p.sources
            ],
            connections=connections,
            devices=devices,
        )

    def __init__(self, config: Config) -> None:
        self.config = config
        w, h = config.worker, config.historian
        self.metrics = Metrics()
        self.series = SeriesBound(
            max_series_per_site=w.max_series_per_site, max_series=w.max_series
        )
        ingest_series = SeriesBound(
            max_series_per_site=w.max_series_per_site, max_series=w.max_series
        )
        self.metrics.series_bound(self.series, ingest_series)
        self.pipelines = _pipelines(config, self.series)
        plan = self.plan(config, self.pipelines)
        self.status_topic = plan.status_topic
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
        self.dispatcher = Dispatcher(
            pipelines=self.pipelines,
            sink=self.sink if self.historian is not None else None,
            metrics=self.metrics,
            availability=Availability(timeout_s=w.availability_timeout_s),
            dead_letter_prefix=plan.dead_letter_prefix,
            worker_id=config.mqtt.client_id,
            member=config.member,
            series=self.series,
            ingest_series=ingest_series,
            max_ingest_bytes=w.max_payload_bytes,
        )
        # Every worker of a group marks what it publishes, so that the group's bus ingest
        # passes over the group's own output: No Local covers only a worker's own
        # publishes, and a Profile A value read back takes its arrival as its time, so
        # ingesting another member's value would store the sample a second time.
        self.group_mark = user_property(GROUP_PROPERTY, w.shared_group) if w.shared_group else b""
        self.bus = BusConnection(
            config=config.mqtt,
            ingest_filters=plan.ingest,
            session_expiry_s=config.bus_session_expiry_s,
            dispatcher=self.dispatcher,
            metrics=self.metrics,
            on_ingest=self._ingest,
            properties=self.group_mark,
            prepare=self._read_lasts,
        )
        self.sources = self._sources(plan)
        self._stop = asyncio.Event()
        self._consuming = True

    def _sources(self, plan: Plan) -> list[Source]:
        """One MQTT source for every adapter's MQTT topics and ``set`` commands (it also
        carries the worker's status), and one source per declared AMQP account."""
        dispatcher = self.dispatcher
        filters: list[str] = []
        command_filters: list[str] = []
        for name, sources, commands in plan.adapters:
            pipeline = self.pipelines[name]
            mqtt = [f for d in pipeline.sources if d.transport == "mqtt" for f in d.patterns]
            dispatcher.route("mqtt", [*mqtt, *pipeline.command_filters], pipeline)
            filters += sources  # as subscribed: with $share/<group>/
            command_filters += commands
        m = self.config.mqtt
        result: list[Source] = [
            MqttSource(
                config=m,
                filters=filters,
                commands=command_filters,
                status_topic=plan.status_topic,
                metrics=self.metrics,
                deliver=dispatcher.handle,
                gate=dispatcher,
            )
        ]
        for name, source_name, declaration in plan.connections:
            assert isinstance(declaration.endpoint, AmqpEndpoint)
            source = AmqpSource(
                name=source_name,
                endpoint=declaration.endpoint,
                queues=list(declaration.patterns),
                metrics=self.metrics,
                deliver=dispatcher.handle,
                gate=dispatcher,
                reconnect_min_s=m.reconnect_min_s,
                reconnect_max_s=m.reconnect_max_s,
            )
            dispatcher.bind(source_name, self.pipelines[name])
            for destination in declaration.publishes:
                dispatcher.outlet(destination, source)
            result.append(source)
        pollers: dict[str, list[SourceDeclaration]] = {}
        for name, _, declaration in plan.devices:
            pollers.setdefault(name, []).append(declaration)
        for name, declarations in pollers.items():
            poller = ModbusSource(
                name=f"{name}:poller",
                endpoints=[
                    d.endpoint for d in declarations if isinstance(d.endpoint, ModbusEndpoint)
                ],
                outbox=self.config.worker.data_dir / f"poll-outbox-{name}.sqlite3",
                outbox_max_bytes=int(self.config.worker.poll_outbox_max_mb * 1024 * 1024),
                metrics=self.metrics,
                deliver=dispatcher.handle,
                gate=dispatcher,
            )
            dispatcher.bind(poller.name, self.pipelines[name])
            for declaration in declarations:
                for destination in declaration.publishes:
                    dispatcher.outlet(destination, poller)
            result.append(poller)
        return result

    async def _read_lasts(self) -> None:
        """Before the first message is handled: each series' retained ``last`` becomes
        its renderer's floor (worker/lasts.py)."""
        m, w = self.config.mqtt, self.config.worker
        floors = await read_lasts(
            m,
            client_id=m.client_id,
            marker_prefix=f"{w.topic_prefix}/worker/{m.client_id}/lasts",
            member=self.config.member,
            limit=w.max_series,
        )
        for pipeline in self.pipelines.values():
            pipeline.renderer.last_floors = floors
        log.info("bus: read the retained last of %d series", len(floors))

    def _ingest(self, received: Received, entry: Entry) -> None:
        if not self._consuming:
            return  # not acknowledged: the broker redelivers it to the next run
        if self.group_mark and self.group_mark in received.properties:
            entry.release()  # the group's own output: its member stored it already
            return
        self.dispatcher.ingest(received.topic, received.payload, entry)

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
            asyncio.create_task(self.bus.run(), name="bus"),
            *(asyncio.create_task(s.run(), name=f"source {s.name}") for s in self.sources),
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
        for source in self.sources:
            source.pause()
        timeout = self.config.worker.shutdown_timeout_s
        deadline = time.monotonic() + timeout
        # Commands still being published by a source: their records and the
        # acknowledgement of their sets come before the last flush.
        await asyncio.gather(*(source.settle(timeout / 2) for source in self.sources))
        stored = await self.sink.flush(max(deadline - time.monotonic(), 0.1))
        bus = self.bus
        while bus.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not stored or bus.inflight:
            log.warning(
                "shutdown timeout: some messages stay unacknowledged; the broker redelivers them"
            )
        await asyncio.sleep(0.05)  # let the last acknowledgements leave
        for source in self.sources:
            await source.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.disconnect(), 5)
        if self.historian is not None:
            await self.historian.close()
        self.outbox.close()
        log.info("stopped")

    async def _declare_counters(self) -> None:
        counters = self.config.historian.counters
        rows = [(c.site, c.device, c.metric, c.wrap_at, c.max_rate) for c in counters]
        declared = {(site, device, metric) for site, device, metric, _, _ in rows}
        for pipeline in self.pipelines.values():
            # Counters the adapter knows the width of (a Modbus register); what the
            # configuration declares for the same series wins.
            rows += [r for r in pipeline.adapter.counters() if r[:3] not in declared]
        if not rows or self.historian is None:
            return
        try:
            await self.historian.declare_counters(rows)
        except Exception as error:
            log.warning("counter declarations not stored yet (%s); retried at next start", error)

    async def _housekeeping(self) -> None:
        timeout = self.config.worker.availability_timeout_s
        period = min(5.0, timeout / 4)
        while True:
            await asyncio.sleep(period)
            self.dispatcher.housekeeping(datetime.now(UTC))


def run_worker(config: Config, *, on_ready: Callable[[Worker], None] | None = None) -> int:
    """Run until SIGTERM or SIGINT; the exit status."""

    async def main() -> int:
        worker = Worker(config)
        if on_ready is not None:
            on_ready(worker)
        return await worker.run()

    return asyncio.run(main())
