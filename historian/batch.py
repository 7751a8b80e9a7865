"""What one historian transaction writes: sample rows and command records.

A batch is also the outbox's unit, so it has one binary form (msgpack), which keeps the
exact float and timestamp of every row through a stay on disk.
"""

from __future__ import annotations

from typing import Final

import msgspec

from energybus.commands import CommandRecord
from energybus.rows import CounterRow, Row, RowTuple, append_rows
from energybus.samples import Reading

__all__ = ["Batch", "RowTuple", "decode_batch", "encode_batch"]


class Batch(msgspec.Struct, kw_only=True, array_like=True):
    measurements: list[RowTuple] = msgspec.field(default_factory=list)
    counters: list[RowTuple] = msgspec.field(default_factory=list)
    commands: list[CommandRecord] = msgspec.field(default_factory=list)

    def add(self, row: Row) -> None:
        target = self.counters if type(row) is CounterRow else self.measurements
        target.append(msgspec.structs.astuple(row))  # type: ignore[arg-type,unused-ignore]

    def add_reading(self, reading: Reading) -> None:
        append_rows(reading, self.measurements, self.counters)

    def __len__(self) -> int:
        return len(self.measurements) + len(self.counters) + len(self.commands)


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Batch)


def encode_batch(batch: Batch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> Batch:
    return _decoder.decode(data)
