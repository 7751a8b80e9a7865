"""What one historian transaction writes: sample rows and command records.

A batch is also the outbox's unit, so it has one binary form (msgpack), which keeps the
exact float and timestamp of every row through a stay on disk.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, TypeAlias

import msgspec

from energybus.commands import CommandRecord
from energybus.rows import CounterRow, Row

__all__ = ["Batch", "RowTuple", "decode_batch", "encode_batch"]

RowTuple: TypeAlias = tuple[str, str, str, float, datetime, str]
"""(site, device_id, metric_name, value, observed_at, quality), the COPY column order."""


class Batch(msgspec.Struct, kw_only=True, array_like=True):
    measurements: list[RowTuple] = msgspec.field(default_factory=list)
    counters: list[RowTuple] = msgspec.field(default_factory=list)
    commands: list[CommandRecord] = msgspec.field(default_factory=list)

    def add(self, row: Row) -> None:
        target = self.counters if type(row) is CounterRow else self.measurements
        target.append(msgspec.structs.astuple(row))  # type: ignore[arg-type,unused-ignore]

    def __len__(self) -> int:
        return len(self.measurements) + len(self.counters) + len(self.commands)


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Batch)


def encode_batch(batch: Batch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> Batch:
    return _decoder.decode(data)
