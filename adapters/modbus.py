"""Modbus devices: register maps as data, decoded into canonical readings.

A register map (``mappings/modbus/<map>.toml``, docs/modbus.md) describes one device
family: the public register document it follows, and per register its address, table,
data type, word and byte order, fixed scale or scale-factor register, unit, metric and
whether it may be written. The site configuration names each device, its map and how to
reach it (``[adapters.modbus.devices.<name>]``).

This adapter is pure translation, like every other:

- at start-up it compiles each map and each device into a **layout**: the few reads a
  poll makes (contiguous registers grouped up to the device's ``max_registers`` per read
  and ``max_gap`` unused registers), and one precompiled :mod:`struct` that decodes every
  plain big-endian register of a poll in one call;
- the worker's Modbus poller (:attr:`sources`, one :class:`ModbusEndpoint` per device)
  does those reads and hands over one binary payload per poll (:func:`poll_payload`);
  :meth:`normalize` decodes it: "not implemented" patterns become quality ``bad`` with no
  number, scale-factor registers read in the same poll scale their values, and counters
  carry their register width as ``wrap_at`` (:meth:`counters`);
- a canonical ``set`` on a writable register passes the interlocks and the priority
  arbiter (:mod:`energybus.safety`, the one place every command to a device is checked)
  and becomes a write request for the poller (:func:`write_request`); the poller writes,
  reads back and hands the result over (:func:`write_result`), which confirms the
  command on ``value`` or rejects it with the reason.
"""

from __future__ import annotations

import functools
import math
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec

from energybus.admission import Admitted
from energybus.commands import CommandRecord
from energybus.errors import CommandError, EnergyBusError, MappingError, SourceError
from energybus.filters import canonical_filter
from energybus.messages import Message
from energybus.payloads import Scalar
from energybus.rows import device_id
from energybus.safety import Limits, Priority, Safety
from energybus.samples import Reading
from energybus.topics import EntityType, Topic, build_topic, to_kebab
from energybus.units import Conversion

from .base import (
    Adapter,
    Formatted,
    ModbusEndpoint,
    ModbusRead,
    Normalized,
    Plan,
    Rejection,
    SourceDeclaration,
)
from .engine import Field, implausible, refuse
from .mapping import (
    CommandOptions,
    Compiler,
    Document,
    MappingDocument,
    Positive,
    SeriesRow,
)
from .registers import REGISTER_TYPES, ByteOrder, WordOrder, decode_registers, encode_registers

__all__ = [
    "Layout",
    "ModbusAdapter",
    "ModbusDeviceOptions",
    "ModbusMap",
    "ModbusOptions",
    "RegisterMap",
    "SunSpecChain",
    "map_names",
    "map_path",
    "poll_payload",
    "unreachable_payload",
    "write_request",
    "write_result",
]

Table = Literal["holding", "input"]
UnitId = Annotated[int, msgspec.Meta(ge=0, le=255)]
Address = Annotated[int, msgspec.Meta(ge=0, le=65535)]

_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_HEADER: Final = struct.Struct(">cQHI")
"""A delivery's header: kind (``P`` poll, ``W`` write result, ``F`` unreachable), the
observation time in Unix milliseconds, and for a poll the number of reads and the
fingerprint of the layout it was read with."""
_STATE_METRICS: Final = frozenset({"soc", "temperature"})
"""Metrics the interlocks read from a device's polls."""
_SF_RANGE: Final = 10
"""A SunSpec scale factor outside -10..10 is taken as a broken read, not a value."""


# The map schema --------------------------------------------------------------------------


class DocumentRef(Document, frozen=True, kw_only=True):
    """The public register document a map follows."""

    title: str
    version: str = ""
    url: str = ""


class SunSpecChain(Document, frozen=True, kw_only=True):
    """The SunSpec model chain a map's addresses assume: the ``SunS`` marker at ``base``,
    then each model's ID and length registers before its points. The simulator serves
    it; ``energybus modbus scan`` tells whether a real device has the same chain."""

    base: Address = 40000
    models: list[tuple[int, int]]
    """``(model id, length)`` in chain order."""

    def addresses(self) -> list[tuple[int, int, int]]:
        """``(model id, address of its ID register, length)`` of every model."""
        found = []
        address = self.base + 2
        for model, length in self.models:
            found.append((model, address, length))
            address += length + 2
        return found

    @property
    def end(self) -> int:
        """Address of the end marker (0xFFFF)."""
        return self.base + 2 + sum(length + 2 for _, length in self.models)


class DeviceSection(Document, frozen=True, kw_only=True):
    """What holds for every register of a map unless the register says otherwise."""

    entity_type: EntityType
    unit_id: UnitId = 1
    table: Table = "holding"
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] = 125
    """The most registers the device returns for one read (the Modbus limit is 125)."""
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=125)] = 8
    """Unused registers one read may span rather than start another read. Some devices
    refuse a read that touches an address they do not implement: set 0 for those."""
    word_order: WordOrder = "big"
    byte_order: ByteOrder = "big"
    write_multiple: bool = True
    """Write with function 16 (write multiple registers), else function 6 for a
    one-register value."""
    sunspec: SunSpecChain | None = None


