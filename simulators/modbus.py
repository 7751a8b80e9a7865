"""A Modbus device, played by a pymodbus server from a register map.

:class:`ModbusSimulator` serves one map (``mappings/modbus/<map>.toml``) on a TCP port
(Modbus TCP, or RTU frames over TCP as a serial gateway passes them) or a serial port
(RTU) with plausible values that change: measurements wander around a value typical of their
unit, counters only grow (by the device's power), a state of charge follows the battery
setpoints written to it, and a SunSpec map's model chain (``SunS`` marker, model IDs and
lengths) is served at the addresses the map assumes, so ``energybus modbus scan`` finds it.

For tests it also records every write the device accepts (:attr:`ModbusSimulator.writes`),
can set a register to any raw value or to its "not implemented" pattern, change a scale
factor, stop answering (:attr:`ModbusSimulator.silent`) and go away and come back
(:meth:`stop`, :meth:`start`). Registers outside the map's reads answer with an
exception, as a real device does; registers the map does not declare writable refuse
writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Final, Literal

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from energybus.adapters.modbus import Register, RegisterMap, load_map, map_path
from energybus.adapters.registers import encode_registers

__all__ = ["ModbusSimulator", "load_simulated_map"]

_SUNS: Final = (0x5375, 0x6E53)
_TYPICAL: Final[dict[str | None, tuple[float, float]]] = {
    # canonical unit: (typical value, wander)
    "W": (2000.0, 300.0),
    "VA": (2100.0, 300.0),
    "var": (300.0, 100.0),
    "V": (230.0, 2.0),
    "A": (8.0, 1.0),
    "Hz": (50.0, 0.02),
    "%": (50.0, 0.0),
    "°C": (25.0, 1.0),
    "Wh": (1_000_000.0, 0.0),
    None: (1.0, 0.0),
}
_SF_DEFAULT: Final[dict[str, int]] = {
    "W": 0,
    "VA": 0,
    "var": 0,
    "V": -1,
    "A": -2,
    "Hz": -2,
    "%": -1,
    "°C": -1,
}
_FC_WRITE: Final = frozenset({6, 16, 22, 23})
BATTERY_WH: Final = 1000.0
"""The simulated battery's capacity: small, so that a demo sees its charge move."""
BATTERY_W: Final = 5000.0
"""The power of a rate setpoint of 100 %."""


def load_simulated_map(name_or_path: str) -> RegisterMap:
    """A packaged map by name, or a map file by path."""
    path = Path(name_or_path)
    return load_map(path if path.suffix == ".toml" else map_path(name_or_path))


