"""Writing batches into PostgreSQL: one transaction per batch, idempotent.

Rows go by binary COPY into session-local staging tables, then ``INSERT ... SELECT ...
ON CONFLICT DO NOTHING`` into the partitioned tables: COPY is the fast path into
PostgreSQL, and the conflict clause makes a redelivered sample change nothing. Rows with
the same key inside one batch are removed before the COPY (the first one wins, as the
database's first write wins across batches). Command records move forward only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import asyncpg
import msgspec

from energybus.commands import CommandRecord

from .batch import Batch, RowTuple
from .schema import SCHEMA, migrations

__all__ = ["COLUMNS", "Historian", "SchemaBehind", "WriteResult", "unique_rows"]

COLUMNS: Final = ("site", "device_id", "metric_name", "value", "observed_at", "quality")
_TABLES: Final = {"measurements": "stage_measurements", "counter_readings": "stage_counters"}
_STAGE_SQL: Final = "".join(
    f"CREATE TEMP TABLE IF NOT EXISTS {stage} (site text, device_id text, metric_name text,"
    " value float8, observed_at timestamptz, quality text) ON COMMIT DELETE ROWS;"
    for stage in _TABLES.values()
)
_COLS: Final = ", ".join(COLUMNS)
_COMMAND_FIELDS: Final = (
    "id", "adapter", "site", "entity_type", "entity_id", "metric", "value", "target",
    "action", "payload", "state", "accepted_at", "expires_at", "sent_at", "acked_at",
    "response_status", "reason", "code",
)  # fmt: skip
_MOVABLE: Final = [f for f in _COMMAND_FIELDS if f not in ("id", "accepted_at")]
_COMMAND_SQL: Final = (
    f"INSERT INTO {SCHEMA}.command_logs ({', '.join(_COMMAND_FIELDS)}) VALUES ("
    + ", ".join(
        f"${i}::jsonb" if name in ("value", "payload") else f"${i}"
        for i, name in enumerate(_COMMAND_FIELDS, 1)
    )
    + ") ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(
        f"{name} = coalesce(EXCLUDED.{name}, command_logs.{name})"
        if name.endswith("_at") or name in ("response_status", "reason", "code")
        else f"{name} = EXCLUDED.{name}"
        for name in _MOVABLE
    )
    + ", updated_at = now()"
    + f" WHERE {SCHEMA}.command_rank(EXCLUDED.state) > {SCHEMA}.command_rank(command_logs.state)"
)
_json: Final = msgspec.json.Encoder()


class WriteResult(msgspec.Struct, frozen=True):
    measurements: int
    """Rows inserted (a row already stored is not counted)."""
    counters: int
    commands: int
    duplicates: int
    """Rows of the batch that were already stored or repeated inside it."""


class SchemaBehind(RuntimeError):
    """The database's historian schema is older than this energybus (or missing)."""

    def __init__(self, current: int, needed: int) -> None:
        super().__init__(
            f"the historian schema is at version {current}, this energybus needs {needed}: "
            "run `energybus historian init`"
        )
        self.current = current
        self.needed = needed


async def _check_version(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    needed = len(migrations())
    current = 0
    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{SCHEMA}.schema_migrations"):
        current = await conn.fetchval(
            f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_migrations"
        )
    if int(current) < needed:
        raise SchemaBehind(int(current), needed)


def unique_rows(rows: list[RowTuple]) -> list[RowTuple]:
    """``rows`` without repeats of a key (site, device_id, metric_name, observed_at)."""
    seen: dict[tuple[str, str, str, datetime], RowTuple] = {}
    for row in rows:
        seen.setdefault((row[0], row[1], row[2], row[4]), row)
    return rows if len(seen) == len(rows) else list(seen.values())


class Historian:
    """One connection that writes batches; the worker owns exactly one.

    Any exception from :meth:`write` means the batch is not stored (the transaction
    rolled back); the caller decides whether to retry or divert it to the outbox.
    """

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        self._dsn = dsn
        self._timeout = connect_timeout
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._months: set[tuple[str, int, int]] = set()

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self) -> None:
        """Connect, and check that the schema is the one this code writes: a database
        left behind an upgrade is a :class:`SchemaBehind` naming the fix, not a failed
        insert per batch (the batches wait in the outbox meanwhile)."""
        await self.close()
        conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
        try:
            await _check_version(conn)
            await conn.execute(_STAGE_SQL)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._months.clear()  # a partition made in a rolled-back transaction is not there
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except Exception:  # closing a broken connection may fail; it is gone anyway
                conn.terminate()

    async def write(self, batch: Batch) -> WriteResult:
        if not self.connected:
            await self.connect()
        conn = self._conn
        assert conn is not None
        measurements = unique_rows(batch.measurements)
        counters = unique_rows(batch.counters)
        duplicates = len(batch.measurements) - len(measurements)
        duplicates += len(batch.counters) - len(counters)
        try:
            async with conn.transaction():
                await self._partitions(conn, "measurements", measurements)
                await self._partitions(conn, "counter_readings", counters)
                inserted_m = await self._load(conn, "measurements", measurements)
                inserted_c = await self._load(conn, "counter_readings", counters)
                if batch.commands:
                    await conn.executemany(_COMMAND_SQL, [_command_args(c) for c in batch.commands])
        except BaseException:
            # The connection's state is unknown after a failure mid-transaction.
            await self.close()
            raise
        duplicates += len(measurements) - inserted_m + len(counters) - inserted_c
        return WriteResult(inserted_m, inserted_c, len(batch.commands), duplicates)

    async def declare_counters(
        self, rows: list[tuple[str, str, str, float | None, float | None]]
    ) -> None:
        """Store counter declarations (site, device_id, metric_name, wrap_at, max_rate)."""
        if not self.connected:
            await self.connect()
        assert self._conn is not None
        await self._conn.executemany(
            f"INSERT INTO {SCHEMA}.counter_series"
            " (site, device_id, metric_name, wrap_at, max_rate) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (site, device_id, metric_name)"
            " DO UPDATE SET wrap_at = EXCLUDED.wrap_at, max_rate = EXCLUDED.max_rate",
            rows,
        )

    async def _partitions(
        self, conn: asyncpg.Connection[asyncpg.Record], table: str, rows: list[RowTuple]
    ) -> None:
        months: dict[tuple[str, int, int], datetime] = {}
        for row in rows:
            months.setdefault((table, row[4].year, row[4].month), row[4])
        for key, at in months.items():
            if key not in self._months:
                await conn.execute(f"SELECT {SCHEMA}.ensure_partition($1, $2)", table, at)
                self._months.add(key)

    async def _load(
        self, conn: asyncpg.Connection[asyncpg.Record], table: str, rows: list[RowTuple]
    ) -> int:
        if not rows:
            return 0
        stage = _TABLES[table]
        await conn.copy_records_to_table(stage, records=rows, columns=COLUMNS)
        status = await conn.execute(
            f"INSERT INTO {SCHEMA}.{table} ({_COLS}) SELECT {_COLS} FROM {stage}"
            " ON CONFLICT DO NOTHING"
        )
        return int(status.rsplit(" ", 1)[1])


def _command_args(record: CommandRecord) -> list[object]:
    values = msgspec.structs.asdict(record)
    args: list[object] = []
    for name in _COMMAND_FIELDS:
        value = values[name]
        if name in ("value", "payload"):
            value = None if value is None else _json.encode(value).decode()
        args.append(value)
    return args
