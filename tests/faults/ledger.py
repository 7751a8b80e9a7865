"""The ledger: everything the fault suite sent, and what it must have become.

For the message sources (VEN, CPI, Voke) it keeps every valid message sent, with the
phase it belongs to, and translates it with the very adapters the worker runs (built
from the worker's own configuration) into the historian rows it must give: one per
value, keyed as the historian keys them. For Modbus, what was sent is what the
simulated devices answered: the reads each served, counted by the simulator.

It also keeps what may legitimately arrive twice (a message a sender published again
because its acknowledgement was lost with a broker: "at risk"), and every malformed
input with the reason it must be refused with.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import NamedTuple

from energybus.adapters import Pipeline
from energybus.rows import reading_rows
from energybus.simulators.modbus import ModbusSimulator
from tests.faults.malformed import Input

Key = tuple[str, str, str, datetime]
"""A historian row's identity: (site, device_id, metric_name, observed_at)."""


class Sent(NamedTuple):
    adapter: str
    topic: str
    payload: bytes
    at: float
    phase: int


class Ledger:
    """What was sent; thread-safe, since every sender records into it."""

    def __init__(self, pipelines: dict[str, Pipeline]) -> None:
        self._pipelines = pipelines
        self._lock = threading.Lock()
        self.phase = 0
        self.sent: list[Sent] = []
        self.at_risk: set[bytes] = set()
        """Payloads a sender published again after losing its broker (possibly twice)."""
        self.malformed: list[tuple[int, Input]] = []
        self._translated = 0
        self.rows: dict[int, dict[Key, float]] = {}
        """Per phase, the rows the valid messages must have given, with their values."""
        self.refused: list[tuple[Sent, str]] = []
        """Valid messages the ledger's own translation refused: a fault of the suite."""

    def max_payload_bytes(self, adapter: str) -> int:
        """The largest message ``adapter`` takes, as the worker's configuration says."""
        return self._pipelines[adapter].max_payload_bytes

    def record(self, adapter: str, topic: str, payload: bytes, at: float) -> None:
        with self._lock:
            self.sent.append(Sent(adapter, topic, payload, at, self.phase))

    def record_malformed(self, item: Input) -> None:
        with self._lock:
            self.malformed.append((self.phase, item))

    def mark_at_risk(self, payloads: Iterable[bytes]) -> None:
        with self._lock:
            self.at_risk.update(payloads)

    def expected(self, phase: int) -> dict[Key, float]:
        """The rows phase ``phase``'s valid messages must have given so far."""
        with self._lock:
            new = self.sent[self._translated :]
            self._translated = len(self.sent)
        for sent in new:
            out = self._pipelines[sent.adapter].feed(
                sent.topic, sent.payload, received_at=datetime.fromtimestamp(sent.at, UTC)
            )
            if out.rejections:
                self.refused.append((sent, out.rejections[0].code))
            rows = self.rows.setdefault(sent.phase, {})
            for reading in out.readings:
                for row in reading_rows(reading):
                    rows[(row.site, row.device_id, row.metric_name, row.observed_at)] = row.value
        return self.rows.get(phase, {})

    def messages(self, phase: int) -> Counter[str]:
        with self._lock:
            return Counter(s.adapter for s in self.sent if s.phase == phase)

    def malformed_in(self, phase: int) -> list[Input]:
        with self._lock:
            return [item for p, item in self.malformed if p == phase]


class Polls:
    """What the simulated Modbus devices answered: reads served per device and read,
    and which metrics each read carries, so the rows they must give are known."""

    def __init__(self, site: str, simulators: dict[str, ModbusSimulator]) -> None:
        self.site = site
        self.simulators = simulators
        self.metrics: dict[str, dict[tuple[str, int], list[str]]] = {}
        for name, simulator in simulators.items():
            reads = simulator.map.layout().reads
            by_read: dict[tuple[str, int], list[str]] = {(r.table, r.address): [] for r in reads}
            for register in simulator.map.registers:
                if register.field is None:
                    continue  # a scale factor: read, never stored
                read = next(
                    r
                    for r in reads
                    if r.table == register.table
                    and r.address <= register.address < r.address + r.count
                )
                by_read[(read.table, read.address)].append(register.field.hot[0])
            self.metrics[name] = by_read

    def served(self) -> dict[str, dict[tuple[str, int], int]]:
        """Reads served so far, per device and read (call it on the devices' loop)."""
        return {
            name: {read: sim.read_log[read] for read in self.metrics[name]}
            for name, sim in self.simulators.items()
        }

    def rows(
        self,
        start: dict[str, dict[tuple[str, int], int]],
        end: dict[str, dict[tuple[str, int], int]],
    ) -> dict[tuple[str, str], int]:
        """Rows per (device_id, metric) the reads served between two counts must give."""
        out: dict[tuple[str, str], int] = {}
        for name, reads in self.metrics.items():
            entity = self.simulators[name].map.device.entity_type
            for read, metrics in reads.items():
                for metric in metrics:
                    out[(f"{entity}.{name}", metric)] = end[name][read] - start[name][read]
        return out
