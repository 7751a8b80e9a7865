"""The local outbox: batches the database could not take, kept on disk in order.

SQLite in WAL mode with ``synchronous=FULL``: once :meth:`Outbox.append` returns, the
batch survives a crash of the worker or the machine, so the source messages behind it
may be acknowledged. Batches are replayed oldest first. The file is bounded: past
``max_bytes`` of queued batches :meth:`append` raises :class:`OutboxFull` and the
caller keeps the batch (and so the unacknowledged source messages) until there is room.

Every method blocks on disk; the worker calls them from a thread.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

__all__ = ["Outbox", "OutboxFull", "open_wal"]


def open_wal(path: Path, *, synchronous: str) -> sqlite3.Connection:
    """A SQLite file in WAL mode, in autocommit, usable from the worker's threads: the
    shape of every on-disk queue of the worker (this outbox, the poll outbox)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    return db


class OutboxFull(Exception):
    """The outbox holds ``max_bytes`` already; nothing was written."""

    def __init__(self, *, size: int, max_bytes: int) -> None:
        super().__init__(f"outbox full: {size} bytes queued, limit {max_bytes}")
        self.size = size
        self.max_bytes = max_bytes


class Outbox:
    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._db = open_wal(path, synchronous="FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batches ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,"
            " rows INTEGER NOT NULL, body BLOB NOT NULL)"
        )
        batches, rows, size, oldest = self._db.execute(
            "SELECT count(*), coalesce(sum(rows), 0), coalesce(sum(length(body)), 0),"
            " min(created) FROM batches"
        ).fetchone()
        self.batches: int = batches
        self.rows: int = rows
        self.size: int = size
        self.oldest: float | None = oldest
        """Wall-clock time the oldest queued batch was written, or ``None`` when empty."""

    def __bool__(self) -> bool:
        return self.batches > 0

    def append(self, body: bytes, rows: int) -> None:
        if self.size + len(body) > self.max_bytes and self.batches:
            raise OutboxFull(size=self.size, max_bytes=self.max_bytes)
        now = time.time()
        self._db.execute(
            "INSERT INTO batches (created, rows, body) VALUES (?, ?, ?)", (now, rows, body)
        )
        self.batches += 1
        self.rows += rows
        self.size += len(body)
        if self.oldest is None:
            self.oldest = now

    def head(self) -> tuple[int, int, bytes] | None:
        """The oldest batch as (id, rows, body), or ``None``."""
        row = self._db.execute("SELECT id, rows, body FROM batches ORDER BY id LIMIT 1").fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def remove(self, batch_id: int, rows: int, size: int) -> None:
        self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        self.batches -= 1
        self.rows -= rows
        self.size -= size
        if self.batches:
            self.oldest = self._db.execute("SELECT min(created) FROM batches").fetchone()[0]
        else:
            self.oldest = None
            self.rows = self.size = 0

    def close(self) -> None:
        self._db.close()
