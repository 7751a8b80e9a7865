"""The plant load generator, a process of its own so that its CPU is counted apart.

Publishes signed battery telemetry of one plant's 200 batteries at a fixed rate, the
same values either way:

- ``--transport amqp``: Voke ESM envelopes (VCP 1) on ``vcp.<org>.event.telemetry``, with
  publisher confirms; a message the broker did not confirm (it went away) is sent again
  once it is back, so every message is in the queue at least once;
- ``--transport mqtt``: CPI plant telemetry on ``cpi/plant-1/telemetry`` at QoS 1.

Each message holds 8 values and carries the publish time as ``ts``. Prints, as JSON,
the number of distinct messages the broker took, the seconds from the first publish to
the last confirmation, the wall-clock time of the first publish, its CPU time and how
many messages were sent again.

    python -m benchmarks.load_plants --transport amqp --port 5672 --rate 1000 --seconds 20 \\
        --tag run-1 --org bench --vhost bench      (ENERGYBUS_BENCH_KEY, _SIGNING_KEY set)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import uuid
from collections import deque
from typing import Any

import msgspec

from benchmarks.load import paced
from energybus.adapters.signing import Signer

DEVICES = 200
VALUES_PER_MESSAGE = 8
WINDOW = 2000
"""The most publishes awaiting their confirmations at once."""


def voke_body(signer: Signer, org: str, device: int, seq: int, rnd: random.Random) -> bytes:
    body: dict[str, Any] = {
        "v": 1,
        "type": "telemetry",
        "id": str(uuid.uuid4()),
        "org": org,
        "plant": "P-1",
        "device": f"B{device}",
        "ts": int(time.time() * 1000),
        "seq": seq,
        "kind": "realtime",
        "values": {
            "socPct": round(rnd.uniform(10, 90), 1),
            "sohPct": 97.5,
            "powerKw": round(rnd.uniform(-50, 50), 1),
            "voltageV": round(rnd.uniform(700, 800), 1),
            "currentA": round(rnd.uniform(-60, 60), 1),
            "cellTempMaxC": round(rnd.uniform(20, 35), 1),
            "state": rnd.randrange(5),
            "chargedKwh": 10_000 + seq / 100,
        },
    }
    body["sig"] = signer.sign(body)
    return msgspec.json.encode(body)


def cpi_body(signer: Signer, device: int, seq: int, rnd: random.Random) -> bytes:
    power = round(rnd.uniform(-50, 50), 1)
    body: dict[str, Any] = {
        "ts": int(time.time() * 1000),
        "target": f"B{device}",
        "values": {
            "soc": round(rnd.uniform(10, 90), 1),
            "soh": 97.5,
            "p_charge": max(-power, 0.0),
            "p_discharge": max(power, 0.0),
            "t_cell_max": round(rnd.uniform(200, 350)),
            "status": rnd.randrange(8),
        },
    }
    body["sig"] = signer.sign(body)
    return msgspec.json.encode(body)


async def publish_amqp(
    *, port: int, org: str, vhost: str, rate: int, seconds: float
) -> dict[str, float]:
    import aio_pika

    signer = Signer([os.environ["ENERGYBUS_BENCH_SIGNING_KEY"]])
    password = os.environ["ENERGYBUS_BENCH_KEY"]
    key = f"vcp.{org}.event.telemetry"
    rnd = random.Random(rate)
    unsent: deque[bytes] = deque()
    made = confirmed = resent = 0
    started_at = time.time()
    start = time.perf_counter()

    def make_due() -> bool:
        """Messages fall due on schedule, broker or not; True once all are made."""
        nonlocal made
        elapsed = time.perf_counter() - start
        due = int(min(elapsed, seconds) * rate)
        while made < due:
            unsent.append(voke_body(signer, org, made % DEVICES + 1, made + 1, rnd))
            made += 1
        return elapsed >= seconds

    while not (make_due() and not unsent):
        try:
            connection = await asyncio.wait_for(
                aio_pika.connect(
                    host="127.0.0.1", port=port, login=org, password=password, virtualhost=vhost
                ),
                5,
            )
        except Exception:
            await asyncio.sleep(0.2)
            continue
        try:
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange("vcp")
                while not (make_due() and not unsent):
                    batch = [unsent.popleft() for _ in range(min(len(unsent), WINDOW))]
                    if not batch:
                        await asyncio.sleep(0.001)
                        continue
                    publishes = [
                        exchange.publish(
                            aio_pika.Message(
                                body,
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            key,
                        )
                        for body in batch
                    ]
                    results = await asyncio.wait_for(
                        asyncio.gather(*publishes, return_exceptions=True), 30
                    )
                    failed = [
                        b
                        for b, r in zip(batch, results, strict=True)
                        if isinstance(r, BaseException)
                    ]
                    confirmed += len(batch) - len(failed)
                    if failed:
                        # Not confirmed: sent again (the broker may hold some already).
                        unsent.extendleft(reversed(failed))
                        resent += len(failed)
                        raise ConnectionError("publishes not confirmed")
        except Exception:
            await asyncio.sleep(0.2)
    return {
        "sent": made,
        "confirmed": confirmed,
        "resent": resent,
        "seconds": time.perf_counter() - start,
        "started_at": started_at,
    }


def publish_mqtt(*, port: int, rate: int, seconds: float, tag: str) -> dict[str, float]:
    signer = Signer([os.environ["ENERGYBUS_BENCH_SIGNING_KEY"]])
    rnd = random.Random(rate)

    def make(n: int) -> tuple[str, bytes]:
        return "cpi/plant-1/telemetry", cpi_body(signer, n % DEVICES + 1, n + 1, rnd)

    sent, elapsed, started_at = paced(port, rate, seconds, f"bench-plants-{tag}", make)
    return {
        "sent": sent,
        "confirmed": sent,
        "resent": 0,
        "seconds": elapsed,
        "started_at": started_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=["amqp", "mqtt"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--org", default="bench")
    parser.add_argument("--vhost", default="/")
    args = parser.parse_args()
    if args.transport == "amqp":
        report = asyncio.run(
            publish_amqp(
                port=args.port, org=args.org, vhost=args.vhost, rate=args.rate, seconds=args.seconds
            )
        )
    else:
        report = publish_mqtt(port=args.port, rate=args.rate, seconds=args.seconds, tag=args.tag)
    report["cpu_seconds"] = time.process_time()  # import and all: counted apart
    print(json.dumps(report))


if __name__ == "__main__":
    main()
