"""The register-type table: how a value sits in 16-bit registers, as data.

Modbus devices hold values in 16-bit registers; a register map names each value's
type, and this table says how many registers that type takes, how to read them, and
which raw pattern the device uses for "not implemented" (SunSpec's convention: the
all-ones unsigned value, the most negative signed one, zero for accumulators, NaN for
floats). :func:`decode_registers` turns the words a device returned into a number, or
``None`` for "not implemented", which a map publishes as quality ``bad``, never as a
number. Word and byte order vary by vendor and are the map's to state.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from types import MappingProxyType
from typing import Final, Literal, NamedTuple

from energybus.errors import SourceError

__all__ = [
    "REGISTER_TYPES",
    "ByteOrder",
    "RegisterType",
    "WordOrder",
    "decode_registers",
    "encode_registers",
]

WordOrder = Literal["big", "little"]
"""Which register holds the most significant word of a multi-register value."""
ByteOrder = Literal["big", "little"]
"""Which byte of each register is the more significant (Modbus says big)."""


class RegisterType(NamedTuple):
    words: int
    format: str
    """:mod:`struct` code of the value read big-endian from its bytes."""
    not_implemented: int | None
    """The raw unsigned pattern that means "not implemented", or ``None``."""
    float_nan: bool = False
    """For floats: NaN means "not implemented"."""


REGISTER_TYPES: Final = MappingProxyType(
    {
        "u16": RegisterType(1, "H", 0xFFFF),
        "s16": RegisterType(1, "h", 0x8000),
        "u32": RegisterType(2, "I", 0xFFFFFFFF),
        "s32": RegisterType(2, "i", 0x80000000),
        "u64": RegisterType(4, "Q", 0xFFFFFFFFFFFFFFFF),
        "s64": RegisterType(4, "q", 0x8000000000000000),
        "acc32": RegisterType(2, "I", 0),
        "acc64": RegisterType(4, "Q", 0),
        "f32": RegisterType(2, "f", None, float_nan=True),
        "f64": RegisterType(4, "d", None, float_nan=True),
        "bitfield16": RegisterType(1, "H", 0xFFFF),
        "bitfield32": RegisterType(2, "I", 0xFFFFFFFF),
        "enum16": RegisterType(1, "H", 0xFFFF),
        "sunssf": RegisterType(1, "h", 0x8000),
    }
)
"""Every register type a map may name (SunSpec's names where it has one: ``acc32`` is an
accumulator, ``sunssf`` a scale-factor exponent)."""


def _bytes(words: Sequence[int], word_order: WordOrder, byte_order: ByteOrder) -> bytes:
    ordered = list(words) if word_order == "big" else list(reversed(words))
    if byte_order == "big":
        return b"".join(w.to_bytes(2, "big") for w in ordered)
    return b"".join(w.to_bytes(2, "little") for w in ordered)


def decode_registers(
    kind: str,
    words: Sequence[int],
    *,
    word_order: WordOrder = "big",
    byte_order: ByteOrder = "big",
    not_implemented: bool = True,
) -> int | float | None:
    """The value in ``words``; ``None`` when it is the type's "not implemented" pattern
    (unless ``not_implemented`` is false, for devices that use the whole range)."""
    spec = REGISTER_TYPES.get(kind)
    if spec is None:
        raise SourceError("unknown_register_type", f"no register type {kind!r}")
    if len(words) != spec.words or any(not 0 <= w <= 0xFFFF for w in words):
        raise SourceError("wrong_type", f"a {kind} takes {spec.words} registers of 0..65535")
    raw = _bytes(words, word_order, byte_order)
    value: int | float = struct.unpack(">" + spec.format, raw)[0]
    if not_implemented:
        if spec.float_nan and math.isnan(value):
            return None
        if spec.not_implemented is not None:
            unsigned = int.from_bytes(raw, "big")
            if unsigned == spec.not_implemented:
                return None
    if spec.float_nan and not math.isfinite(value):
        raise SourceError("non_finite", f"a {kind} register holds an infinity")
    return value


def encode_registers(
    kind: str,
    value: int | float,
    *,
    word_order: WordOrder = "big",
    byte_order: ByteOrder = "big",
) -> list[int]:
    """The registers that hold ``value``, for a write; the inverse of
    :func:`decode_registers`. A value the type cannot hold is a :class:`SourceError`."""
    spec = REGISTER_TYPES.get(kind)
    if spec is None:
        raise SourceError("unknown_register_type", f"no register type {kind!r}")
    if spec.format not in "fd" and (type(value) is not int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise SourceError("wrong_type", f"a {kind} register holds whole numbers")
    try:
        raw = struct.pack(">" + spec.format, value)
    except (struct.error, OverflowError):
        raise SourceError("out_of_range", f"the value does not fit a {kind} register") from None
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if byte_order == "little":
        words = [int.from_bytes(w.to_bytes(2, "big"), "little") for w in words]
    return words if word_order == "big" else list(reversed(words))
