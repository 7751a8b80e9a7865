"""Simulated Modbus devices for tests: pymodbus servers in a thread of their own."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from energybus.simulators.modbus import ModbusSimulator, load_simulated_map
from tools.services import free_port

T = TypeVar("T")


class Devices:
    """Simulators served by an event loop in a thread; the test thread talks to them
    through :meth:`call` and :meth:`run`, never touching them directly."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.simulators: dict[str, ModbusSimulator] = {}

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return function()

        return self.run(wrapped())

    def add(
        self, name: str, map_name: str, *, tick_s: float = 0.2, seed: int = 1
    ) -> ModbusSimulator:
        port = free_port()

        async def start() -> ModbusSimulator:
            simulator = ModbusSimulator(
                load_simulated_map(map_name), port=port, tick_s=tick_s, seed=seed
            )
            await simulator.start()
            return simulator

        simulator = self.run(start())
        self.simulators[name] = simulator
        return simulator

    def stop(self, name: str) -> None:
        self.run(self.simulators[name].stop())

    def start(self, name: str) -> None:
        self.run(self.simulators[name].start())

    def close(self) -> None:
        for simulator in self.simulators.values():
            self.run(simulator.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def devices() -> Iterator[Devices]:
    served = Devices()
    try:
        yield served
    finally:
        served.close()


def device_config(name: str, simulator: ModbusSimulator, **settings: Any) -> str:
    lines = [
        f"[adapters.modbus.devices.{name}]",
        f'map = "{simulator.map.name}"',
        f"port = {simulator.port}",
    ]
    for key, value in settings.items():
        if isinstance(value, str) and not value.startswith("{"):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


@contextmanager
def serial_line() -> Iterator[tuple[str, str]]:
    """Two serial ports joined by a null-modem cable: pseudo-terminals whose bytes a
    thread copies across, so an RTU server and client can talk as on an RS-485 pair."""
    import os
    import select
    import tty

    a_master, a_slave = os.openpty()
    b_master, b_slave = os.openpty()
    for fd in (a_slave, b_slave):
        tty.setraw(fd)
    paths = (os.ttyname(a_slave), os.ttyname(b_slave))
    stop = threading.Event()

    def copy() -> None:
        peers = {a_master: b_master, b_master: a_master}
        while not stop.is_set():
            ready, _, _ = select.select(list(peers), [], [], 0.05)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                os.write(peers[fd], data)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    try:
        yield paths
    finally:
        stop.set()
        thread.join(5)
        for fd in (a_master, a_slave, b_master, b_slave):
            os.close(fd)
