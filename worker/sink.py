"""The historian sink: rows batched by size and time, stored in PostgreSQL or the outbox.

One writer task stores sealed batches strictly in order. A batch goes to PostgreSQL
while the outbox is empty and the database answers; otherwise to the outbox, so rows are
never reordered around a backlog. Between batches the writer replays the outbox, oldest
first, whenever the database is back. A batch that fits nowhere (database down, outbox
full) is kept in memory and retried: its source messages stay unacknowledged, so the
broker holds back more (the receive maximum) rather than anything being dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import asyncpg

from energybus.commands import CommandRecord
from energybus.historian import (
    Batch,
    Historian,
    Outbox,
    OutboxFull,
    decode_batch,
    encode_batch,
)
from energybus.rows import Row
from energybus.samples import Reading

from .acks import Entry
from .logs import StateLog
from .metrics import Metrics

__all__ = ["HistorianSink"]

log = logging.getLogger("energybus.worker.historian")


@dataclass
class _Sealed:
    batch: Batch
    entries: list[Entry] = field(default_factory=list)


class HistorianSink:
    def __init__(
        self,
        *,
        historian: Historian | None,
        outbox: Outbox,
        metrics: Metrics,
        batch_rows: int,
        interval_s: float,
        retry_s: float,
        replay_slice_s: float = 0.5,
    ) -> None:
        self.historian = historian
        self.outbox = outbox
        self.metrics = metrics
        self.batch_rows = batch_rows
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.replay_slice_s = replay_slice_s
        self._open = _Sealed(Batch())
        self._sealed: asyncio.Queue[_Sealed] = asyncio.Queue()
        self._next_try = 0.0
        self._refusals = 0
        """Refused logins in a row: each doubles the wait before the next try."""
        self._state = StateLog(log)
        self._idle = asyncio.Event()
        self._idle.set()
        metrics.outbox(outbox)

    # Producer side (called on the event loop, never awaits) -----------------------------

    def add(
        self,
        readings: Sequence[Reading],
        commands: Sequence[CommandRecord],
        entry: Entry | None,
        rows: Sequence[Row] = (),
    ) -> None:
        current = self._open
        batch = current.batch
        for reading in readings:
            batch.add_reading(reading)
        for row in rows:
            batch.add(row)
        batch.commands += commands
        if entry is not None:
            entry.hold()
            current.entries.append(entry)
        if len(batch) >= self.batch_rows:
            self._seal()

    def _seal(self) -> None:
        if self._open.entries or len(self._open.batch):
            self._idle.clear()
            self._sealed.put_nowait(self._open)
            self._open = _Sealed(Batch())

    # Writer side ------------------------------------------------------------------------

    async def run(self) -> None:
        """Seal the open batch every ``interval_s``; store sealed batches in order and,
        between them, replay the outbox. The only task that touches the database."""
        ticker = asyncio.create_task(self._tick())
        try:
            while True:
                try:
                    sealed: _Sealed | None = await asyncio.wait_for(
                        self._sealed.get(), self.interval_s
                    )
                except TimeoutError:
                    sealed = None
                if sealed is not None:
                    await self._store(sealed.batch)
                    for entry in sealed.entries:
                        entry.release()
                if self.outbox:
                    await self._replay(self.replay_slice_s)
                if self._sealed.empty():
                    self._idle.set()
        finally:
            ticker.cancel()

    async def flush(self, timeout: float) -> bool:
        """Seal and store what is open; True when everything was stored in time."""
        self._seal()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._seal()

    def _database_due(self) -> bool:
        return self.historian is not None and time.monotonic() >= self._next_try

    async def _write(self, batch: Batch) -> bool:
        assert self.historian is not None
        started = time.perf_counter()
        try:
            result = await self.historian.write(batch)
        except Exception as error:  # any failure: the batch is not stored, keep it
            self.metrics.historian_errors.inc()
            if isinstance(error, _REFUSED):
                # A wrong password or a role without its grants will not mend itself in
                # two seconds: back off, so that the server's log is not flooded.
                wait = min(_REFUSED_MAX_WAIT_S, self.retry_s * 2**self._refusals)
                self._refusals = min(self._refusals + 1, 16)
                self._next_try = time.monotonic() + max(wait, self.retry_s)
                self._state.change(
                    "refused",
                    logging.ERROR,
                    "historian: the database refused the worker (%s: %s); trying again"
                    " with backoff, batches go to the outbox %s",
                    type(error).__name__,
                    _short(error),
                    self.outbox.path,
                )
                return False
            self._next_try = time.monotonic() + self.retry_s
            self._state.change(
                "down",
                logging.WARNING,
                "historian unreachable (%s: %s); batches go to the outbox %s",
                type(error).__name__,
                _short(error),
                self.outbox.path,
            )
            return False
        self._refusals = 0
        self.metrics.committed(result, time.perf_counter() - started)
        self._state.change("up", logging.INFO, "historian connected")
        return True

    async def _store(self, batch: Batch) -> None:
        if not len(batch):
            return
        if not self.outbox and self._database_due() and await self._write(batch):
            return
        if self.historian is None:
            return
        body = encode_batch(batch)
        while True:
            try:
                await asyncio.to_thread(self.outbox.append, body, len(batch))
            except OutboxFull as full:
                self.metrics.outbox_full.set(1)
                self._state.change(
                    "full",
                    logging.ERROR,
                    "outbox full (%d bytes, limit %d): holding batches in memory and"
                    " consumption back until the historian returns",
                    full.size,
                    full.max_bytes,
                )
                await asyncio.sleep(min(1.0, self.retry_s))
                await self._replay(self.replay_slice_s)
                continue
            self.metrics.outbox_full.set(0)
            self.metrics.outbox(self.outbox)
            return

    async def _replay(self, budget_s: float) -> None:
        deadline = time.monotonic() + budget_s
        while self.outbox and self._database_due() and time.monotonic() < deadline:
            head = await asyncio.to_thread(self.outbox.head)
            if head is None:
                break
            batch_id, rows, body = head
            if not await self._write(decode_batch(body)):
                break
            await asyncio.to_thread(self.outbox.remove, batch_id, rows, len(body))
            self.metrics.replayed.inc(rows)
            self.metrics.outbox(self.outbox)
            if not self.outbox:
                log.info("outbox replayed: every stored batch is in the historian")


_REFUSED: Final = (
    asyncpg.InvalidAuthorizationSpecificationError,  # wrong password, no such role, pg_hba
    asyncpg.InsufficientPrivilegeError,  # a grant missing (docs/security.md)
)
_REFUSED_MAX_WAIT_S: Final = 60.0


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text[:200]
