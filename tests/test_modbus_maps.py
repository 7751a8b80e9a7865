"""Every shipped register map, served by the simulator and polled by the worker's Modbus
source (real pymodbus on both sides), decodes to plausible canonical values."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from energybus.adapters import ModbusEndpoint
from energybus.adapters.modbus import (
    ModbusAdapter,
    ModbusDeviceOptions,
    ModbusOptions,
    WriteRequest,
    map_names,
    write_request,
)
from energybus.messages import Message
from energybus.samples import Reading
from energybus.simulators.modbus import ModbusSimulator, load_simulated_map
from energybus.worker.metrics import Metrics
from energybus.worker.sources import Delivery, ModbusSource
from energybus.worker.sources.modbus import PollOutbox
from tests.modbus import serial_line
from tools.services import free_port

SHIPPED = map_names()
MAPS = Path(__file__).resolve().parent / "maps"


class _Open:
    """A dispatcher gate that is always open."""

    def is_open(self) -> bool:
        return True

    async def wait_open(self) -> None:
        return None


class _Closed:
    """A dispatcher gate that stays closed (the bus is away)."""

    def is_open(self) -> bool:
        return False

    async def wait_open(self) -> None:
        await asyncio.sleep(3600)


def _source(
    endpoints: list[ModbusEndpoint], tmp_path: Path, deliver: Callable[[Delivery], None]
) -> ModbusSource:
    return ModbusSource(
        name="modbus:poller",
        endpoints=endpoints,
        outbox=tmp_path / "polls.sqlite3",
        outbox_max_bytes=10_000_000,
        metrics=Metrics(),
        deliver=deliver,
        gate=_Open(),
    )


class _Delivered(list[Delivery]):
    """A deliver callback that keeps every delivery and releases it at once."""

    def __call__(self, delivery: Delivery) -> None:
        self.append(delivery)
        delivery.entry.release()

    def kinds(self) -> list[bytes]:
        return [d.payload[:1] for d in self]


def _one(
    map_name: str, *, name: str = "dev", mapping: Path | None = None, **settings: Any
) -> tuple[ModbusAdapter, ModbusEndpoint]:
    """An adapter with one device, and the endpoint its poller gets."""
    adapter = ModbusAdapter(
        options=ModbusOptions(
            site="lab",
            mapping=None if mapping is None else str(mapping),
            devices={name: ModbusDeviceOptions(map=map_name, **settings)},
        )
    )
    endpoint = adapter.sources[0].endpoint
    assert isinstance(endpoint, ModbusEndpoint)
    return adapter, endpoint


async def _poll_until(source: ModbusSource, done: Callable[[], bool], timeout: float = 10) -> None:
    task = asyncio.create_task(source.run())
    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await source.close()


def test_every_map_is_shipped() -> None:
    assert SHIPPED == [
        "abb_b23",
        "eastron_sdm630",
        "growatt_tl3x",
        "siemens_pac2200",
        "sunspec_battery",
    ]


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_map_decodes_from_the_simulator(name: str, tmp_path: Path) -> None:
    register_map = load_simulated_map(name)
    port = free_port()
    adapter, endpoint = _one(name, port=port, interval_s=0.1)
    delivered = _Delivered()

    async def main() -> None:
        async with ModbusSimulator(register_map, port=port, seed=7, tick_s=0.05):
            await _poll_until(_source([endpoint], tmp_path, delivered), lambda: len(delivered) >= 2)

    asyncio.run(main())
    assert len(delivered) >= 2
    out = adapter.normalize("dev", delivered[-1].payload, datetime.now(UTC))
    assert out.rejections == []
    readings: list[Reading] = out.readings
    assert [r.quality for r in readings] == ["good"]
    values: dict[str, Any] = {m: v for m, v, _, _ in readings[0].values}
    expected = {
        metric
        for register in register_map.registers
        if register.field is not None
        for metric in (
            [b.metric for b in register.row.bits.values()]
            if register.row.bits is not None
            else [register.metric]
        )
    }
    assert set(values) == expected
    for register in register_map.registers:
        if register.field is None or register.row.bits is not None:
            continue
        metric, _, unit, _, lo, hi, _, _ = register.field.hot
        value = values[metric]
        assert isinstance(value, int | float) and math.isfinite(value)
        assert lo <= value <= hi, (metric, value, unit)


def test_a_dead_device_does_not_delay_the_others(tmp_path: Path) -> None:
    register_map = load_simulated_map("eastron_sdm630")
    ports = [free_port(), free_port()]
    adapter = ModbusAdapter(
        options=ModbusOptions(
            site="lab",
            devices={
                "healthy": ModbusDeviceOptions(
                    map="eastron_sdm630", port=ports[0], interval_s=0.1, timeout_s=0.5
                ),
                "hung": ModbusDeviceOptions(
                    map="eastron_sdm630", port=ports[1], interval_s=0.1, timeout_s=0.5, retries=2
                ),
            },
        )
    )
    endpoints = [d.endpoint for d in adapter.sources if isinstance(d.endpoint, ModbusEndpoint)]
    counts = {"healthy": 0, "hung": 0}

    def deliver(delivery: Delivery) -> None:
        counts[delivery.topic] += 1
        delivery.entry.release()

    async def main() -> float:
        async with (
            ModbusSimulator(register_map, port=ports[0]) as healthy,
            ModbusSimulator(register_map, port=ports[1]) as hung,
        ):
            hung.silent = True
            started = time.monotonic()
            await _poll_until(
                _source(endpoints, tmp_path, deliver), lambda: counts["healthy"] >= 20, timeout=6
            )
            assert healthy.reads > 0
            return time.monotonic() - started

    elapsed = asyncio.run(main())
    # Each poll of the hung device takes 3 tries of 0.5 s: had the healthy device waited
    # behind it, 20 polls would take over 30 s.
    assert counts["healthy"] >= 20
    assert elapsed < 6
    assert counts["hung"] == 0


class _Token:
    def __init__(self) -> None:
        self.outcome: str | None = None

    def release(self) -> None:
        self.outcome = "sent"

    def fail(self, reason: str) -> None:
        self.outcome = f"failed: {reason}"

    def uncertain(self, reason: str) -> None:
        self.outcome = f"uncertain: {reason}"


@pytest.mark.parametrize("transport", ["rtu-over-tcp", "rtu"])
def test_rtu_frames_over_tcp_and_over_a_serial_line(transport: str, tmp_path: Path) -> None:
    """The same device through an RTU gateway on TCP and on a serial line (two
    pseudo-terminals joined like a null-modem cable): polled, and a setpoint written and
    read back."""
    register_map = load_simulated_map(str(MAPS / "test_battery.toml"))
    port = free_port()
    with serial_line() as (device_side, worker_side):
        settings: dict[str, Any] = (
            {"transport": "rtu", "serial_port": worker_side, "baudrate": 19200}
            if transport == "rtu"
            else {"transport": "rtu-over-tcp", "port": port}
        )
        adapter, endpoint = _one(
            "test_battery", name="bat", mapping=MAPS, interval_s=0.1, **settings
        )
        delivered = _Delivered()

        token = _Token()
        request = WriteRequest(command="c1", device="bat", address=200, words=[0, 1500])

        async def main() -> list[tuple[int, list[int]]]:
            simulator = ModbusSimulator(
                register_map,
                port=port,
                transport=transport,  # type: ignore[arg-type]
                serial_port=device_side,
                baudrate=19200,
            )
            async with simulator:
                source = _source([endpoint], tmp_path, delivered)
                source.publish(Message("modbus/bat", write_request(request), 1, False), token)
                await _poll_until(source, lambda: len(delivered) >= 3)
                return list(simulator.writes)

        writes = asyncio.run(main())
    assert writes == [(200, [0, 1500])]
    assert token.outcome == "sent"
    kinds = delivered.kinds()
    assert b"W" in kinds and b"P" in kinds
    results = [adapter.normalize("bat", d.payload, datetime.now(UTC)) for d in delivered]
    polls = [r for d, r in zip(delivered, results, strict=True) if d.payload[:1] == b"P"]
    assert all(not r.rejections and r.readings for r in polls)
    written = next(d for d in delivered if d.payload[:1] == b"W").payload
    assert b'"ok":true' in written and b'"words":[0,1500]' in written


def test_the_simulated_battery_follows_its_setpoint() -> None:
    """Counters grow, and the state of charge follows the power written: down while
    discharging (a positive setpoint), up while charging."""
    simulator = ModbusSimulator(load_simulated_map(str(MAPS / "test_battery.toml")), seed=3)
    simulator.set_value("soc", 50.0)
    simulator._pinned.clear()  # let it move again from 50 %
    energy = simulator.value("energy")
    simulator._values["setpoint"] = 5000.0
    for _ in range(3):
        simulator._last -= 10  # ten seconds a tick
        simulator.tick()
    assert simulator.value("soc") < 50.0
    assert simulator.value("energy") > energy
    low = simulator.value("soc")
    simulator._values["setpoint"] = -5000.0
    simulator._last -= 10
    simulator.tick()
    assert simulator.value("soc") > low


def test_a_driver_fault_is_a_failed_read_not_a_dead_line(tmp_path: Path) -> None:
    """Whatever the driver raises on a device's answer becomes a failed read with its
    reason; the line goes on polling."""
    _, endpoint = _one("eastron_sdm630", retries=1)
    source = _source([endpoint], tmp_path, lambda delivery: None)

    class Broken:
        connected = True
        calls = 0

        async def read_input_registers(self, *args: Any, **kwargs: Any) -> Any:
            Broken.calls += 1
            raise ValueError("unpack requires a buffer of 4 bytes")

        def close(self) -> None:
            pass

    line = source.lines[0]
    line.client = Broken()
    registers, why = asyncio.run(source._read(line, endpoint, "input", 0, 2))
    assert registers is None
    assert why == "unpack requires a buffer of 4 bytes"
    assert Broken.calls == 2  # the first try and one retry


def test_a_write_that_expired_or_whose_scale_factor_changed_is_not_written(
    tmp_path: Path,
) -> None:
    register_map = load_simulated_map(str(MAPS / "test_battery.toml"))
    port = free_port()
    _, endpoint = _one("test_battery", name="bat", mapping=MAPS, port=port, interval_s=5)
    past = int(time.time() * 1000) - 1
    requests = {
        "expired": WriteRequest(
            command="c1", device="bat", address=200, words=[0, 10], expires_ms=past
        ),
        # power_sf (103) holds 0 in the simulator; the command was encoded against 1.
        "guard": WriteRequest(
            command="c2", device="bat", address=200, words=[0, 20], guard=[(103, 1)]
        ),
        "fine": WriteRequest(
            command="c3", device="bat", address=200, words=[0, 30], guard=[(103, 0)]
        ),
    }
    tokens = {name: _Token() for name in requests}
    delivered = _Delivered()

    async def main() -> list[tuple[int, list[int]]]:
        async with ModbusSimulator(register_map, port=port) as simulator:
            source = _source([endpoint], tmp_path, delivered)
            for name, request in requests.items():
                source.publish(
                    Message("modbus/bat", write_request(request), 1, False), tokens[name]
                )
            await _poll_until(source, lambda: tokens["fine"].outcome is not None)
            return list(simulator.writes)

    writes = asyncio.run(main())
    assert writes == [(200, [0, 30])]
    assert tokens["expired"].outcome == (
        "failed: the command expired before the device's line could write it"
    )
    assert (tokens["guard"].outcome or "").startswith("failed: the device's scale factor at 103")
    assert tokens["fine"].outcome == "sent"


def test_a_write_left_unanswered_is_read_back_on_a_new_connection(tmp_path: Path) -> None:
    """The device takes the write but its answer is lost: the poller reconnects and
    reads back, so the result says what the device holds."""
    register_map = load_simulated_map(str(MAPS / "test_battery.toml"))
    port = free_port()
    _, endpoint = _one(
        "test_battery", name="bat", mapping=MAPS, port=port, interval_s=5, timeout_s=0.3
    )
    token = _Token()
    delivered = _Delivered()

    async def main() -> None:
        simulator = ModbusSimulator(register_map, port=port)
        original = simulator._action

        async def slow_write(
            fc: int, start: int, address: int, count: int, regs: Any, values: Any
        ) -> Any:
            result = await original(fc, start, address, count, regs, values)
            if values is not None:
                await asyncio.sleep(1.0)  # applied, answered too late
            return result

        simulator._action = slow_write  # type: ignore[method-assign,assignment]
        async with simulator:
            source = _source([endpoint], tmp_path, delivered)
            request = WriteRequest(command="c1", device="bat", address=200, words=[0, 40])
            source.publish(Message("modbus/bat", write_request(request), 1, False), token)
            await _poll_until(source, lambda: any(d.payload[:1] == b"W" for d in delivered))

    asyncio.run(main())
    assert (token.outcome or "").startswith("uncertain: modbus device bat: no answer to the write")
    result = next(d.payload for d in delivered if d.payload[:1] == b"W")
    assert b'"ok":false' in result and b'"words":[0,40]' in result


def test_simulate_modbus_serves_until_a_signal_and_says_what_it_served() -> None:
    import signal
    import subprocess
    import sys

    from pymodbus.client import AsyncModbusTcpClient

    port = free_port()
    command = [sys.executable, "-m", "energybus.cli", "simulate", "modbus"]
    process = subprocess.Popen(
        [*command, "--map", "eastron_sdm630", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == (
            f"ready    eastron_sdm630 on 127.0.0.1 port {port}, unit 1; SIGINT or SIGTERM stops\n"
        )

        async def read() -> list[int]:
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
            await client.connect()
            try:
                response = await client.read_input_registers(0, count=2, device_id=1)
                return list(response.registers)
            finally:
                client.close()

        assert len(asyncio.run(read())) == 2
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:  # a failed step leaves no server behind
            process.kill()
            process.communicate()
    assert out == "stopped  1 reads served, 0 writes taken\n"
    assert err == "" and process.returncode == 0
    config = subprocess.run(
        [*command, "--map", "sunspec_battery", "--devices", "2", "--print-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "[adapters.modbus.devices.sunspec-battery-2]" in config.stdout
    bad = subprocess.run([*command, "--map", "nope"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.startswith("error    no register map 'nope'")
    assert "Traceback" not in bad.stderr


def test_a_device_whose_sunspec_chain_is_not_the_maps_is_neither_read_nor_written(
    tmp_path: Path,
) -> None:
    """The map's addresses hold only for its model chain: a device with a single-phase
    inverter model (101) where the map expects 103 gets no poll and no write."""
    register_map = load_simulated_map("sunspec_battery")
    port = free_port()
    _, endpoint = _one("sunspec_battery", name="inv", port=port, interval_s=0.1, offline_after=2)
    assert endpoint.identity[:2] == ((40000, (0x5375, 0x6E53)), (40002, (1, 66)))
    delivered = _Delivered()

    token = _Token()

    async def main() -> list[tuple[int, list[int]]]:
        simulator = ModbusSimulator(register_map, port=port)
        simulator.memory["holding"][40070] = 101  # not the 103 the map's addresses assume
        async with simulator:
            source = _source([endpoint], tmp_path, delivered)
            request = WriteRequest(command="c1", device="inv", address=40152, words=[1000])
            source.publish(Message("modbus/inv", write_request(request), 1, False), token)
            await _poll_until(source, lambda: any(d.payload[:1] == b"F" for d in delivered))
            return list(simulator.writes)

    assert asyncio.run(main()) == []
    assert delivered.kinds() == [b"F"]
    assert b"not the device its map describes: register 40070 holds [101, 50]" in (
        delivered[0].payload
    )
    assert (token.outcome or "").startswith("failed: modbus device inv: it is not the device")


# Failure paths of the poller: each gives one clear line and loses nothing it took. -------


def test_a_full_poll_outbox_drops_new_polls_counts_them_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bound holds: past it a poll is dropped (counted, one log line) and the line
    goes on polling; what the outbox holds stays in it."""
    register_map = load_simulated_map("eastron_sdm630")
    port = free_port()
    _, endpoint = _one("eastron_sdm630", port=port, interval_s=0.05)
    delivered = _Delivered()
    metrics = Metrics()
    source = ModbusSource(
        name="modbus:poller",
        endpoints=[endpoint],
        outbox=tmp_path / "polls.sqlite3",
        outbox_max_bytes=250,  # two polls of 96 bytes
        metrics=metrics,
        deliver=delivered,
        gate=_Closed(),
    )

    async def main() -> int:
        async with ModbusSimulator(register_map, port=port) as simulator:
            polls = simulator.read_log  # every poll reads input 0 once
            await _poll_until(source, lambda: polls[("input", 0)] >= 6)
            return polls[("input", 0)]

    caplog.set_level(logging.ERROR, logger="energybus.worker.source")
    polls = asyncio.run(main())
    dropped = metrics.poll_outbox_dropped._value.get()
    # The last poll may have been cut short by the end of the run.
    assert polls >= 6 and polls - 2 - 1 <= dropped <= polls - 2
    assert delivered == []  # the gate stayed closed: nothing handed over
    full = [r for r in caplog.records if "the poll outbox is full" in r.getMessage()]
    assert len(full) == 1
    reopened = PollOutbox(tmp_path / "polls.sqlite3", max_bytes=250)
    assert reopened.rows == 2  # the two it took are still there for the next run
    reopened.close()


