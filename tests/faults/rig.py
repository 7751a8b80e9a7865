"""The fault suite's rig: its own Mosquitto, PostgreSQL and RabbitMQ (it stops and
restarts them), two simulated Modbus devices, one worker with all four sources, the
steady load, the ledger, and the checks after every fault.

A fault runs inside a phase (:meth:`Rig.phase`). The phase starts the load; the fault's
end starts the recovery clock, which stops when the historian holds every sample sent
before that end (the backlog). At the phase's end the load pauses, the devices go
silent, and the phase is checked as a whole: every valid sample of the phase in the
historian exactly once with its value, every retained ``last`` the newest sample of
its series, the worker alive with no traceback in its log, and every refusal on the
dead-letter stream (and in the metrics) as expected. Phases do not overlap in
observation time, so each is checked on its own rows.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tests.faults.checker import (
    DeadLetters,
    Historian,
    last_mismatches,
    retained_last,
    scrape,
)
from tests.faults.ledger import Ledger, Polls
from tests.faults.load import AmqpSender, Load, MqttSender
from tests.faults.malformed import digest
from tests.faults.traffic import MODBUS_DEVICES, Traffic, simulated_map
from tests.modbus import Devices
from tests.voke import new_orgs
from tests.workers import WorkerProcess, init_schema, write_config
from tools import services
from tools.services import Service

RATES = {"ven": 10.0, "cpi": 20.0, "voke": 20.0}
"""Messages a second of each message source (a VEN message holds 15 values, a CPI or
Voke battery message 8); the Modbus devices are polled every 0.25 s."""
DRAIN_S = 240.0
"""The longest a backlog may take to reach the historian before the check fails."""
_OWN_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ +energybus[.:]")
"""A line of the worker's own log (one line per event: no traceback, no library's dump)."""
MARKER = "cpi/faults-marker/telemetry"
"""A topic the CPI adapter refuses (``unknown_plant``): its dead letter, sent last, says
that every dead letter of the phase is in."""


@dataclass
class Row:
    """One fault's line in the table."""

    fault: str
    messages: Counter[str] = field(default_factory=Counter)
    polls: int = 0
    malformed: int = 0
    sent: int = 0
    stored: int = 0
    missing: int = 0
    duplicates: int = 0
    unexpected: int = 0
    in_flight: int = 0
    redelivered: int | None = None
    """Rows the worker wrote again and the historian's key absorbed (its own count;
    unknown across a worker killed)."""
    rejected: Counter[str] = field(default_factory=Counter)
    recovery: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    """The table so far, and the file it is written to after every fault."""

    rows: list[Row] = field(default_factory=list)
    path: Path | None = None

    def add(self, row: Row) -> None:
        self.rows.append(row)
        if self.path is not None:
            self.path.write_text(table(self.rows))


REPORT = Report()


class Phase:
    def __init__(self, rig: Rig, index: int, name: str) -> None:
        self.rig = rig
        self.index = index
        self.row = Row(name)
        self.low = rig.boundary
        self.interrupted = 0
        """Times the worker was killed or frozen: each may cost the poll it had in flight."""
        self.refused_polls: Counter[tuple[str, str]] = Counter()
        """Rows a Modbus device's answers did not give on purpose (refused values)."""
        self.expect_rejections: Counter[tuple[str, str]] = Counter()
        """Refusals not from a message the ledger knows (Modbus polls): (source, reason)."""
        self.served_start = rig.wake()
        self.letters_start = rig.letters.count()
        self.metrics_start = rig.metrics()
        self.pid = rig.worker.process.pid if rig.worker.process else None

    @contextmanager
    def fault(self) -> Iterator[Fault]:
        """The fault happens inside; its end (:meth:`Fault.end`, else leaving the block)
        starts the recovery clock."""
        fault = Fault(self.rig)
        yield fault
        if fault.ended is None:
            fault.end()
        self.row.recovery.append(self.rig.recovery(self, fault))


class Fault:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.ended: float | None = None
        self.served: dict[str, dict[tuple[str, int], int]] = {}

    def end(self) -> None:
        """Now: the reads the devices served so far, then the time, so that every read
        counted was asked for before the fault's end."""
        self.served = self.rig.served()
        self.ended = time.time()