class RegisterRow(SeriesRow, frozen=True, kw_only=True):
    """One register (or run of registers) holding one value."""

    address: Address
    """The zero-based address on the wire (the PDU address)."""
    doc_address: str = ""
    """The address as the document prints it (``30073``, ``0x5B14``), for people."""
    table: Table | None = None
    data_type: str
    """A register type of :data:`~energybus.adapters.registers.REGISTER_TYPES`."""
    word_order: WordOrder | None = None
    byte_order: ByteOrder | None = None
    scale_register: str | None = None
    """A ``sunssf`` register of this map: the value is multiplied by 10 ** its value,
    read in the same poll (after ``scale``)."""
    not_implemented: bool | int = True
    """``true``: the type's pattern means "not implemented" (SunSpec's convention);
    ``false``: every pattern is a value; a number: that raw unsigned pattern instead
    (ABB's signed 0x7FFFFFFF)."""
    writable: bool = False
    limits: Limits | None = None
    """The device's own ratings for a writable register; the site adds its limits."""
    source: str = ""
    """Where the row comes from when not from the document itself."""


class ModbusMap(MappingDocument, frozen=True, kw_only=True):
    """A register map: one device family."""

    document: DocumentRef
    device: DeviceSection
    registers: dict[str, RegisterRow]
    ignore: dict[str, str] = {}
    """Registers of the document deliberately not mapped, and why."""


# Compiled maps ---------------------------------------------------------------------------


class Register:
    """One compiled register row."""

    __slots__ = (
        "address",
        "byte_order",
        "codes",
        "field",
        "format",
        "index",
        "metric",
        "name",
        "nan",
        "not_implemented",
        "rated",
        "row",
        "scale_index",
        "state",
        "sunssf",
        "table",
        "to_device",
        "type",
        "word_order",
        "words",
        "wrap_at",
    )

    def __init__(
        self, name: str, row: RegisterRow, device: DeviceSection, compiler: Compiler, index: int
    ) -> None:
        path = f"$.registers.{name}"
        if not _NAME.fullmatch(name):
            raise compiler.error(
                "bad_identifier", "a register name is lowercase letters, digits, - and _", path
            )
        spec = REGISTER_TYPES.get(row.data_type)
        if spec is None:
            known = ", ".join(REGISTER_TYPES)
            raise compiler.error(
                "unknown_register_type",
                f"no register type {row.data_type!r}; known: {known}",
                f"{path}.data_type",
            )
        if row.address + spec.words > 65536:
            raise compiler.error("out_of_range", "the value runs past address 65535", path)
        self.name = name
        self.row = row
        self.index = index
        self.type = row.data_type
        self.words = spec.words
        self.table: Table = row.table or device.table
        self.address = row.address
        self.word_order: WordOrder = row.word_order or device.word_order
        self.byte_order: ByteOrder = row.byte_order or device.byte_order
        self.format = spec.format
        self.sunssf = row.data_type == "sunssf"
        self.scale_index = -1
        self.nan = spec.float_nan and row.not_implemented is not False
        self.not_implemented: int | float | None = None
        """The decoded value that means "not implemented", or ``None``."""
        pattern: int | None = None
        if row.not_implemented is True:
            pattern = spec.not_implemented
        elif type(row.not_implemented) is int:
            if spec.float_nan:
                raise compiler.error(
                    "conflicting_field",
                    "a float's 'not implemented' is NaN; give true or false",
                    f"{path}.not_implemented",
                )
            pattern = row.not_implemented
            if not 0 <= pattern < 1 << (16 * spec.words):
                raise compiler.error(
                    "out_of_range",
                    f"the pattern does not fit {spec.words} registers",
                    f"{path}.not_implemented",
                )
        if pattern is not None:
            raw = pattern.to_bytes(2 * spec.words, "big")
            self.not_implemented = struct.unpack(">" + spec.format, raw)[0]
        self.metric: str | None = row.metric
        self.state = row.writable or row.metric in _STATE_METRICS
        """The interlocks read this register's value (a state of charge, a temperature,
        a setpoint)."""
        self.field: Field | None = None
        self.to_device: Conversion | None = None
        self.codes: frozenset[int] = frozenset()
        """For a writable enum: the codes it may be set to."""
        self.rated = Limits()
        """For a writable register: the map's limits (an enum's: its lowest and highest
        code, and what the row adds)."""
        self.wrap_at: float | None = None
        if self.sunssf:
            if row.metric is not None or row.writable:
                raise compiler.error(
                    "conflicting_field",
                    "a sunssf register scales others: it has no metric and is not written",
                    path,
                )
            return
        if row.metric is None and row.bits is None:
            raise compiler.error(
                "missing_field", "a register needs a metric (or bits, or data_type sunssf)", path
            )
        self.field = Field(name, row, compiler, path)
        is_bits = row.bits is not None or row.enum is not None or row.lookup is not None
        if is_bits and not (row.data_type.startswith(("bitfield", "enum", "u"))):
            raise compiler.error(
                "wrong_type", "bits, enum and lookup read unsigned registers", f"{path}.data_type"
            )
        if row.writable:
            if row.bits is not None or row.lookup is not None:
                raise compiler.error(
                    "conflicting_field",
                    "a writable register holds one number or one enum code, not bits",
                    path,
                )
            self.to_device = Conversion(row.unit, row.scale).inverse()
            limits = row.limits
            if row.enum is not None:
                # A mode: the codes the map lists are all it may be set to.
                self.codes = frozenset(int(code) for code in row.enum)
                listed = Limits(min=min(self.codes), max=max(self.codes))
                self.rated = listed if limits is None else listed.tighten(limits)
            elif limits is None or limits.min is None or limits.max is None:
                raise compiler.error(
                    "missing_field",
                    "a writable register needs limits with min and max: the device's"
                    " own rating bounds every setpoint, whatever the site adds",
                    f"{path}.limits",
                )
            else:
                self.rated = limits
        elif row.limits is not None:
            raise compiler.error("conflicting_field", "limits are for writable registers", path)
        if (
            row.metric is not None
            and row.metric.endswith("_total")
            and spec.format in "HIQ"
            and row.scale_register is None
        ):
            # A counter wraps at its register width: 2**bits of the raw value, in the
            # bus's unit (Conversion takes the raw span through scale and unit).
            self.wrap_at = Conversion(row.unit, row.scale)(float(1 << (16 * spec.words)))


