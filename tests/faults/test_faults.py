"""Faults under steady VEN, CPI, Voke and Modbus load against one worker with all four
sources, each checked as a whole afterwards (tests/faults/rig.py): every valid sample in
the historian exactly once, every retained ``last`` the newest sample of its series, the
worker alive with no traceback, every refusal counted by reason and dead-lettered. The
tests share one rig and run in this order; each writes its line of the table."""

from __future__ import annotations

import random
import time

import pytest

from energybus.simulators.modbus import ModbusSimulator
from tests.faults.malformed import DIALECTS, Input, Mutation, apply, draw, strategy
from tests.faults.rig import Rig

pytestmark = [
    pytest.mark.services,
    pytest.mark.faults,
    # aio-pika leaves a connection that failed to open (the load's, while RabbitMQ is
    # down) for its __del__ to close, which cannot outside the event loop.
    pytest.mark.filterwarnings("ignore:coroutine 'Connection.close' was never awaited"),
]

MALFORMED = 10_000
PACE = 1_000
"""Malformed inputs sent a second, each fourth after a valid message."""
OVERSIZED = 4
"""Inputs of about 1 MB per source: each also travels back whole in its dead letter."""
SOC_IMPLAUSIBLE = 60_000
"""The battery's state-of-charge register pinned to 6,000 %: every poll's value refused."""


def test_worker_sigkilled_three_times(rig: Rig) -> None:
    with rig.phase("worker SIGKILLed 3 times (restarted)") as phase:
        for _ in range(3):
            rig.steady(phase)
            with phase.fault() as fault:
                rig.kill_worker()
                phase.interrupted += 1
                fault.end()  # restarted at once: recovery counts the worker's start
                rig.start_worker()


def test_postgres_stopped_for_60_s(rig: Rig) -> None:
    with rig.phase("PostgreSQL stopped for 60 s") as phase:
        rig.steady(phase)
        with phase.fault():
            rig.restart("postgres", rig.postgres, down_s=60)


def test_mosquitto_restarted_with_persistence(rig: Rig) -> None:
    with rig.phase("Mosquitto restarted (persistence on), the worker stalled") as phase:
        rig.steady(phase)
        # The worker frozen for 2 s first, so that QoS 1 messages wait for its session
        # (sent and unacknowledged, or queued) when the broker goes down and comes back.
        phase.interrupted += 1
        with phase.fault(), rig.worker_stalled(2):
            rig.restart("mosquitto", rig.mosquitto)


def test_rabbitmq_restarted(rig: Rig) -> None:
    with rig.phase("RabbitMQ restarted") as phase:
        rig.steady(phase)
        with phase.fault():
            rig.restart("rabbitmq", rig.rabbitmq)


def _corpus() -> list[tuple[str, str, Mutation]]:
    """(adapter, category, mutation) for MALFORMED inputs, a quarter per source, the
    categories of each source in equal parts (but OVERSIZED of about 1 MB)."""
    plan: list[tuple[str, str, Mutation]] = []
    per_source = MALFORMED // len(DIALECTS)
    for seed, (adapter, dialect) in enumerate(sorted(DIALECTS.items())):
        others = [c for c in dialect.categories if c != "oversized"]
        share, extra = divmod(per_source - OVERSIZED, len(others))
        counts = {c: share + (i < extra) for i, c in enumerate(others)}
        counts["oversized"] = OVERSIZED
        for category, count in counts.items():
            drawn = draw(strategy(dialect, category), count, seed=seed)
            plan += [(adapter, category, mutation) for mutation in drawn]
    random.Random(14).shuffle(plan)
    return plan


def test_malformed_inputs_among_valid_traffic(rig: Rig) -> None:
    plan = _corpus()
    assert len(plan) == MALFORMED
    bat = rig.polls.simulators["bat"]
    with rig.phase(f"{MALFORMED:,} malformed inputs") as phase:
        rig.steady(phase)
        with phase.fault():
            before = rig.devices.call(lambda: _pin(bat, SOC_IMPLAUSIBLE))
            _send(rig, plan)
            rig.settle()
            after = rig.devices.call(lambda: _pin(bat, 500))
            refused = after - before
            phase.refused_polls[("storage.bat", "soc")] = refused
            phase.expect_rejections[("modbus", "implausible_value")] = refused
        phase.row.malformed = len(plan)


def _pin(battery: ModbusSimulator, raw: int) -> int:
    """Hold the state of charge at ``raw`` (tenths of a %); the reads of it served so
    far, on the devices' loop, so that no read falls between the two."""
    battery.set_raw("soc", raw)
    return battery.read_log[("holding", 100)]


def _send(rig: Rig, plan: list[tuple[str, str, Mutation]]) -> None:
    """Each input made from a message of its own; a valid message of the same source
    before every fourth, and the replays drawn from those."""
    sent: dict[str, list[bytes]] = {"ven": [], "cpi": [], "voke": []}
    start = time.monotonic()
    for index, (adapter, category, mutation) in enumerate(plan):
        ahead = index / PACE - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        if adapter != "modbus" and (index % 4 == 0 or not sent[adapter]):
            sent[adapter].append(rig.load.valid(adapter, index))
        doc = rig.traffic.make(adapter, index)
        payload = apply(mutation, doc, sent.get(adapter, []))
        reason = DIALECTS[adapter].reason(category, payload, rig.ledger.max_payload_bytes(adapter))
        rig.ledger.record_malformed(Input(adapter, doc.topic, payload, category, reason))
        rig.send(adapter, doc.topic, payload)