class Rig:
    def __init__(self, stack: ExitStack, base: Path, devices: Devices) -> None:
        self.base = base
        self.services_dir = base / "services"
        self.mosquitto = stack.enter_context(
            services.started("mosquitto", run_dir=self.services_dir)
        )
        self.postgres = stack.enter_context(services.started("postgres", run_dir=self.services_dir))
        self.rabbitmq = stack.enter_context(services.started("rabbitmq", run_dir=self.services_dir))
        init_schema(self.postgres.url)
        (org,) = new_orgs(self.rabbitmq, 1)
        tag = uuid.uuid4().hex[:6]
        self.traffic = Traffic(tag, org, f"cpi-{uuid.uuid4().hex}")
        self.devices = devices
        simulators = {
            name: devices.add(name, simulated_map(map_), seed=i)
            for i, (name, map_) in enumerate(MODBUS_DEVICES.items())
        }
        self.polls = Polls(self.traffic.modbus_site, simulators)
        port = services.free_port()
        self.metrics_url = f"http://127.0.0.1:{port}/metrics"
        self.config = write_config(
            base / "site.toml",
            mqtt=self.mosquitto,
            dsn=self.postgres.url,
            client_id=f"faults-{tag}",
            worker=f"metrics_port = {port}\n",
            extra=self.traffic.adapters_config({n: s.port for n, s in simulators.items()}),
        )
        self.log = base / "worker.log"
        # The worker reads its secrets from the environment it inherits.
        for key, value in self.traffic.environ().items():
            os.environ[key] = value
            stack.callback(os.environ.pop, key, None)
        self.ledger = Ledger(self.traffic.pipelines(self.config))
        self.historian = Historian(self.postgres.url, self.traffic.sites)
        self.letters = DeadLetters(self.mosquitto)
        stack.callback(self.letters.close)
        self.worker = WorkerProcess(self.config, self.log)
        self.start_worker()
        stack.callback(self._stop_worker)
        self.mqtt = MqttSender(self.mosquitto, "load", self.ledger)
        stack.callback(self.mqtt.close)
        self.amqp = AmqpSender(org, self.ledger)
        stack.callback(self.amqp.close)
        self.load = Load(self.traffic, self.ledger, self.send, RATES)
        stack.callback(self.load.close)
        # Between phases the devices are silent: a phase's polls are those served while
        # it runs, all observed after the previous phase's boundary.
        self._silence(True)
        self.boundary = datetime.now(UTC)
        REPORT.path = base / "fault-table.md"

    # The worker -------------------------------------------------------------------------

    def start_worker(self) -> None:
        """Start the worker and wait until each of its connections is up."""
        consuming = self.worker.text().count("consuming 4 queues")
        self.worker.start()
        self.worker.wait_for_log("consuming 4 queues", count=consuming + 1, timeout=90)

    def kill_worker(self) -> None:
        self.worker.stop(signal.SIGKILL)

    @contextmanager
    def worker_stalled(self, seconds: float) -> Iterator[None]:
        """The worker frozen (SIGSTOP) for ``seconds``, then inside the block, then
        thawed: meanwhile the broker queues what arrives for its session."""
        process = self.worker.process
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)  # the stall itself
            yield
        finally:
            process.send_signal(signal.SIGCONT)

    def _stop_worker(self) -> None:
        if self.worker.alive():
            self.worker.stop()

    def send(self, adapter: str, topic: str, payload: bytes) -> None:
        (self.amqp if adapter == "voke" else self.mqtt).send(topic, payload)

    def settle(self) -> None:
        """Until the brokers confirmed everything sent."""
        self.mqtt.settle()
        self.amqp.settle()

    def metrics(self) -> dict[str, Counter[tuple[str, ...]]]:
        return scrape(self.metrics_url)

    # Services ---------------------------------------------------------------------------

    def restart(self, name: str, service: Service, *, down_s: float = 0) -> None:
        """Stop ``name`` cleanly, keep it down ``down_s`` seconds, start it on its port."""
        services.stop(name, run_dir=self.services_dir)
        if down_s:
            time.sleep(down_s)  # the outage itself
        services.start(name, run_dir=self.services_dir, port=service.port)

    # The devices ------------------------------------------------------------------------

    def served(self) -> dict[str, dict[tuple[str, int], int]]:
        return self.devices.call(self.polls.served)

    def wake(self) -> dict[str, dict[tuple[str, int], int]]:
        """Let the devices answer again; the reads they served until then."""
        return self._silence(False)

    def _silence(self, silent: bool) -> dict[str, dict[tuple[str, int], int]]:
        """Silence or wake every device, and the reads served until then, at once on
        the devices' loop: a silent device answers nothing, so what it served is final."""

        def change() -> dict[str, dict[tuple[str, int], int]]:
            for simulator in self.polls.simulators.values():
                simulator.silent = silent
            return self.polls.served()

        return self.devices.call(change)

    # Phases -----------------------------------------------------------------------------

    @contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        self.ledger.phase += 1
        phase = Phase(self, self.ledger.phase, name)
        self.load.resume()
        try:
            yield phase
        finally:
            # Also after a failed fault: the next phase starts from a clean boundary.
            self.load.pause()
            self.settle()
            served = self._silence(True)
            self.boundary = datetime.now(UTC)
        try:
            self._check(phase, served)
        finally:
            REPORT.add(phase.row)
        assert not phase.row.problems, "\n".join(phase.row.problems)

    def steady(self, phase: Phase, seconds: float = 3) -> None:
        """Until every source's samples of this phase reach the historian, then
        ``seconds`` more of load: the fault comes under steady traffic."""
        deadline = time.monotonic() + 60
        while True:
            counts = self.historian.counts(phase.low, datetime.now(UTC))
            if all(counts[site] for site in self.traffic.sites):
                break
            assert time.monotonic() < deadline, f"not every source flowing: {counts}"
            time.sleep(0.2)
        time.sleep(seconds)

    def _modbus_allowance(self, phase: Phase) -> int:
        """Rows a kill or a stall of the worker may cost: the poll whose reads were in
        flight, one per device each time (docs/modbus.md, the poll outbox; a frozen worker
        wakes with its read's timeout expired, the answer unread)."""
        per_poll = sum(len(m) for reads in self.polls.metrics.values() for m in reads.values())
        return phase.interrupted * per_poll

    def _modbus_rows(
        self, phase: Phase, served: dict[str, dict[tuple[str, int], int]]
    ) -> dict[tuple[str, str], int]:
        """Rows per series the devices' answers in this phase must give."""
        rows = self.polls.rows(phase.served_start, served)
        for series, refused in phase.refused_polls.items():
            rows[series] -= refused
        return rows

    def _modbus_wanted(self, phase: Phase, served: dict[str, dict[tuple[str, int], int]]) -> int:
        return sum(self._modbus_rows(phase, served).values()) - self._modbus_allowance(phase)

    def recovery(self, phase: Phase, fault: Fault) -> float:
        """Seconds from the fault's end until the backlog is through: the historian holds
        every sample sent until then and the rows of every poll the devices had answered,
        and every malformed input sent is on the dead-letter stream."""
        assert fault.ended is not None
        end = fault.ended
        at = datetime.fromtimestamp(end, UTC)
        wanted = Counter(key[0] for key in self.ledger.expected(phase.index) if key[3] <= at)
        wanted[self.traffic.modbus_site] = self._modbus_wanted(phase, fault.served)
        letters = {item.letter for item in self.ledger.malformed_in(phase.index)}
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            counts = self.historian.counts(phase.low, at)
            if all(counts[site] >= n for site, n in wanted.items()) and self.letters.have(
                letters, phase.letters_start
            ):
                return time.time() - end
            time.sleep(0.2)
        phase.row.problems.append(f"backlog not drained {DRAIN_S:.0f}s after the fault's end")
        return math.nan

    def _check(self, phase: Phase, served: dict[str, dict[tuple[str, int], int]]) -> None:
        """The phase as a whole, once the load paused and the devices fell silent
        (``served``: what they answered); every fault found goes to the row's problems,
        so that the table shows the phase whatever failed."""
        row, problems = phase.row, phase.row.problems
        low, high = phase.low, self.boundary
        marker = f'{{"marker": "{uuid.uuid4().hex}"}}'.encode()
        self.mqtt.send(MARKER, marker)
        # Every sample in: the ledger's rows, and each answered poll's.
        expected = self.ledger.expected(phase.index)
        wanted = Counter(key[0] for key in expected)
        modbus_rows = self._modbus_rows(phase, served)
        site = self.traffic.modbus_site
        wanted[site] = self._modbus_wanted(phase, served)
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            counts = self.historian.counts(low, high)
            if all(counts[s] >= n for s, n in wanted.items()):
                break
            time.sleep(0.2)
        stored = self.historian.rows(low, high)
        row.messages = self.ledger.messages(phase.index)
        first = {name: next(iter(reads)) for name, reads in self.polls.metrics.items()}
        row.polls = sum(served[n][r] - phase.served_start[n][r] for n, r in first.items())
        row.sent = len(expected) + sum(modbus_rows.values())
        row.duplicates = sum(len(values) - 1 for values in stored.values())
        row.stored = sum(len(values) for values in stored.values())
        # The message sources: exactly the ledger's rows, each with its value.
        from_messages = {k: v for k, v in stored.items() if k[0] != site}
        missing = expected.keys() - from_messages.keys()
        unexpected = from_messages.keys() - expected.keys()
        wrong = [k for k in expected.keys() & from_messages.keys() if expected[k] not in stored[k]]
        row.missing, row.unexpected = len(missing), len(unexpected)
        if missing:
            problems.append(f"{len(missing)} samples sent and not stored, e.g. {min(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} rows stored and never sent, e.g. {min(unexpected)}")
        if wrong:
            problems.append(f"{len(wrong)} rows stored with another value, e.g. {min(wrong)}")
        if row.duplicates:
            problems.append(f"{row.duplicates} rows stored twice")
        if self.ledger.refused:
            problems.append(f"valid messages the ledger refused: {self.ledger.refused[:3]}")
        # Modbus: one row per metric of every answered read, but the polls in flight when
        # the worker was killed or frozen.
        counted = Counter((k[1], k[2]) for k in stored if k[0] == site)
        for series, n in sorted(modbus_rows.items()):
            lost = n - counted[series]
            if 0 <= lost <= phase.interrupted:
                row.in_flight += lost
                continue
            row.missing += max(lost, 0)
            problems.append(f"modbus {series}: {n} rows answered, {counted[series]} stored")
        self._check_last(phase)
        self._check_letters(phase, marker)
        process = self.worker.process
        if process is None or process.poll() is not None:
            problems.append(f"the worker is not running (exit {process and process.returncode})")
        log = self.worker.text()
        if "Traceback" in log:
            problems.append("a traceback in the worker's log")
        foreign = [line for line in log.splitlines() if not _OWN_LINE.match(line)]
        if foreign:
            problems.append(f"{len(foreign)} lines in the worker's log not its own: {foreign[:3]}")

    def _check_last(self, phase: Phase) -> None:
        """Every series' retained ``last``, as a new subscriber gets it, is its newest
        sample: of all the ledger's rows, and for Modbus of the historian's."""
        newest: dict[tuple[str, str, str], tuple[datetime, float]] = {}
        for rows in self.ledger.rows.values():
            for (site, device, metric, at), value in rows.items():
                known = newest.get((site, device, metric))
                if known is None or at > known[0]:
                    newest[(site, device, metric)] = (at, value)
        site = self.traffic.modbus_site
        for (device, metric), last in self.historian.newest(site).items():
            newest[(site, device, metric)] = last
        topics = {f"{s}/energy/{d.replace('.', '/', 1)}/{m}/last" for s, d, m in newest}
        wrong = last_mismatches(newest, retained_last(self.mosquitto, topics))
        if wrong:
            phase.row.problems.append(f"{len(wrong)} retained last not the newest: {wrong[:3]}")

    def _check_letters(self, phase: Phase, marker: bytes) -> None:
        """Every refusal of the phase on the dead-letter stream with its reason: the
        malformed inputs sent, the refused polls, and replays of what a sender sent twice;
        and (when the worker ran through the phase) the same in its metrics."""
        row, problems = phase.row, phase.row.problems
        inputs = self.ledger.malformed_in(phase.index)
        wanted = [digest(marker), *(i.letter for i in inputs)]
        if not self.letters.wait_for(wanted, phase.letters_start, timeout=120):
            problems.append("dead letters missing (see the counts below)")
        letters = self.letters.since(phase.letters_start)
        by_digest: dict[str, list[tuple[str, str]]] = {}
        for letter in letters:
            by_digest.setdefault(letter.digest, []).append((letter.source, letter.reason))
        expected: Counter[tuple[str, str]] = Counter({("cpi", "unknown_plant"): 1})
        for item in inputs:
            expected[(item.adapter, item.reason)] += 1
            got = by_digest.get(item.letter, [])
            if (item.adapter, item.reason) not in got:
                problems.append(
                    f"{item.category} input to {item.adapter}: dead letters {got},"
                    f" wanted {item.reason}"
                )
        expected.update(phase.expect_rejections)
        seen: Counter[tuple[str, str]] = Counter((x.source, x.reason) for x in letters)
        marker_digest = digest(marker)
        sent = {i.letter for i in inputs}
        at_risk = {digest(p) for p in self.ledger.at_risk}
        for letter in letters:
            if letter.digest == marker_digest:
                continue
            row.rejected[f"{letter.source}/{letter.reason}"] += 1
            if letter.digest in sent:
                continue
            if letter.reason == "replayed" and letter.digest in at_risk:
                expected[(letter.source, letter.reason)] += 1  # a sender's second copy
                continue
            if (letter.source, letter.reason) in phase.expect_rejections:
                continue
            problems.append(f"an unexpected refusal: {letter}")
        for key in expected.keys() | seen.keys():
            if seen[key] != expected[key]:
                problems.append(f"dead letters {key}: {seen[key]}, expected {expected[key]}")
        if self.worker.process is not None and self.worker.process.pid == phase.pid:
            # The same worker all phase long: its counters say the same.
            now = self.metrics()
            grown = _grown(now, phase.metrics_start, "energybus_rejections_total")
            want = Counter({(reason, source): n for (source, reason), n in expected.items()})
            if grown != want:
                problems.append(f"rejection metrics grew by {dict(grown)}, not {dict(want)}")
            grown = _grown(now, phase.metrics_start, "energybus_command_refusals_total")
            want = Counter((i.adapter, i.reason) for i in inputs if i.adapter == "modbus")
            if grown != want:
                problems.append(f"command refusal metrics grew by {dict(grown)}, not {dict(want)}")
            again = _grown(now, phase.metrics_start, "energybus_historian_duplicate_rows_total")
            row.redelivered = again[()]
        # Every refused setpoint on the record too, with its code.
        codes = Counter(i.reason for i in inputs if i.adapter == "modbus")
        deadline = time.monotonic() + 60
        while (found := self.historian.refused(self.traffic.modbus_site, phase.low)) != codes:
            if time.monotonic() > deadline:
                problems.append(f"refused command records {dict(found)}, not {dict(codes)}")
                break
            time.sleep(0.2)