class Layout:
    """A map laid out for one ``max_registers`` and ``max_gap``: the reads of one poll,
    each register's place in the poll payload, and the precompiled decoder.

    A value and its scale-factor register are always in one read (a device that rescales
    between two requests would otherwise give a value with the other's factor): each
    such pair, and everything between them, is one unit that reads are cut around. A
    unit longer than ``max_registers`` cannot be read safely and is a mapping error.
    """

    def __init__(
        self,
        registers: list[Register],
        max_registers: int,
        max_gap: int,
        error: Callable[[str, str], MappingError] | None = None,
    ) -> None:
        # Units: [table, start, end) spans that one read must hold whole.
        spans: list[tuple[int, int, int, list[Register]]] = []
        for register in registers:
            table = 0 if register.table == "holding" else 1
            start, end = register.address, register.address + register.words
            if register.scale_index >= 0:
                sf = registers[register.scale_index]
                if sf.table != register.table and error is not None:
                    raise error(
                        "conflicting_field",
                        f"{register.name} and its scale factor {sf.name} are in different tables",
                    )
                start, end = min(start, sf.address), max(end, sf.address + sf.words)
            spans.append((table, start, end, [register]))
        spans.sort(key=lambda span: (span[0], span[1]))
        units: list[list[Any]] = []
        for table, start, end, members in spans:
            if units and units[-1][0] == table and start < units[-1][2]:
                units[-1][2] = max(units[-1][2], end)
                units[-1][3] += members
            else:
                units.append([table, start, end, list(members)])
        reads: list[list[int]] = []  # [table index, start, count]
        read_of: dict[int, int] = {}
        for table, start, end, members in units:
            if end - start > max_registers and error is not None:
                names = ", ".join(r.name for r in members[:4])
                raise error(
                    "out_of_range",
                    f"registers {names} and their scale factor span {end - start} registers,"
                    f" more than one read of {max_registers} can hold",
                )
            if reads:
                last = reads[-1]
                if (
                    last[0] == table
                    and start <= last[1] + last[2] + max_gap
                    and end - last[1] <= max_registers
                ):
                    last[2] = max(last[2], end - last[1])
                    for register in members:
                        read_of[register.index] = len(reads) - 1
                    continue
            reads.append([table, start, end - start])
            for register in members:
                read_of[register.index] = len(reads) - 1
        self.reads = tuple(
            ModbusRead("holding" if t == 0 else "input", start, count) for t, start, count in reads
        )
        starts: list[int] = []
        total = 0
        for read in self.reads:
            starts.append(total)
            total += read.count
        self.words = total
        self.bitmap = (len(self.reads) + 7) // 8
        self.data = _HEADER.size + self.bitmap
        """Where the words start in a poll payload."""
        self.size = self.data + 2 * total
        # Per register: (register, read index, byte offset of its first word).
        self.places: list[tuple[Register, int, int]] = []
        for register in registers:
            ri = read_of[register.index]
            offset = starts[ri] + register.address - self.reads[ri].address
            self.places.append((register, ri, self.data + 2 * offset))
        # One struct for every plain big-endian register that does not overlap another:
        # the whole poll in one C call. The rest decode one by one.
        fast: list[tuple[Register, int, int]] = []
        slow: list[tuple[Register, int, struct.Struct]] = []
        end = 0
        for place in sorted(self.places, key=lambda p: p[2]):
            register, _, at = place
            plain = register.word_order == "big" and register.byte_order == "big"
            if plain and at >= end:
                fast.append(place)
                end = at + 2 * register.words
            else:
                slow.append((register, at, struct.Struct(f">{register.words}H")))
        code = [">"]
        cursor = 0
        for register, _, at in fast:
            if at > cursor:
                code.append(f"{at - cursor}x")
            code.append(register.format)
            cursor = at + 2 * register.words
        self.fast = struct.Struct("".join(code))
        self.fast_registers = [p[0] for p in fast]
        self.slow = slow
        self.read_of = {p[0].index: p[1] for p in self.places}
        shape: list[tuple[object, ...]] = [(r.table, r.address, r.count) for r in self.reads]
        shape += [(r.index, r.type, r.word_order, r.byte_order, at) for r, _, at in self.places]
        self.fingerprint = zlib.crc32(repr(shape).encode())
        """Names this layout in every poll: a poll made under another map or read plan
        (stored before a restart with a changed configuration) is refused, not misread."""

    def decode(self, payload: bytes) -> list[Any]:
        """The raw value of every register, by register index (failed reads included:
        their words are zeros, and the caller drops them)."""
        values: list[Any] = [None] * len(self.places)
        for register, value in zip(
            self.fast_registers, self.fast.unpack_from(payload), strict=True
        ):
            values[register.index] = value
        for register, at, words_of in self.slow:
            words = words_of.unpack_from(payload, at)
            values[register.index] = decode_registers(
                register.type,
                words,
                word_order=register.word_order,
                byte_order=register.byte_order,
                not_implemented=False,
            )
        return values


