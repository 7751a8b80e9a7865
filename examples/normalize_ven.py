"""Translate a VEN metering message and a shed command with the library, as the worker does."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from energybus.adapters import Pipeline, create_adapter

HERE = Path(__file__).resolve().parent
received = datetime(2024, 10, 23, 16, 13, 21, tzinfo=UTC)

pipeline = Pipeline(create_adapter("ven"))
metering = (HERE / "ven_metering.json").read_bytes()
out = pipeline.feed("volttron/metering", metering, received_at=received)
values = [m for m in out.messages if m.topic.endswith("/value")]
print(f"{len(values)} values, {len(out.messages)} messages")
for message in values[:3]:
    print(message.topic, message.payload.decode())

# A canonical set on the VEN's shed power becomes a DR event on ven/cmd/{venId}.
command = pipeline.feed("ven-042/energy/load/ven-042/shed_power/set", b"5000", received_at=received)
record = command.commands[0]
print(command.messages[0].topic, record.action, record.state)
