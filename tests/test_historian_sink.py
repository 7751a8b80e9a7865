"""The outbox and the historian sink, with a database that fails on demand."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from energybus.historian import Batch, Outbox, OutboxFull, WriteResult, decode_batch, encode_batch
from energybus.render import DEFAULT_SPEC
from energybus.rows import MeasurementRow
from energybus.samples import Reading
from energybus.worker.acks import AckQueue
from energybus.worker.metrics import Metrics
from energybus.worker.sink import HistorianSink

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def _reading(i: int) -> Reading:
    """The same sample as :func:`_row`, as the worker hands it over."""
    at = T0 + timedelta(seconds=i)
    return Reading("s", "load", "a", at, "good", [("active_power", float(i), "W", DEFAULT_SPEC)])


def _row(i: int) -> MeasurementRow:
    return MeasurementRow(
        "s", "load.a", "active_power", float(i), T0 + timedelta(seconds=i), "good"
    )


def test_outbox_keeps_batches_in_order_across_reopen_and_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path, max_bytes=10_000)
    bodies = []
    for i in range(3):
        batch = Batch()
        batch.add(_row(i))
        bodies.append(encode_batch(batch))
        outbox.append(bodies[-1], 1)
    outbox.close()
    again = Outbox(path, max_bytes=len(b"".join(bodies)))
    assert (again.batches, again.rows, again.size) == (3, 3, len(b"".join(bodies)))
    with pytest.raises(OutboxFull) as full:
        again.append(bodies[0], 1)
    assert full.value.max_bytes == len(b"".join(bodies))
    seen = []
    while (head := again.head()) is not None:
        batch_id, rows, body = head
        seen.append(decode_batch(body).measurements[0][3])
        again.remove(batch_id, rows, len(body))
    assert seen == [0.0, 1.0, 2.0]
    assert not again and again.oldest is None


class FlakyHistorian:
    """Stores batches in memory; raises while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.stored: list[float] = []

    async def write(self, batch: Batch) -> WriteResult:
        if self.down:
            raise ConnectionRefusedError("database is down")
        self.stored += [row[3] for row in batch.measurements]
        return WriteResult(len(batch.measurements), 0, 0, 0)


def _sink(tmp_path: Path, historian: FlakyHistorian, max_bytes: int) -> HistorianSink:
    return HistorianSink(
        historian=historian,  # type: ignore[arg-type]
        outbox=Outbox(tmp_path / "outbox.sqlite3", max_bytes=max_bytes),
        metrics=Metrics(),
        batch_rows=2,
        interval_s=0.01,
        retry_s=0.05,
    )


def test_database_down_sends_batches_to_the_outbox_then_replays_them_in_order(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[list[int], list[float], int]:
        historian = FlakyHistorian()
        sink = _sink(tmp_path, historian, max_bytes=1_000_000)
        acked: list[int] = []
        queue = AckQueue(acked.append)
        task = asyncio.create_task(sink.run())
        for i in range(1, 7):
            entry = queue.add(i)
            if i % 2:
                sink.add((), (), entry, [_row(i)])  # a row, as the bus ingest gives
            else:
                sink.add([_reading(i)], (), entry)  # a reading, as an adapter gives
            entry.release()
        assert await sink.flush(5)
        in_outbox = sink.outbox.rows
        assert acked == [1, 2, 3, 4, 5, 6]  # acknowledged once on disk
        head = sink.outbox.head()
        assert head is not None
        assert decode_batch(head[2]).measurements == [
            ("s", "load.a", "active_power", 1.0, T0 + timedelta(seconds=1), "good"),
            ("s", "load.a", "active_power", 2.0, T0 + timedelta(seconds=2), "good"),
        ]  # the reading is in the outbox as its row
        historian.down = False
        sink.add([_reading(7)], (), None)
        await sink.flush(5)
        for _ in range(200):
            if not sink.outbox and 7.0 in historian.stored:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return acked, historian.stored, in_outbox

    _, stored, in_outbox = asyncio.run(main())
    assert in_outbox == 6
    assert stored == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # the backlog first, in order


def test_full_outbox_holds_the_batch_and_its_acks_until_the_database_returns(
    tmp_path: Path,
) -> None:
    async def main() -> tuple[list[int], list[int], float, list[float]]:
        historian = FlakyHistorian()
        sink = _sink(tmp_path, historian, max_bytes=1)  # one batch fills it
        acked: list[int] = []
        queue = AckQueue(acked.append)
        task = asyncio.create_task(sink.run())
        for i in range(1, 5):
            entry = queue.add(i)
            sink.add((), (), entry, [_row(i)])
            entry.release()
        await sink.flush(0.5)
        acked_while_full = list(acked)
        full = sink.metrics.outbox_full._value.get()
        historian.down = False
        await sink.flush(5)
        task.cancel()
        return acked_while_full, acked, full, historian.stored

    while_full, acked, full, stored = asyncio.run(main())
    assert full == 1
    assert while_full == [1, 2]  # the first batch is on disk; the second waits in memory
    assert acked == [1, 2, 3, 4]
    assert stored == [1.0, 2.0, 3.0, 4.0]
