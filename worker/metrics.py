"""The worker's Prometheus metrics, in one registry served on the configured port."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from energybus.historian import Outbox, WriteResult

    from .series import SeriesBound

__all__ = ["Metrics"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages_in = Counter(
            "energybus_messages_in", "Source messages received, by adapter", ["adapter"], registry=r
        )
        self.elsewhere = Counter(
            "energybus_messages_elsewhere",
            "Source messages about other members' sites, left to them, by adapter",
            ["adapter"],
            registry=r,
        )
        self.samples_out = Counter(
            "energybus_samples_out",
            "Canonical samples produced, by adapter",
            ["adapter"],
            registry=r,
        )
        self.published = Counter("energybus_published", "Messages published on the bus", registry=r)
        self.rejections = Counter(
            "energybus_rejections",
            "Messages refused and dead-lettered, by source and reason",
            ["source", "reason"],
            registry=r,
        )
        self.command_refusals = Counter(
            "energybus_command_refusals",
            "Canonical set commands refused before reaching a source, by adapter and reason",
            ["adapter", "reason"],
            registry=r,
        )
        self.suppressed = Counter(
            "energybus_dedupe_suppressed",
            "Value messages held back by dedupe, by adapter",
            ["adapter"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "energybus_publish_latency_seconds",
            "From a source message's arrival to the PUBACK of its last publish",
            buckets=_LATENCY,
            registry=r,
        )
        self.publish_failures = Counter(
            "energybus_publish_failures",
            "Publishes the broker refused (PUBACK reason >= 0x80), by reason code",
            ["reason"],
            registry=r,
        )
        self.historian_rows = Counter(
            "energybus_historian_rows",
            "Rows inserted, by table (duplicates are not inserted)",
            ["table"],
            registry=r,
        )
        self.historian_duplicates = Counter(
            "energybus_historian_duplicate_rows",
            "Rows already stored or repeated within a batch",
            registry=r,
        )
        self.historian_batches = Counter(
            "energybus_historian_batches", "Batches committed", registry=r
        )
        self.historian_errors = Counter(
            "energybus_historian_errors", "Failed batch writes", registry=r
        )
        self.commit_latency = Histogram(
            "energybus_historian_commit_seconds",
            "Time to write and commit one batch",
            buckets=_LATENCY,
            registry=r,
        )
        self.outbox_batches = Gauge(
            "energybus_outbox_batches", "Batches waiting in the outbox", registry=r
        )
        self.outbox_rows = Gauge("energybus_outbox_rows", "Rows waiting in the outbox", registry=r)
        self.outbox_bytes = Gauge("energybus_outbox_bytes", "Size of the outbox", registry=r)
        self.outbox_oldest = Gauge(
            "energybus_outbox_oldest_age_seconds",
            "Age of the oldest batch in the outbox (0 when empty)",
            registry=r,
        )
        self.outbox_full = Gauge(
            "energybus_outbox_full",
            "1 while the outbox is full and batches wait in memory",
            registry=r,
        )
        self.replayed = Counter(
            "energybus_outbox_replayed_rows", "Rows replayed from the outbox", registry=r
        )
        self.freshness = Gauge(
            "energybus_source_age_seconds",
            "Seconds since each source entity last produced a sample",
            ["site", "entity"],
            registry=r,
        )
        self.reconnects = Counter(
            "energybus_reconnects", "Connections re-established, by connection", ["connection"],
            registry=r,
        )  # fmt: skip
        self.connected = Gauge(
            "energybus_connected", "1 while the connection is up", ["connection"], registry=r
        )
        self.poll_outbox_rows = Gauge(
            "energybus_poll_outbox_polls", "Modbus polls waiting in the poll outbox", registry=r
        )
        self.poll_outbox_bytes = Gauge(
            "energybus_poll_outbox_bytes", "Size of the polls in the poll outbox", registry=r
        )
        self.poll_outbox_dropped = Counter(
            "energybus_poll_outbox_dropped", "Modbus polls dropped: the poll outbox was full",
            registry=r,
        )  # fmt: skip
        self.modbus_polls = Counter(
            "energybus_modbus_polls",
            "Modbus polls by device and outcome (ok, partial, failed)",
            ["device", "outcome"],
            registry=r,
        )
        self.modbus_overruns = Counter(
            "energybus_modbus_skipped_polls",
            "Poll slots skipped because the previous poll overran its interval",
            ["device"],
            registry=r,
        )
        self.series = Gauge(
            "energybus_series",
            "Distinct series the worker keeps (bounded by worker.max_series)",
            registry=r,
        )
        self.sites = Gauge(
            "energybus_sites", "Distinct sites the worker keeps series of", registry=r
        )
        self.ingest_series = Gauge(
            "energybus_ingest_series",
            "Distinct series the bus ingest has taken (a budget of its own, as large)",
            registry=r,
        )
        self._outbox: Outbox | None = None
        self.outbox_oldest.set_function(self._oldest_age)

    def series_bound(self, bound: SeriesBound, ingest: SeriesBound | None = None) -> None:
        """Report the bounds' counts when scraped (nothing per sample)."""
        self.series.set_function(lambda: bound.series)
        self.sites.set_function(lambda: bound.sites)
        if ingest is not None:
            self.ingest_series.set_function(lambda: ingest.series)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def outbox(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self.outbox_batches.set(outbox.batches)
        self.outbox_rows.set(outbox.rows)
        self.outbox_bytes.set(outbox.size)

    def _oldest_age(self) -> float:
        oldest = self._outbox.oldest if self._outbox is not None else None
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def committed(self, result: WriteResult, seconds: float) -> None:
        self.historian_batches.inc()
        self.commit_latency.observe(seconds)
        if result.measurements:
            self.historian_rows.labels("measurements").inc(result.measurements)
        if result.counters:
            self.historian_rows.labels("counter_readings").inc(result.counters)
        if result.commands:
            self.historian_rows.labels("command_logs").inc(result.commands)
        if result.duplicates:
            self.historian_duplicates.inc(result.duplicates)