class ModbusSimulator:
    """One simulated device on ``host:port`` (unit ``unit_id``, default: the map's)."""

    def __init__(
        self,
        register_map: RegisterMap,
        *,
        host: str = "127.0.0.1",
        port: int = 5020,
        unit_id: int | None = None,
        seed: int | None = None,
        tick_s: float = 1.0,
        transport: Literal["tcp", "rtu-over-tcp", "rtu"] = "tcp",
        serial_port: str | None = None,
        baudrate: int = 9600,
    ) -> None:
        if transport == "rtu" and not serial_port:
            raise ValueError("transport rtu needs serial_port")
        self.map = register_map
        self.host = host
        self.port = port
        self.transport = transport
        self.serial_port = serial_port
        self.baudrate = baudrate
        self.unit_id = register_map.device.unit_id if unit_id is None else unit_id
        self.tick_s = tick_s
        self.random = random.Random(seed)
        self.writes: list[tuple[int, list[int]]] = []
        """Every write the device accepted: (address, words)."""
        self.refused_writes: list[tuple[int, list[int]]] = []
        self.silent = False
        """While true the device takes requests and never answers (a hung device)."""
        self.reads = 0
        self.read_log: Counter[tuple[str, int]] = Counter()
        """Reads served, by (table, address) of the request."""
        self.memory: dict[str, dict[int, int]] = {"holding": {}, "input": {}}
        self._pinned: set[tuple[str, int]] = set()
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._writable: set[int] = set()
        self._values: dict[str, float] = {}
        self._scales: dict[int, int] = {}
        self._last = time.monotonic()
        self._layout()
        self._initial()

    # Memory ----------------------------------------------------------------------------

    def _layout(self) -> None:
        for register in self.map.registers:
            for offset in range(register.words):
                self.memory[register.table][register.address + offset] = 0
            if register.to_device is not None:
                self._writable.update(range(register.address, register.address + register.words))
        chain = self.map.device.sunspec
        if chain is not None:
            holding = self.memory["holding"]
            holding[chain.base], holding[chain.base + 1] = _SUNS
            for model, address, length in chain.addresses():
                holding[address] = model
                holding[address + 1] = length
                for offset in range(length):
                    holding.setdefault(address + 2 + offset, 0)
            holding[chain.end] = 0xFFFF
            holding[chain.end + 1] = 0
        # Every address a read of the map spans exists (gaps read as 0), as on a device.
        for read in self.map.layout().reads:
            table = self.memory[read.table]
            for address in range(read.address, read.address + read.count):
                table.setdefault(address, 0)

    def _initial(self) -> None:
        for register in self.map.registers:
            if register.sunssf:
                continue
            unit = register.field.hot[2] if register.field is not None else None
            if register.scale_index >= 0:
                sf = _SF_DEFAULT.get(unit or "", 0)
                self._scales[register.scale_index] = sf
                self._put_raw(self.map.registers[register.scale_index], sf)
            self._values[register.name] = self._typical(register)
            self._put(register, self._values[register.name])

    def _typical(self, register: Register) -> float:
        row = register.row
        if row.enum is not None:
            return float(min(int(code) for code in row.enum))
        if row.bits is not None or row.lookup is not None:
            return 0.0
        assert register.field is not None
        metric, _, unit, _, lo, hi, _, _ = register.field.hot
        typical, _ = _TYPICAL.get(unit, (1.0, 0.0))
        if metric == "power_factor":
            typical = 0.95
        if register.to_device is not None:
            typical = 0.0  # a setpoint starts idle
        if not lo <= typical <= hi:
            typical = lo if math.isfinite(lo) and lo > typical else min(hi, max(lo, typical))
        return typical

    def _put(self, register: Register, value: float) -> None:
        """Store a canonical value into the register's words (through unit, scale and
        scale factor), unless a test pinned the register to a raw value."""
        if (register.table, register.address) in self._pinned:
            return
        raw = value
        row = register.row
        if row.enum is None and row.bits is None and row.lookup is None:
            raw = _to_device(register, value)
            if register.scale_index >= 0:
                raw = raw / 10.0 ** self._scales.get(register.scale_index, 0)
        if register.format not in "fd":
            raw = _clamp_int(register, round(raw))
        self._put_raw(register, raw)

    def _put_raw(self, register: Register, raw: float) -> None:
        words = encode_registers(
            register.type, raw, word_order=register.word_order, byte_order=register.byte_order
        )
        table = self.memory[register.table]
        for offset, word in enumerate(words):
            table[register.address + offset] = word

    def register(self, name: str) -> Register:
        for register in self.map.registers:
            if register.name == name:
                return register
        raise KeyError(f"map {self.map.name} has no register {name!r}")

    def set_value(self, name: str, value: float) -> None:
        """Hold a register at a canonical value (it stops wandering)."""
        register = self.register(name)
        self._pinned.discard((register.table, register.address))
        self._values[name] = value
        self._put(register, value)
        self._pinned.add((register.table, register.address))

    def set_raw(self, name: str, raw: float) -> None:
        """Hold a register at a raw value (a "not implemented" pattern, a broken read)."""
        register = self.register(name)
        self._put_raw(register, raw)
        self._pinned.add((register.table, register.address))

    def set_words(self, name: str, words: list[int]) -> None:
        register = self.register(name)
        table = self.memory[register.table]
        for offset, word in enumerate(words):
            table[register.address + offset] = word
        self._pinned.add((register.table, register.address))

    def not_implemented(self, name: str) -> None:
        """Make a register read as its type's "not implemented" pattern."""
        register = self.register(name)
        pattern = register.not_implemented
        if pattern is None and register.nan:
            pattern = math.nan
        if pattern is None:
            raise ValueError(f"{name} has no 'not implemented' pattern")
        self._put_raw(register, pattern)
        self._pinned.add((register.table, register.address))

    def set_scale(self, scale_register: str, sf: int) -> None:
        """Change a scale factor; the values it scales keep their meaning (their raw
        words change with it), as on a device that rescales."""
        target = self.register(scale_register)
        self._scales[target.index] = sf
        self._put_raw(target, sf)
        for register in self.map.registers:
            if register.scale_index == target.index and register.name in self._values:
                key = (register.table, register.address)
                pinned = key in self._pinned
                self._pinned.discard(key)
                self._put(register, self._values[register.name])
                if pinned:
                    self._pinned.add(key)

    def value(self, name: str) -> float:
        return self._values[name]

    # Serving ---------------------------------------------------------------------------

    def _device(self) -> SimDevice:
        blocks: dict[str, list[SimData]] = {"holding": [], "input": []}
        for table, memory in self.memory.items():
            addresses = sorted(memory)
            start = 0
            while start < len(addresses):
                end = start
                writable = addresses[start] in self._writable
                while (
                    end + 1 < len(addresses)
                    and addresses[end + 1] == addresses[end] + 1
                    and (addresses[end + 1] in self._writable) == writable
                ):
                    end += 1
                first = addresses[start]
                blocks[table].append(
                    SimData(
                        first,
                        values=[memory[a] for a in addresses[start : end + 1]],
                        datatype=DataType.REGISTERS,
                        readonly=not writable,
                    )
                )
                start = end + 1
        # Separate holding and input spaces ("non-shared"): FC 03 and FC 04 read
        # different registers at the same address, as on most meters.
        # pymodbus wants every space declared: an empty one is one invalid register.
        nothing = [SimData(0, values=[False] * 16, datatype=DataType.BITS, readonly=True)]
        simdata = (
            nothing,
            list(nothing),
            blocks["holding"] or [SimData(0, datatype=DataType.INVALID)],
            blocks["input"] or [SimData(0, datatype=DataType.INVALID)],
        )
        return SimDevice(self.unit_id, simdata=simdata, action=self._action)

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if self.silent:
            # A hung device: no answer while silent, and a request it held is dropped
            # afterwards (never applied late, never answered late).
            while self.silent:
                await asyncio.sleep(0.05)
            return ExcCodes.DEVICE_BUSY
        table = "input" if function_code == 4 else "holding"
        memory = self.memory[table]
        if function_code in _FC_WRITE and values is not None:
            words = [int(v) for v in values]
            if not all(a in self._writable for a in range(address, address + len(words))):
                self.refused_writes.append((address, words))
                return ExcCodes.ILLEGAL_ADDRESS
            self.writes.append((address, words))
            for offset, word in enumerate(words):
                memory[address + offset] = word
            self._took(address)
            return None
        self.reads += 1
        self.read_log[(table, address)] += 1
        for offset in range(count):
            current = memory.get(address + offset)
            if current is not None:
                registers[address - start_address + offset] = current
        return None

    def _took(self, address: int) -> None:
        """A setpoint was written: remember its canonical value for the physics."""
        for register in self.map.registers:
            if register.address == address and register.to_device is not None:
                words = [self.memory["holding"][address + i] for i in range(register.words)]
                raw = struct.unpack(
                    ">" + register.format, b"".join(w.to_bytes(2, "big") for w in words)
                )[0]
                if register.scale_index >= 0:
                    raw = raw * 10.0 ** self._scales.get(register.scale_index, 0)
                self._values[register.name] = _from_device(register, raw)

    async def start(self) -> None:
        if self._server is not None:
            return
        if self.transport == "rtu":
            assert self.serial_port is not None
            self._server = ModbusSerialServer(
                context=self._device(),
                port=self.serial_port,
                framer=FramerType.RTU,
                baudrate=self.baudrate,
            )
        else:
            framer = FramerType.RTU if self.transport == "rtu-over-tcp" else FramerType.SOCKET
            self._server = ModbusTcpServer(
                context=self._device(), address=(self.host, self.port), framer=framer
            )
        await self._server.serve_forever(background=True)
        if self._ticker is None:
            self._last = time.monotonic()
            self._ticker = asyncio.create_task(self._tick_forever())

    async def stop(self) -> None:
        """Go away: the port closes and connections drop (the memory is kept)."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def __aenter__(self) -> ModbusSimulator:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # Physics ---------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()

    def tick(self) -> None:
        """Move every value one step: wander, grow, charge or discharge."""
        now = time.monotonic()
        dt = now - self._last
        self._last = now
        power = self.battery_power()
        for register in self.map.registers:
            if register.field is None or register.to_device is not None:
                continue
            if (register.table, register.address) in self._pinned:
                continue
            metric, _, unit, _, lo, hi, _, _ = register.field.hot
            value = self._values.get(register.name, 0.0)
            if metric == "soc":
                value -= dt * power / (BATTERY_WH * 36.0)
            elif metric.endswith("_total"):
                value += dt * (abs(power) or 2000.0) / 3600.0
            elif register.row.enum is None and register.row.bits is None:
                typical, wander = _TYPICAL.get(unit, (1.0, 0.0))
                if metric == "power_factor":
                    typical, wander = 0.95, 0.01
                if metric == "active_power" and power:
                    typical = power
                value = typical + self.random.uniform(-wander, wander)
            value = min(max(value, lo), hi)
            self._values[register.name] = value
            self._put(register, value)

    def battery_power(self) -> float:
        """The battery's power in W (discharge positive) from the setpoints written: a
        ``power_setpoint`` in W, or rate setpoints in percent of :data:`BATTERY_W`."""
        power = 0.0
        # A SunSpec storage control mode gates the rates: bit 0 charge, bit 1 discharge.
        modes = [r for r in self.map.registers if r.metric == "storage_control_mode"]
        mode = int(self._values.get(modes[0].name, 0)) if modes else 3
        for register in self.map.registers:
            metric = register.metric
            if register.to_device is None or metric is None:
                continue
            value = self._values.get(register.name, 0.0)
            if metric == "power_setpoint":
                power += value
            elif "discharge_rate" in metric and mode & 2:
                power += value * BATTERY_W / 100.0
            elif "charge_rate" in metric and mode & 1:
                power -= value * BATTERY_W / 100.0
        return power


def _to_device(register: Register, value: float) -> float:
    assert register.field is not None
    convert = register.field.hot[1]
    # The field converts raw -> canonical; its inverse is what a device would hold.
    if convert is None:
        return value
    one = convert(1.0)
    return value / one if one else value


def _from_device(register: Register, raw: float) -> float:
    assert register.field is not None
    convert = register.field.hot[1]
    return float(raw if convert is None else convert(raw))


def _clamp_int(register: Register, raw: int) -> int:
    bits = 16 * register.words
    if register.format.islower():  # signed
        return max(-(1 << (bits - 1)) + 1, min((1 << (bits - 1)) - 2, raw))
    return max(0, min((1 << bits) - 2, raw))


def site_config(register_map: RegisterMap, *, site: str, host: str, port: int, devices: int) -> str:
    """The ``[adapters.modbus]`` configuration that polls simulated devices."""
    lines = ["[adapters.modbus]", f'site = "{site}"', ""]
    stem = register_map.name.replace("_", "-")
    for i in range(devices):
        name = stem if devices == 1 else f"{stem}-{i + 1}"
        lines += [
            f"[adapters.modbus.devices.{name}]",
            f'map = "{register_map.name}"',
            f'host = "{host}"',
            f"port = {port + i}",
            "interval_s = 1.0",
            "",
        ]
    return "\n".join(lines)
