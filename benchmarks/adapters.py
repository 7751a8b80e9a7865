"""Adapter throughput: source messages normalized per second per core.

The VEN message is the seed's metering message grown to 10 circuits and 10 loads (48
samples); each message has its own timestamp and its own readings (3 decimals of kW, as
a meter reports), so neither the duplicate check nor any cache makes it cheaper than
real traffic. CPI messages are signed, and verified on the way in.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.cpi import CpiOptions
from energybus.adapters.signing import Signer


def ven_messages(count: int, *, circuits: int = 10, seed: int = 1) -> list[bytes]:
    rnd = random.Random(seed)

    def kw() -> float:
        return round(rnd.uniform(0, 8), 3)

    messages = []
    for i in range(count):
        body: dict[str, Any] = {
            "venId": "ven-042",
            "timestamp": 1729700000 + 5 * i,
            "usedPowerKw": kw(),
            "shedPowerKw": kw(),
            "requestedReductionKw": 5.0,
            "eventId": "evt-123",
            "baselinePowerKw": 13.0,
            "batterySOC": round(rnd.uniform(20, 100), 1),
            "panelAmperageRating": 200,
            "panelVoltage": round(rnd.uniform(228, 242), 1),
            "panelMaxKw": 48.0,
            "currentAmps": round(rnd.uniform(0, 60), 2),
            "panelUtilizationPercent": round(rnd.uniform(0, 100), 1),
            "circuits": [
                {
                    "id": f"circuit_{c}",
                    "name": f"Circuit {c}",
                    "breakerAmps": 30,
                    "currentKw": kw(),
                    "currentAmps": round(rnd.uniform(0, 30), 2),
                    "enabled": rnd.random() < 0.8,
                    "critical": c == 0,
                }
                for c in range(circuits)
            ],
            "loads": [
                {
                    "loadId": f"circuit_{c}",
                    "name": f"Circuit {c}",
                    "type": "hvac",
                    "capacityKw": 5.0,
                    "currentPowerKw": kw(),
                    "shedCapabilityKw": kw(),
                    "enabled": True,
                    "priority": c % 3,
                }
                for c in range(circuits)
            ],
        }
        messages.append(msgspec.json.encode(body))
    return messages


def _loop(run: Callable[[bytes], int], messages: list[bytes]) -> Callable[[], int]:
    position = 0

    def loop() -> int:
        nonlocal position
        chunk = messages[position : position + 200]
        position = (position + 200) % len(messages)
        for payload in chunk:
            run(payload)
        return len(chunk)

    return loop


def bench_ven(
    seconds: float, rate: Callable[[Callable[[], int], float], float]
) -> list[dict[str, object]]:
    messages = ven_messages(20_000)
    received = datetime(2024, 10, 23, tzinfo=UTC)

    def fresh() -> Any:
        # A new adapter per pass over the messages: their timestamps are then new again.
        return create_adapter("ven")

    adapter = fresh()
    passes = {"position": 0}

    def normalize(payload: bytes) -> int:
        result = adapter.normalize("volttron/metering", payload, received)
        if result.duplicate:
            raise AssertionError("a benchmark message was taken for a duplicate")
        return len(result.readings)

    pipeline = Pipeline(fresh())

    def full(payload: bytes) -> int:
        return len(pipeline.feed("volttron/metering", payload, received_at=received).messages)

    def reset_on_wrap(loop: Callable[[], int], reset: Callable[[], None]) -> Callable[[], int]:
        def wrapped() -> int:
            passes["position"] += 1
            if passes["position"] % (len(messages) // 200) == 0:
                reset()
            return loop()

        return wrapped

    def reset_adapter() -> None:
        nonlocal adapter
        adapter = fresh()

    def reset_pipeline() -> None:
        nonlocal pipeline
        pipeline = Pipeline(fresh())

    first = adapter.normalize("volttron/metering", messages[0], received)
    samples = sum(len(r.values) for r in first.readings)
    adapter = fresh()
    normalized = rate(reset_on_wrap(_loop(normalize, messages), reset_adapter), seconds)
    passes["position"] = 0
    rendered = rate(reset_on_wrap(_loop(full, messages), reset_pipeline), seconds)
    return [
        {
            "figure": "VEN metering messages normalized per second per core (10 circuits, "
            "10 loads)",
            "value": round(normalized),
            "samples_per_message": samples,
            "samples_per_second": round(normalized * samples),
        },
        {
            "figure": "VEN metering messages normalized and rendered to wire messages per "
            "second per core",
            "value": round(rendered),
        },
    ]


def bench_cpi(
    seconds: float, rate: Callable[[Callable[[], int], float], float]
) -> dict[str, object]:
    options = msgspec.convert(
        {
            "plants": {
                "plant-1": {
                    "site": "vad",
                    "secrets": ["bench-secret"],
                    "targets": {"B1": {"template": "battery"}, "M1": {"template": "meter"}},
                }
            },
            "replay_window_s": 10**9,
        },
        CpiOptions,
    )
    signer = Signer(["bench-secret"])
    rnd = random.Random(2)
    start = datetime(2024, 10, 23, tzinfo=UTC)
    messages = []
    for i in range(20_000):
        if i % 2:
            values: dict[str, float] = {
                "soc": round(rnd.uniform(20, 100), 1),
                "soh": 98.0,
                "p_charge": round(rnd.uniform(0, 5), 3),
                "p_discharge": 0.0,
                "t_cell_max": rnd.randint(200, 350),
                "status": rnd.choice([1, 5, 7]),
            }
            target = "B1"
        else:
            values = {
                "p_import": round(rnd.uniform(0, 50), 3),
                "p_export": 0.0,
                "u_l1": rnd.randint(2250, 2450),
                "u_l2": rnd.randint(2250, 2450),
                "u_l3": rnd.randint(2250, 2450),
                "freq": rnd.randint(4990, 5010),
                "e_import": 100000 + i,
                "e_export": 500,
            }
            target = "M1"
        body: dict[str, Any] = {
            "ts": int((start + timedelta(seconds=i)).timestamp() * 1000),
            "target": target,
            "values": values,
        }
        body["sig"] = signer.sign(body)
        messages.append(msgspec.json.encode(body))
    holder = {"adapter": create_adapter("cpi", options=options)}
    count = {"n": 0}

    def normalize(payload: bytes) -> int:
        result = holder["adapter"].normalize("cpi/plant-1/telemetry", payload, start)
        if result.rejections:
            raise AssertionError(result.rejections[0])
        count["n"] += 1
        if count["n"] % len(messages) == 0:
            holder["adapter"] = create_adapter("cpi", options=options)  # signatures new again
        return len(result.readings)

    return {
        "figure": "CPI telemetry messages (signed, verified) normalized per second per core",
        "value": round(rate(_loop(normalize, messages), seconds)),
        "samples_per_message": 8,
    }