class RegisterMap(Plan):
    """A compiled :class:`ModbusMap`: one device family, named by its file's stem."""

    def __init__(self, name: str, document: ModbusMap, compiler: Compiler) -> None:
        self.name = name
        self.document = document
        self.device = document.device
        self.registers: list[Register] = []
        by_name: dict[str, Register] = {}
        for index, (reg_name, row) in enumerate(document.registers.items()):
            register = Register(reg_name, row, document.device, compiler, index)
            self.registers.append(register)
            by_name[reg_name] = register
        if not self.registers:
            raise compiler.error("no_fields", "a map needs at least one register", "$.registers")
        metrics: dict[str, str] = {}
        for register in self.registers:
            path = f"$.registers.{register.name}"
            ref = register.row.scale_register
            if ref is not None:
                target = by_name.get(ref)
                if target is None or not target.sunssf:
                    raise compiler.error(
                        "unknown_register",
                        f"scale_register {ref!r} is no sunssf register of this map",
                        f"{path}.scale_register",
                    )
                register.scale_index = target.index
            field = register.field
            if field is None:
                continue
            for metric in _metrics_of(register):
                other = metrics.get(metric)
                if other is not None:
                    raise compiler.error(
                        "duplicate_metric",
                        f"registers {other!r} and {register.name!r} both give {metric!r}",
                        path,
                    )
                metrics[metric] = register.name
        for ignored in document.ignore:
            if ignored in by_name:
                raise compiler.error(
                    "ignored_and_mapped", f"{ignored!r} is both mapped and ignored", "$.ignore"
                )
        self.writable = {
            r.metric: r for r in self.registers if r.to_device is not None and r.metric
        }
        """Writable registers by metric (the ``set`` that writes them)."""
        self.rows = sum(r.field.rows for r in self.registers if r.field is not None)
        self._layouts: dict[tuple[int, int], Layout] = {}
        default = (document.device.max_registers, document.device.max_gap)
        self._layouts[default] = Layout(
            self.registers,
            *default,
            error=lambda code, message: compiler.error(code, message, "$.device"),
        )

    def layout(self, max_registers: int | None = None, max_gap: int | None = None) -> Layout:
        key = (max_registers or self.device.max_registers, self.device.max_gap)
        if max_gap is not None:
            key = (key[0], max_gap)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = Layout(
                self.registers, *key, error=lambda code, message: MappingError(code, message)
            )
        return layout


def _metrics_of(register: Register) -> list[str]:
    row = register.row
    if row.bits is not None:
        return [bit.metric for bit in row.bits.values()]
    return [row.metric] if row.metric else []


class ModbusPlan(Plan):
    """Every map the adapter may use, by name."""

    def __init__(self, maps: dict[str, RegisterMap]) -> None:
        self.maps = maps
        self.rows = sum(m.rows for m in maps.values())


# Payloads between the poller and the adapter ----------------------------------------------