def test_a_poll_outbox_that_cannot_open_is_one_error_line_and_no_polling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, endpoint = _one("eastron_sdm630", port=free_port(), interval_s=0.05)
    blocked = tmp_path / "polls.sqlite3"
    blocked.mkdir()  # a directory where the file should be
    source = _source([endpoint], tmp_path, _Delivered())
    source.outbox_path = blocked
    caplog.set_level(logging.ERROR, logger="energybus.worker.source")

    async def main() -> None:
        task = asyncio.create_task(source.run())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "cannot open the poll outbox" in lines[0]
    assert all(r.exc_info is None for r in caplog.records)


def test_a_serial_port_that_is_not_there_takes_the_device_offline(tmp_path: Path) -> None:
    _, endpoint = _one(
        "eastron_sdm630",
        transport="rtu",
        serial_port=str(tmp_path / "ttyUSB9"),
        interval_s=0.05,
        offline_after=2,
    )
    delivered = _Delivered()
    asyncio.run(_poll_until(_source([endpoint], tmp_path, delivered), lambda: bool(delivered), 10))
    assert delivered.kinds() == [b"F"]
    assert f"no connection to {tmp_path / 'ttyUSB9'} unit 1".encode() in delivered[0].payload


def test_a_write_the_device_refuses_is_rejected_with_its_exception(tmp_path: Path) -> None:
    """A register the device does not let be written (its state of charge) answers the
    write with an exception: the command fails with it, nothing changed."""
    register_map = load_simulated_map(str(MAPS / "test_battery.toml"))
    port = free_port()
    _, endpoint = _one("test_battery", name="bat", mapping=MAPS, port=port, interval_s=5)
    token = _Token()

    async def main() -> list[tuple[int, list[int]]]:
        async with ModbusSimulator(register_map, port=port) as simulator:
            source = _source([endpoint], tmp_path, _Delivered())
            request = WriteRequest(command="c1", device="bat", address=100, words=[500])
            source.publish(Message("modbus/bat", write_request(request), 1, False), token)
            await _poll_until(source, lambda: token.outcome is not None)
            return list(simulator.writes)

    assert asyncio.run(main()) == []
    assert token.outcome == "failed: modbus device bat refused the write (exception 2)"
