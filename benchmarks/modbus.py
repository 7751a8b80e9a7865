"""Modbus: registers decoded per second per core, and poll rounds of many devices.

    ./dev bench --only modbus-decode --seconds 5
    ./dev bench --only modbus-poll --seconds 10     # 50 devices of 100 registers, 0 and 5 hung

``modbus-decode`` feeds the adapter polls of every shipped map (and of the benchmark's
100-register device) as the poller hands them over, in one process on one core: once
through the layout's decoder alone (raw words to numbers), once through ``normalize``
(decode, "not implemented", scale factors, unit conversion, plausibility, readings).

``modbus-poll`` runs ``energybus simulate modbus`` with 50 devices of 100 registers (one
read each) in a process of its own, and the worker's Modbus poller in this one, every
device on its own port and polled every second. It measures, per round, when the last
healthy device's poll was handed over (from the round's start), with no device hung and
with 5 that take requests and never answer (timeout 1 s, one retry); and the CPU of each
process.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from benchmarks.cpu import tree_seconds
from energybus.adapters import ModbusEndpoint
from energybus.adapters.modbus import (
    ModbusAdapter,
    ModbusDeviceOptions,
    ModbusOptions,
    load_map,
    map_names,
    map_path,
    poll_payload,
)
from energybus.simulators.modbus import ModbusSimulator
from energybus.worker.metrics import Metrics
from energybus.worker.sources import Delivery, ModbusSource

MAPS = Path(__file__).resolve().parent / "maps"
BENCH_MAP = MAPS / "bench_100.toml"


def _payload(adapter: ModbusAdapter, device: str, simulator: ModbusSimulator) -> bytes:
    layout = adapter.devices[device].layout
    words: list[int] = []
    for read in layout.reads:
        table = simulator.memory[read.table]
        words += [table.get(a, 0) for a in range(read.address, read.address + read.count)]
    return poll_payload(
        int(time.time() * 1000), [False] * len(layout.reads), words, fingerprint=layout.fingerprint
    )


def bench_modbus_decode(
    seconds: float, rate: Callable[[Callable[[], int], float], float]
) -> list[dict[str, object]]:
    paths = {name: map_path(name) for name in map_names()}
    paths["bench_100"] = BENCH_MAP
    return [_decode_figure(name, path, seconds, rate) for name, path in paths.items()]


def _decode_figure(
    name: str, path: Path, seconds: float, rate: Callable[[Callable[[], int], float], float]
) -> dict[str, object]:
    register_map = load_map(path)
    adapter = ModbusAdapter(
        options=ModbusOptions(site="bench", devices={"dev": ModbusDeviceOptions(map=name)}),
        mapping=str(path),
    )
    simulator = ModbusSimulator(register_map, seed=1)
    simulator.tick()
    payload = _payload(adapter, "dev", simulator)
    layout = adapter.devices["dev"].layout
    registers = len(layout.places)
    now = datetime.now(UTC)
    batch = 200

    def decode_only() -> int:
        for _ in range(batch):
            layout.decode(payload)
        return batch * registers

    def normalize() -> int:
        for _ in range(batch):
            adapter.normalize("dev", payload, now)
        return batch * registers

    out = adapter.normalize("dev", payload, now)
    assert not out.rejections, out.rejections
    normalized = rate(normalize, seconds / 2)
    return {
        "figure": "Modbus registers decoded per second per core",
        "map": name,
        "registers_per_poll": registers,
        "reads_per_poll": len(layout.reads),
        "decode_only": round(rate(decode_only, seconds / 2)),
        "normalize": round(normalized),
        "polls_per_second_normalized": round(normalized / registers),
    }


class _Open:
    def is_open(self) -> bool:
        return True

    async def wait_open(self) -> None:
        return None


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    import socket

    for start in range(20000, 60000, count):
        ok = True
        for port in range(start, start + count):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start
    raise RuntimeError("no free port range")


def _poll_run(devices: int, hung: int, seconds: float, interval: float) -> dict[str, object]:
    port = _free_ports(devices)
    simulator = subprocess.Popen(
        [
            sys.executable, "-m", "energybus.cli", "simulate", "modbus",
            "--map", str(BENCH_MAP), "--port", str(port), "--devices", str(devices),
            "--hang", str(hung),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert simulator.stdout is not None
        line = simulator.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"the simulator did not start: {line}")
        adapter = ModbusAdapter(
            options=ModbusOptions(
                site="bench",
                devices={
                    f"d{i:02d}": ModbusDeviceOptions(
                        map="bench_100", port=port + i, interval_s=interval, timeout_s=1.0
                    )
                    for i in range(devices)
                },
            ),
            mapping=str(MAPS),
        )
        endpoints = [s.endpoint for s in adapter.sources if isinstance(s.endpoint, ModbusEndpoint)]
        healthy = {f"d{i:02d}" for i in range(devices - hung)}
        seen: list[tuple[str, float]] = []

        def deliver(delivery: Delivery) -> None:
            seen.append((delivery.topic, time.monotonic()))
            delivery.entry.release()

        with TemporaryDirectory() as folder:
            source = ModbusSource(
                name="modbus:poller",
                endpoints=endpoints,
                outbox=Path(folder) / "polls.sqlite3",
                outbox_max_bytes=1 << 30,
                metrics=Metrics(),
                deliver=deliver,
                gate=_Open(),
            )
            cpu_sim = tree_seconds(simulator.pid)
            cpu_own = time.process_time()

            async def main() -> float:
                task = asyncio.create_task(source.run())
                started = time.monotonic()
                await asyncio.sleep(seconds)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await source.close()
                return started

            started = asyncio.run(main())
            cpu_own = time.process_time() - cpu_own
            cpu_sim = tree_seconds(simulator.pid) - cpu_sim
    finally:
        simulator.terminate()
        simulator.wait(30)
    rounds: dict[int, dict[str, float]] = {}
    for device, at in seen:
        if device in healthy:
            index = int((at - started) // interval)
            rounds.setdefault(index, {}).setdefault(device, at - started - index * interval)
    # Round 0 includes connecting; the last may be cut off by the end of the run.
    full = [r for i, r in sorted(rounds.items()) if 0 < i < max(rounds)]
    complete = [max(r.values()) for r in full]
    missing = sum(len(healthy) - len(r) for r in full)
    hung_polls = sum(1 for device, _ in seen if device not in healthy)
    return {
        "figure": "Modbus poll round: when the last healthy device's poll is handed over",
        "devices": devices,
        "registers_per_device": 100,
        "hung_devices": hung,
        "interval_s": interval,
        "rounds": len(full),
        "round_done_median_s": round(statistics.median(complete), 4) if complete else None,
        "round_done_max_s": round(max(complete), 4) if complete else None,
        "healthy_polls_missed": missing,
        "hung_deliveries": hung_polls,
        "cpu_poller_cores": round(cpu_own / seconds, 3),
        "cpu_simulator_cores": round(cpu_sim / seconds, 3),
    }


def bench_modbus_poll(seconds: float, devices: int = 50, hung: int = 5) -> list[dict[str, Any]]:
    return [_poll_run(devices, n, seconds, 1.0) for n in (0, hung)]
