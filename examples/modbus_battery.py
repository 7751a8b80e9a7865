"""A Modbus battery inverter through the library alone: serve one, read it, command it.

The simulator serves the packaged SunSpec battery map on a local port; a pymodbus client
makes the reads the adapter's layout asks for; the adapter turns them into canonical
samples; a canonical ``set`` becomes a write request only if it passes the interlocks,
and the read-back confirms it. The worker does the same with its poller and the bus.

    python examples/modbus_battery.py
"""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime

from pymodbus.client import AsyncModbusTcpClient

from energybus.adapters import Pipeline
from energybus.adapters.modbus import (
    ModbusAdapter,
    ModbusDeviceOptions,
    ModbusOptions,
    WriteResult,
    poll_payload,
    read_write_request,
    write_result,
)
from energybus.simulators.modbus import ModbusSimulator, load_simulated_map


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main() -> None:
    port = free_port()
    simulator = ModbusSimulator(load_simulated_map("sunspec_battery"), port=port, seed=1)
    simulator.set_value("soc", 42.0)
    adapter = ModbusAdapter(
        options=ModbusOptions(
            site="lab",
            devices={"battery": ModbusDeviceOptions(map="sunspec_battery", port=port)},
        )
    )
    pipeline = Pipeline(adapter)
    layout = adapter.devices["battery"].layout
    async with simulator:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        await client.connect()
        try:
            # One poll: the reads the map compiles to, as the worker's poller makes them.
            words: list[int] = []
            for read in layout.reads:
                response = await client.read_holding_registers(
                    read.address, count=read.count, device_id=1
                )
                words += response.registers
            now = datetime.now(UTC)
            poll = poll_payload(
                int(time.time() * 1000),
                [False] * len(layout.reads),
                words,
                fingerprint=layout.fingerprint,
            )
            out = pipeline.feed("battery", poll, received_at=now)
            for message in out.messages:
                if message.topic.endswith(("/soc/value", "/max_charge_power/value")):
                    print(message.topic, message.payload.decode())

            # A setpoint above the map's rating (10 kW) is refused and never written.
            topic = "lab/energy/storage/battery/max_charge_power/set"
            refused = pipeline.feed(
                topic, b'{"value": 12000, "priority": "manual"}', received_at=now
            )
            print("12000 W:", refused.rejections[0].code, "-", refused.rejections[0].message)

            # One inside it becomes a write request; the device takes it and reads it back.
            accepted = pipeline.feed(
                topic, b'{"value": 3000, "priority": "manual"}', received_at=now
            )
            request = read_write_request(accepted.messages[0].payload)
            print("3000 W: write", request.words, "at", request.address)
            await client.write_registers(request.address, request.words, device_id=1)
            back = await client.read_holding_registers(
                request.address, count=len(request.words), device_id=1
            )
            result = WriteResult(command=request.command, ok=True, words=list(back.registers))
            answer = pipeline.feed(
                "battery", write_result(int(time.time() * 1000), result), received_at=now
            )
            print("answer:", answer.commands[0].state, answer.messages[0].topic)
        finally:
            client.close()


if __name__ == "__main__":
    asyncio.run(main())