def poll_payload(
    at_ms: int, failed: Sequence[bool], words: Sequence[int], *, fingerprint: int
) -> bytes:
    """A poll as the poller hands it over: the layout it was read with, which reads
    failed, and every read's words in plan order (a failed read's words as zeros)."""
    bitmap = bytearray((len(failed) + 7) // 8)
    for index, bad in enumerate(failed):
        if bad:
            bitmap[index // 8] |= 1 << (index % 8)
    return b"".join(
        (
            _HEADER.pack(b"P", at_ms, len(failed), fingerprint),
            bytes(bitmap),
            _words(len(words)).pack(*words),
        )
    )


@functools.lru_cache(maxsize=256)
def _words(count: int) -> struct.Struct:
    """The packer of ``count`` big-endian registers: one per poll size, made once."""
    return struct.Struct(f">{count}H")


def unreachable_payload(at_ms: int, reason: str) -> bytes:
    """The device stopped answering (``offline_after`` polls in a row)."""
    return _HEADER.pack(b"F", at_ms, 0, 0) + reason.encode("utf-8", "replace")[:500]


class WriteRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the poller is to write: ``words`` at ``address`` of the holding registers,
    then read them back.

    ``guard`` is what the words were encoded against: registers (a scale factor) that
    must still hold these words right before the write, or nothing is written. After
    ``expires_ms`` (Unix ms) the command is over and nothing is written either.
    """

    command: str
    device: str
    address: int
    words: list[int]
    multiple: bool = True
    expires_ms: int = 0
    guard: list[tuple[int, int]] = []


class WriteResult(msgspec.Struct, frozen=True, kw_only=True):
    command: str
    ok: bool
    """The device acknowledged the write (false: it went unanswered)."""
    words: list[int] | None = None
    """What was read back after the write; ``None`` when the read-back failed."""
    error: str | None = None


def write_request(request: WriteRequest) -> bytes:
    return msgspec.json.encode(request)


def read_write_request(payload: bytes) -> WriteRequest:
    return msgspec.json.decode(payload, type=WriteRequest)


def write_result(at_ms: int, result: WriteResult) -> bytes:
    return _HEADER.pack(b"W", at_ms, 0, 0) + msgspec.json.encode(result)


_write_result: Final = msgspec.json.Decoder(WriteResult)


# Options ---------------------------------------------------------------------------------


class ModbusDeviceOptions(Document, frozen=True, kw_only=True):
    """One device (``[adapters.modbus.devices.<name>]``)."""

    map: str
    """A map's name (its file stem in ``mappings/modbus/`` or the ``maps`` directory)."""
    transport: Literal["tcp", "rtu-over-tcp", "rtu"] = "tcp"
    """Modbus TCP; RTU frames through a TCP gateway; or RTU on a serial line."""
    host: str = "127.0.0.1"
    """The device's (or gateway's) address, for ``tcp`` and ``rtu-over-tcp``."""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 502
    """Its TCP port."""
    serial_port: str | None = None
    """For ``rtu``: the serial device (``/dev/ttyUSB0``)."""
    baudrate: Annotated[int, msgspec.Meta(ge=300)] = 9600
    """For ``rtu``: the line's speed."""
    parity: Literal["N", "E", "O"] = "N"
    """For ``rtu``: none, even or odd."""
    stopbits: Literal[1, 2] = 1
    """For ``rtu``: stop bits."""
    bytesize: Literal[7, 8] = 8
    """For ``rtu``: data bits."""
    unit_id: UnitId | None = None
    """Default: the map's."""
    site: str | None = None
    """The device's site; default: the adapter's ``site``."""
    entity_id: str | None = None
    """Default: the device's name."""
    entity_type: EntityType | None = None
    """Default: the map's."""
    interval_s: Positive = 5.0
    """The poll period, on a fixed schedule: a poll that overruns skips slots."""
    timeout_s: Positive = 1.0
    """How long one request waits for its answer."""
    retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 1
    """Tries again per read, with a short backoff, before the poll counts as failed."""
    offline_after: Annotated[int, msgspec.Meta(ge=1)] = 3
    """Polls in a row without any answer before the device's series go ``offline``."""
    max_registers: Annotated[int, msgspec.Meta(ge=1, le=125)] | None = None
    """The most registers the device returns in one read; default: the map's."""
    max_gap: Annotated[int, msgspec.Meta(ge=0, le=125)] | None = None
    """Unused registers one read may span; default: the map's."""
    limits: dict[str, Limits] = {}
    """Interlocks by the metric of a writable register, on top of the map's ratings."""


class ModbusOptions(CommandOptions, frozen=True, kw_only=True):
    """The ``[adapters.modbus]`` section of a site configuration."""

    site: str | None = None
    """The default site of every device."""
    devices: dict[str, ModbusDeviceOptions] = {}
    """Devices by name (lower case, digits, ``-`` and ``_``), each polled on its own
    schedule."""
    mapping: str | None = None
    """A directory of register maps searched before the packaged ones (or one map file)."""
    command_timeout_s: Positive = 10.0
    """A write not read back by then expires."""
    default_priority: Priority = "optimization"
    """The class of a ``set`` that names none (every Profile A ``set``)."""
    priority_hold_s: Positive = 900.0
    """How long an accepted setpoint holds against lower classes without ``duration_s``."""
    state_max_age_s: Positive = 60.0
    """Readings older than this are unknown to the interlocks (a non-zero setpoint that
    needs them is refused)."""


# Maps on disk ----------------------------------------------------------------------------


def map_directory() -> Path:
    from energybus.mappings import mapping_directory

    return mapping_directory("modbus")


def map_names() -> list[str]:
    """The packaged maps, by name."""
    return sorted(p.stem for p in map_directory().glob("*.toml"))


def map_path(name: str) -> Path:
    """Where the packaged map ``name`` is."""
    path = map_directory() / f"{name}.toml"
    if not path.is_file():
        raise MappingError(
            "unknown_map", f"no register map {name!r}; known: {', '.join(map_names())}"
        )
    return path


def load_map(path: str | Path) -> RegisterMap:
    """Read, validate and compile one map file."""
    return ModbusAdapter.compile(*ModbusAdapter.read_mapping(path))


# The adapter -----------------------------------------------------------------------------


class _Device:
    __slots__ = (
        "entity_id",
        "entity_type",
        "key",
        "layout",
        "limits",
        "map",
        "name",
        "scales",
        "site",
        "state",
    )

    def __init__(
        self,
        name: str,
        register_map: RegisterMap,
        layout: Layout,
        site: str,
        entity_id: str,
        entity_type: EntityType,
    ) -> None:
        self.name = name
        self.map = register_map
        self.layout = layout
        self.site = site
        self.entity_id = entity_id
        self.entity_type: EntityType = entity_type
        self.key = (site, entity_type, entity_id)
        self.limits: dict[str, Limits] = {}
        self.state: dict[str, tuple[float, datetime]] = {}
        """Latest ``soc``, ``temperature`` and writable values, for the interlocks."""
        self.scales: dict[int, tuple[int, datetime]] = {}
        """Each scale-factor register's value in the last poll, and the poll's time, for
        encoding writes."""


class ModbusAdapter(Adapter[ModbusOptions, Any]):
    name: ClassVar[str] = "modbus"
    options_type: ClassVar[type[Document]] = ModbusOptions
    mapping_type: ClassVar[type[MappingDocument]] = ModbusMap
    json_sources: ClassVar[bool] = False

    plan: ModbusPlan

    # Maps: a directory of files, not one file ----------------------------------------------

    @classmethod
    def load_plan(cls, source: str | Path | None = None) -> tuple[Any, ModbusPlan]:
        """Every map of the packaged directory and of ``source`` (a directory searched
        first, or one map file), each read and compiled as its own mapping file."""
        paths: dict[str, Path] = {p.stem: p for p in map_directory().glob("*.toml")}
        if source is not None:
            extra = Path(source)
            if extra.is_dir():
                paths.update({p.stem: p for p in extra.glob("*.toml")})
            else:
                paths = {extra.stem: extra}
        documents = {name: cls.read_mapping(path) for name, path in sorted(paths.items())}
        maps = {name: cls.compile(*read) for name, read in documents.items()}
        return {name: read[0] for name, read in documents.items()}, ModbusPlan(maps)

    @classmethod
    def compile(cls, document: ModbusMap, compiler: Compiler) -> RegisterMap:
        """One map file compiled; its name is the file's stem."""
        return RegisterMap(Path(compiler.where.file or "map").stem, document, compiler)

    # Devices ---------------------------------------------------------------------------------

    def start(self) -> None:
        opts = self.options
        self.devices: dict[str, _Device] = {}
        self._by_entity: dict[tuple[str, str, str], _Device] = {}
        self.safety = Safety(
            default_priority=opts.default_priority,
            hold_s=opts.priority_hold_s,
            state_max_age_s=opts.state_max_age_s,
        )
        self._state_age = timedelta(seconds=opts.state_max_age_s)
        declarations = []
        metrics: set[str] = set()
        for name, device in opts.devices.items():
            declarations.append(self._device(name, device, f"$.devices.{name}"))
            metrics |= set(self.plan.maps[device.map].writable)
        self.sources = tuple(declarations)
        self.command_filters = tuple(canonical_filter("set", metric=m) for m in sorted(metrics))

    def _device(self, name: str, config: ModbusDeviceOptions, path: str) -> SourceDeclaration:
        if not _NAME.fullmatch(name):
            raise MappingError(
                "bad_identifier", "a device name is lowercase letters, digits, - and _", path=path
            )
        register_map = self.plan.maps.get(config.map)
        if register_map is None:
            raise MappingError(
                "unknown_map",
                f"no register map {config.map!r}; known: {', '.join(sorted(self.plan.maps))}",
                path=f"{path}.map",
            )
        site = config.site or self.options.site
        if not site:
            raise MappingError(
                "missing_field", "a device needs a site (here or in [adapters.modbus])", path=path
            )
        entity_type = config.entity_type or register_map.device.entity_type
        entity_id = config.entity_id or to_kebab(name)
        try:
            build_topic(site, entity_type, entity_id, "metric")
        except EnergyBusError as exc:
            raise MappingError(exc.code, exc.message, path=path) from None
        if (site, entity_type, entity_id) in self._by_entity:
            raise MappingError(
                "duplicate_entity",
                f"two devices would publish as {site}/energy/{entity_type}/{entity_id}",
                path=path,
            )
        if config.transport == "rtu" and not config.serial_port:
            raise MappingError(
                "missing_field", "transport rtu needs serial_port", path=f"{path}.serial_port"
            )
        layout = register_map.layout(config.max_registers, config.max_gap)
        device = _Device(name, register_map, layout, site, entity_id, entity_type)
        for metric in config.limits:
            if metric not in register_map.writable:
                raise MappingError(
                    "unknown_metric",
                    f"map {register_map.name} writes no {metric!r};"
                    f" writable: {', '.join(sorted(register_map.writable)) or 'none'}",
                    path=f"{path}.limits.{metric}",
                )
        for metric, register in register_map.writable.items():
            rated = register.rated
            site_limits = config.limits.get(metric)
            try:
                device.limits[metric] = rated if site_limits is None else rated.tighten(site_limits)
            except ValueError as exc:
                raise MappingError(
                    "conflicting_field", str(exc), path=f"{path}.limits.{metric}"
                ) from None
        self.devices[name] = device
        self._by_entity[device.key] = device
        endpoint = ModbusEndpoint(
            name=name,
            transport=config.transport,
            host=config.host,
            port=config.port,
            serial_port=config.serial_port,
            baudrate=config.baudrate,
            parity=config.parity,
            stopbits=config.stopbits,
            bytesize=config.bytesize,
            unit_id=register_map.device.unit_id if config.unit_id is None else config.unit_id,
            interval_s=config.interval_s,
            timeout_s=config.timeout_s,
            retries=config.retries,
            offline_after=config.offline_after,
            reads=layout.reads,
            fingerprint=layout.fingerprint,
            identity=_identity(register_map.device.sunspec),
        )
        return SourceDeclaration(
            transport="modbus",
            patterns=(name,),
            endpoint=endpoint,
            publishes=(f"modbus/{name}",) if register_map.writable else (),
        )

    def counters(self) -> list[tuple[str, str, str, float | None, float | None]]:
        """``(site, device, metric, wrap_at, max_rate)`` of every counter register with a
        fixed width, for the counter historian (a rollover is then recognised)."""
        found: list[tuple[str, str, str, float | None, float | None]] = []
        for device in self.devices.values():
            for register in device.map.registers:
                if register.wrap_at is not None and register.metric is not None:
                    entity = device_id(device.entity_type, device.entity_id)
                    found.append((device.site, entity, register.metric, register.wrap_at, None))
        return found

    # Translating -------------------------------------------------------------------------

    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        try:
            device = self.devices.get(topic)
            if device is None:
                raise SourceError("unrouted", "no Modbus device of this name is configured")
            if len(payload) < _HEADER.size:
                raise SourceError("wrong_length", "a Modbus delivery is shorter than its header")
            kind, at_ms, reads, fingerprint = _HEADER.unpack_from(payload)
            try:
                observed = datetime.fromtimestamp(at_ms / 1000, UTC)
            except (ValueError, OverflowError, OSError):
                raise SourceError("bad_timestamp", "the poll time is not a time") from None
            if kind == b"P":
                return self._poll(device, payload, reads, fingerprint, observed, topic)
            if kind == b"W":
                return self._written(device, payload[_HEADER.size :], observed, topic)
            if kind == b"F":
                # Nothing the device said before holds any more for the interlocks.
                for metric in device.state:
                    if metric in device.limits:
                        self.safety.forget_setpoint((device.name, metric))
                device.state.clear()
                device.scales = {}
                return Normalized(unavailable=[device.key])
            raise SourceError("wrong_type", "not a poll, a write result or an outage")
        except EnergyBusError as error:
            return Normalized(rejections=[Rejection.of(error, topic)])

    def _poll(
        self,
        device: _Device,
        payload: bytes,
        reads: int,
        fingerprint: int,
        observed: datetime,
        topic: str,
    ) -> Normalized:
        layout = device.layout
        if fingerprint != layout.fingerprint:
            raise SourceError(
                "layout_changed",
                f"this poll of {device.name} was read with another map or read plan than the"
                " configuration's (stored before a restart with a changed configuration):"
                " its words cannot be decoded with this one",
            )
        if reads != len(layout.reads) or len(payload) != layout.size:
            raise SourceError(
                "wrong_length",
                f"a poll of {device.name} has {len(layout.reads)} reads and"
                f" {layout.size} bytes; this one {reads} and {len(payload)}",
            )
        raws = layout.decode(payload)
        failed: set[int] | None = None
        bitmap = payload[_HEADER.size : layout.data]
        if any(bitmap):
            failed = {i for i in range(reads) if bitmap[i // 8] >> (i % 8) & 1}
        good: list[tuple[str, Scalar | None, str | None, Any]] = []
        bad: list[tuple[str, Scalar | None, str | None, Any]] = []
        errors: list[SourceError] = []
        registers = device.map.registers
        read_of = layout.read_of
        scales: dict[int, tuple[int, datetime]] = {}
        fresh: list[str] = []
        for register in registers:
            field = register.field
            if field is None:
                continue
            if failed is not None and read_of[register.index] in failed:
                continue
            raw = raws[register.index]
            metric, convert, unit, spec, lo, hi, special, name = field.hot
            if raw == register.not_implemented or (register.nan and raw != raw):
                if special is None:
                    bad.append((metric, None, unit, spec))
                continue
            if register.scale_index >= 0:
                if failed is not None and read_of[register.scale_index] in failed:
                    continue
                sf = raws[register.scale_index]
                if sf == -32768 or not -_SF_RANGE <= sf <= _SF_RANGE:
                    bad.append((metric, None, unit, spec))
                    continue
                scales[register.scale_index] = (sf, observed)
                raw = _scaled(raw, sf)
            try:
                if special is not None:
                    good.extend(special(raw))
                    continue
                value = raw if convert is None else convert(raw)
            except EnergyBusError as error:
                errors.append(refuse(error, f"$.registers.{name}"))
                continue
            if type(value) is float and not math.isfinite(value):
                errors.append(
                    SourceError(
                        "non_finite", "the register holds an infinity", path=f"$.registers.{name}"
                    )
                )
                continue
            if lo <= value <= hi:
                good.append((metric, value, unit, spec))
                if register.state:
                    device.state[metric] = (float(value), observed)
                    fresh.append(metric)
                    if metric in device.limits:
                        self.safety.observe_setpoint((device.name, metric), float(value), observed)
            else:
                errors.append(implausible(metric, lo, hi, unit, f"$.registers.{name}"))
        # What the interlocks know is this poll's, or nothing: a state of charge that
        # failed, read "not implemented" or implausible is unknown, not the last good one.
        device.scales = scales
        if len(fresh) != len(device.state):
            for metric in [m for m in device.state if m not in fresh]:
                del device.state[metric]
                if metric in device.limits:
                    self.safety.forget_setpoint((device.name, metric))
        site, etype, eid = device.key
        readings = []
        if good:
            readings.append(Reading(site, etype, eid, observed, "good", good))
        if bad:
            readings.append(Reading(site, etype, eid, observed, "bad", bad))
        return Normalized.of(readings, errors, topic)

    def _written(self, device: _Device, body: bytes, observed: datetime, topic: str) -> Normalized:
        try:
            result = _write_result.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise SourceError("malformed_json", "a write result that does not decode") from None
        record = self.commands.get(result.command)
        if record is None:
            return Normalized()  # already expired: its outcome stands
        register = device.map.writable.get(record.metric)
        assert register is not None and register.field is not None
        key = (device.name, record.metric)
        payload = record.payload or {}
        expected = payload.get("words")
        if result.words is None:
            # No read-back: whether the value is on the device is not known. Its hold
            # stays; the rate limit waits for the next poll to say what the setpoint is.
            why = result.error or "no reason given"
            if result.ok:
                self.safety.done(key, record.id)
                reason = f"the device took the write but did not answer its read-back: {why}"
            else:
                self.safety.uncertain(key, record.id)
                reason = f"unknown whether the device took the write: {why}"
            moved = self.commands.end(record.id, "expired", reason)
            return Normalized(commands=[moved] if moved is not None else [])
        if result.words != expected:
            self.safety.failed(key, record.id)
            reason = f"the device reads back {result.words}, not the {expected} written"
            moved = self.commands.end(record.id, "rejected", reason)
            return Normalized(commands=[moved] if moved is not None else [])
        moved = self.commands.acked(record.id, ok=True, status="read back", at=observed)
        assert moved is not None
        self.safety.done(key, record.id)
        readback = self._value(device, register, result.words or [])
        # The series' own spec: the read-back is a sample of the register like any poll's
        # (another spec would republish meta at every confirmation).
        metric, _, unit, spec, *_ = register.field.hot
        reading = Reading(
            device.site,
            device.entity_type,
            device.entity_id,
            observed,
            "good",
            [(metric, readback, unit, spec)],
        )
        return Normalized(readings=[reading], commands=[moved])

    def _value(self, device: _Device, register: Register, words: list[int]) -> int | float:
        raw = decode_registers(
            register.type,
            words,
            word_order=register.word_order,
            byte_order=register.byte_order,
            not_implemented=False,
        )
        assert raw is not None
        if register.scale_index >= 0:
            raw = _scaled(raw, device.scales.get(register.scale_index, (0, None))[0])
        convert = register.field.hot[1] if register.field is not None else None
        return raw if convert is None else convert(raw)

    # Commands ----------------------------------------------------------------------------

    def connected_sites(self) -> list[tuple[str, str, str]]:
        return [(f"device {name}", f"$.devices.{name}", d.site) for name, d in self.devices.items()]

    def knows_target(self, parsed: Topic) -> bool:
        device = self._by_entity.get((parsed.site, parsed.entity_type, parsed.entity_id))
        return device is not None and parsed.metric in device.map.writable

    def format(self, command: Admitted, *, received_at: datetime) -> Formatted:
        parsed = command.topic
        topic = str(parsed)
        device = self._by_entity.get((parsed.site, parsed.entity_type, parsed.entity_id))
        register = device.map.writable.get(parsed.metric) if device is not None else None
        if device is None or register is None:
            raise CommandError(
                "unknown_target", "no Modbus device writes this metric here", topic=topic
            )
        value = command.value
        limits = device.limits[parsed.metric]
        envelope = command.envelope
        command_id = self.new_id()
        key = (device.name, parsed.metric)
        soc = self._fresh(device, "soc", received_at)
        temperature = self._fresh(device, "temperature", received_at)
        state = self.safety.state(key, soc=soc, temperature=temperature, now=received_at)
        words, guard = self._encode(device, register, value, topic, received_at)
        priority = self.safety.check(
            key,
            value,
            limits,
            state,
            priority=envelope.priority if envelope is not None else None,
            duration_s=envelope.duration_s if envelope is not None else None,
            command_id=command_id,
            now=received_at,
            topic=topic,
        )
        request = WriteRequest(
            command=command_id,
            device=device.name,
            address=register.address,
            words=words,
            multiple=device.map.device.write_multiple or register.words > 1,
            expires_ms=int(self.commands.deadline(received_at).timestamp() * 1000),
            guard=guard,
        )
        message = Message(f"modbus/{device.name}", write_request(request), 1, False)
        return self.command(
            parsed,
            value,
            command_id=command_id,
            target=f"{device.name}@{register.address}",
            action=f"write {register.name}",
            payload={"words": words, "priority": priority},
            received_at=received_at,
            messages=[message],
        )

    def _fresh(self, device: _Device, metric: str, now: datetime) -> float | None:
        known = device.state.get(metric)
        if known is None or now - known[1] > self._state_age:
            return None
        return known[0]

    def _encode(
        self, device: _Device, register: Register, value: Scalar, topic: str, now: datetime
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """The words for ``value``, and the guard the poller checks before writing them:
        the scale factor they were encoded with, which must still be the device's."""
        if type(value) is bool or not isinstance(value, int | float):
            raise CommandError("invalid_value", f"{register.name} takes a number", topic=topic)
        assert register.to_device is not None
        if register.codes and value not in register.codes:
            listed = ", ".join(str(code) for code in sorted(register.codes))
            raise CommandError(
                "invalid_value", f"{register.name} is set to one of {listed}", topic=topic
            )
        raw = register.to_device(float(value))
        guard: list[tuple[int, int]] = []
        if register.scale_index >= 0:
            known = device.scales.get(register.scale_index)
            if known is None or now - known[1] > self._state_age:
                raise CommandError(
                    "interlock",
                    f"interlock: the scale factor of {register.name} is unknown or stale",
                    topic=topic,
                )
            sf = known[0]
            raw = _scaled(raw, -sf)
            factor = device.map.registers[register.scale_index]
            guard.append((factor.address, sf & 0xFFFF))
        if register.format not in "fd":
            rounded = round(raw)
            if abs(rounded - raw) > 1e-6 * max(1.0, abs(raw)):
                raise CommandError(
                    "invalid_value",
                    f"{register.name} holds steps of {_step(register, device):g};"
                    f" {value!r} is between two",
                    topic=topic,
                )
            raw = rounded
        try:
            words = encode_registers(
                register.type, raw, word_order=register.word_order, byte_order=register.byte_order
            )
        except SourceError as error:
            raise CommandError("invalid_value", error.message, topic=topic) from None
        return words, guard

    def expire(self, now: datetime) -> list[CommandRecord]:
        expired = self.commands.expire(now)
        for record in expired:
            # Its write may have gone out (the poller checks the deadline before writing,
            # but a write under way finishes): treated as on the device, setpoint unknown.
            self.safety.uncertain(_key_of(record), record.id)
        return expired

    def failed(self, command_id: str, reason: str) -> CommandRecord | None:
        record = super().failed(command_id, reason)
        if record is not None:
            self.safety.failed(_key_of(record), record.id)
        return record


def _identity(chain: SunSpecChain | None) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """What a device must hold for a SunSpec map's addresses to be its: the marker, each
    model's ID and length where the map expects them, and the end marker."""
    if chain is None:
        return ()
    found: list[tuple[int, tuple[int, ...]]] = [(chain.base, (0x5375, 0x6E53))]
    found += [(address, (model, length)) for model, address, length in chain.addresses()]
    found.append((chain.end, (0xFFFF,)))
    return tuple(found)


def _scaled(raw: int | float, sf: int) -> int | float:
    """``raw`` times 10 ** ``sf``: a whole number stays one (1200 W, not 1200.0), and
    dividing for a negative ``sf`` keeps 3 * 10**-1 at 0.3."""
    factor: int = 10 ** abs(sf)
    return raw * factor if sf >= 0 else raw / factor


def _key_of(record: CommandRecord) -> tuple[str, str]:
    return (record.target.partition("@")[0], record.metric)


def _step(register: Register, device: _Device) -> float:
    """The canonical value of one raw step of ``register``."""
    assert register.to_device is not None
    step = 1.0 / register.to_device(1.0)
    if register.scale_index >= 0:
        step *= 10.0 ** device.scales.get(register.scale_index, (0, None))[0]
    return step