def _grown(
    now: dict[str, Counter[tuple[str, ...]]],
    before: dict[str, Counter[tuple[str, ...]]],
    name: str,
) -> Counter[tuple[str, ...]]:
    delta = now.get(name, Counter()).copy()
    delta.subtract(before.get(name, Counter()))
    return +delta


# The table --------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| fault | sent (samples) | stored | missing | duplicates | rejected by reason"
        " | recovery (s) | traffic |",
        "|---|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        rejected = ", ".join(f"{k} {n:,}" for k, n in sorted(r.rejected.items())) or "none"
        recovery = " / ".join("-" if math.isnan(s) else f"{s:.1f}" for s in r.recovery)
        traffic = (
            f"{r.messages['ven']:,} VEN, {r.messages['cpi']:,} CPI, {r.messages['voke']:,} Voke"
            f" messages; {r.polls:,} Modbus polls"
        )
        if r.malformed:
            traffic += f"; {r.malformed:,} malformed inputs"
        if r.redelivered:
            traffic += f"; {r.redelivered:,} rows written again, absorbed by the key"
        missing = f"{r.missing:,}"
        if r.in_flight:
            missing += f" (+{r.in_flight} Modbus rows of polls in flight at a kill or stall)"
        lines.append(
            f"| {r.fault} | {r.sent:,} | {r.stored:,} | {missing} | {r.duplicates:,}"
            f" | {rejected} | {recovery} | {traffic} |"
        )
    return "\n".join(lines) + "\n"
