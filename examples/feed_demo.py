"""Feed the running demo worker the example VEN message and show what it became.

Waits for the worker's retained status to say ``online``, publishes
``examples/ven_metering.json`` (with the current time) and one malformed message, then
prints the canonical topics, the dead letter and the rows in the measurement historian.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

HERE = Path(__file__).resolve().parent
PORT = 18830


def main() -> None:
    seen: list[tuple[str, bytes]] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-feed-{os.getpid()}")
    client.on_message = lambda c, u, m: seen.append((m.topic, bytes(m.payload)))
    client.connect("127.0.0.1", PORT)
    client.loop_start()
    client.subscribe([("energybus/#", 1), ("vad/energy/#", 1)])
    deadline = time.monotonic() + 30
    while (
        "energybus/worker/energybus-demo/status",
        b"online",
    ) not in seen and time.monotonic() < deadline:
        time.sleep(0.1)
    seen.clear()
    body = json.loads((HERE / "ven_metering.json").read_text())
    body["timestamp"] = time.time()
    client.publish("volttron/metering", json.dumps(body), qos=1).wait_for_publish(10)
    client.publish("volttron/metering", b"{not json", qos=1).wait_for_publish(10)
    time.sleep(1.5)
    client.loop_stop()
    client.disconnect()
    print("\n--- on the bus ---")
    for topic, payload in seen:
        if not topic.endswith("/meta"):
            print(f"{topic}  {payload.decode()[:120]}")

    async def rows() -> None:
        conn = await asyncpg.connect(os.environ["ENERGYBUS_DSN"])
        found = await conn.fetch(
            "SELECT device_id, metric_name, value, observed_at FROM energybus.measurements"
            " WHERE site = 'vad' ORDER BY ingested_at DESC, device_id LIMIT 8"
        )
        await conn.close()
        print("\n--- newest rows in energybus.measurements ---")
        for row in found:
            print(f"{row['device_id']:<28} {row['metric_name']:<26} {row['value']:>10g}  "
                  f"{row['observed_at'].isoformat()}")  # fmt: skip
        print(
            "\nthe worker keeps running; metrics on http://127.0.0.1:9464/metrics; Ctrl-C stops it"
        )

    asyncio.run(rows())


if __name__ == "__main__":
    main()
