"""Writing batches into PostgreSQL: one transaction per batch, idempotent.

Sample rows are stored by series (migration 0003): each distinct (site, device_id,
metric_name) gets an integer id in ``energybus.series`` the first time it is written,
and the writer keeps the ids it has seen, so a row goes out as four numbers. A batch is
a binary COPY per table when every row is new (its body packed here, 40 bytes a row),
and otherwise one ``INSERT ... SELECT
FROM unnest(arrays) ON CONFLICT DO NOTHING``, which makes a redelivered sample change
nothing, inside the batch as across batches (the first write wins). Command records
move forward only.
"""

from __future__ import annotations

import operator
import re
import struct
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import msgspec

from energybus.commands import CommandRecord

from .batch import Batch, RowTuple
from .schema import SCHEMA, migrations

__all__ = ["QUALITY_CODES", "Historian", "SchemaBehind", "WriteResult", "dsn_problem"]

QUALITY_CODES: Final = {"good": 0, "degraded": 1, "stale": 2, "bad": 3}
"""The codes ``energybus.quality_code`` gives; the views show the names."""
_TABLES: Final = {"measurements": "measurement_samples", "counters": "counter_samples"}
_INSERT: Final = {
    kind: f"INSERT INTO {SCHEMA}.{table} (series_id, observed_at, value, quality)"
    " SELECT * FROM unnest($1::int4[], $2::timestamptz[], $3::float8[], $4::int2[])"
    " ON CONFLICT DO NOTHING"
    for kind, table in _TABLES.items()
}
# New series in key order, so that two workers adding overlapping sets wait for each
# other instead of deadlocking; the second SELECT finds those that existed already.
_SERIES_SQL: Final = (
    "WITH k AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
    " AS k(site, device_id, metric_name)),"
    f" added AS (INSERT INTO {SCHEMA}.series (site, device_id, metric_name)"
    " SELECT site, device_id, metric_name FROM k ORDER BY 1, 2, 3"
    " ON CONFLICT DO NOTHING RETURNING id, site, device_id, metric_name)"
    " SELECT id, site, device_id, metric_name FROM added UNION ALL"
    f" SELECT s.id, s.site, s.device_id, s.metric_name FROM {SCHEMA}.series s"
    " JOIN k USING (site, device_id, metric_name)"
)
_SERIES_CACHE: Final = 1_000_000
_SAMPLE_COLUMNS: Final = ("series_id", "observed_at", "value", "quality")
_CAREFUL_BATCHES: Final = 20
# A row of a binary COPY into a sample table: 4 fields, each its length and its value:
# series_id int4, observed_at int8 (microseconds since 2000-01-01 UTC), value float8,
# quality int2.
_ROW: Final = struct.Struct("!hiiiqidih")
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
_COPY_TRAILER: Final = b"\xff\xff"
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_AT: Final = operator.itemgetter(4)
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
    # A later state wins; a command still waiting may also carry the source's progress
    # (``response_status`` DISPATCHED, EXECUTING) without changing state.
    + f" WHERE {SCHEMA}.command_rank(EXCLUDED.state) > {SCHEMA}.command_rank(command_logs.state)"
    + " OR (EXCLUDED.state = command_logs.state AND EXCLUDED.state IN ('accepted', 'sent'))"
)
_json: Final = msgspec.json.Encoder()


_SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_HOST_PORT: Final = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::([0-9]*))?")
_ENCODED: Final = "in a password, / ? # @ and : must be percent-encoded: %2F %3F %23 %40 %3A"


def dsn_problem(dsn: str) -> str | None:
    """What is wrong with a PostgreSQL URL that no connection could mend, in words that
    never repeat the URL (it may hold a password); ``None`` when nothing is. Checked once
    where a DSN comes in, so that a typo is one clear line at start, not an error
    retried for ever or an exception's text.

    A ``/``, ``?`` or ``#`` in a password ends the host part early: the rest of the
    password, then ``@`` and the real host, become the database, the parameters or a
    fragment, where a redacted DSN shows them and where asyncpg's errors quote them.
    So an ``@`` past the host part, a ``#`` anywhere (PostgreSQL URLs have no fragment)
    and two ``@`` in the host part (asyncpg splits the user from the host at the first,
    :func:`~urllib.parse.urlsplit` at the last) are refused, as a port that is no port.
    """
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "not a URL (postgresql://user@host:port/database)"
    if parts.scheme not in ("postgresql", "postgres"):
        return "must start with postgresql:// (or postgres://)"
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(",") if hosts else []:
        match = _HOST_PORT.fullmatch(host)
        if match is None or (match[2] is not None and not (match[2] and 0 < int(match[2]) < 65536)):
            return f"a port must be a number from 1 to 65535 ({_ENCODED})"
    if "#" in dsn or parts.netloc.count("@") > 1 or "@" in parts.path + parts.query:
        return f"an @ or # outside the user part ({_ENCODED})"
    for key, value in parse_qsl(parts.query):
        if key == "sslmode" and value not in _SSLMODES:
            return f"sslmode must be one of {', '.join(_SSLMODES)}"
    return None


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
        self._careful = dict.fromkeys(_TABLES, 0)
        """Per table, how many more batches skip the plain COPY after one that conflicted."""
        self._series: dict[tuple[str, str, str], int] = {}
        """Series ids by key, as this database gave them; emptied with the connection,
        so that ids never outlive the database they came from."""

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
        except BaseException:
            await conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self._months.clear()  # a partition made in a rolled-back transaction is not there
        self._series.clear()
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
        try:
            # Series ids first, each in its own short transaction: an id that exists is
            # valid whatever becomes of this batch, so the cache never holds one that a
            # rollback took back.
            measurements = await self._prepare(conn, batch.measurements)
            counters = await self._prepare(conn, batch.counters)
            async with conn.transaction():
                await self._partitions(conn, "measurement_samples", measurements)
                await self._partitions(conn, "counter_samples", counters)
                inserted_m = await self._insert(conn, "measurements", measurements)
                inserted_c = await self._insert(conn, "counters", counters)
                if batch.commands:
                    await conn.executemany(_COMMAND_SQL, [_command_args(c) for c in batch.commands])
        except BaseException:
            # The connection's state is unknown after a failure mid-transaction.
            await self.close()
            raise
        repeated = len(batch.measurements) + len(batch.counters) - inserted_m - inserted_c
        return WriteResult(inserted_m, inserted_c, len(batch.commands), repeated)

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

    async def _prepare(
        self, conn: asyncpg.Connection[asyncpg.Record], rows: list[RowTuple]
    ) -> _Prepared | None:
        """The rows as the body of a binary COPY: measured here, a third of the client's
        time for asyncpg's own record encoding (0.34 against 0.82 µs a row), since the
        observation times of a batch are few and converted once each."""
        if not rows:
            return None
        ids = self._series
        codes = QUALITY_CODES
        pack = _ROW.pack
        micros = {at: (at - _PG_EPOCH) // _MICROSECOND for at in set(map(_AT, rows))}
        try:
            body = [
                pack(4, 4, ids[(s, d, m)], 8, micros[at], 8, v, 2, codes[q])
                for s, d, m, v, at, q in rows
            ]
        except KeyError:
            keys = dict.fromkeys((row[0], row[1], row[2]) for row in rows)
            await self._resolve(conn, [key for key in keys if key not in ids])
            body = [
                pack(4, 4, ids[(s, d, m)], 8, micros[at], 8, v, 2, codes[q])
                for s, d, m, v, at, q in rows
            ]
        return _Prepared(rows, b"".join([_COPY_HEADER, *body, _COPY_TRAILER]), micros)

    async def _resolve(
        self, conn: asyncpg.Connection[asyncpg.Record], keys: list[tuple[str, str, str]]
    ) -> None:
        """Ids for ``keys``, adding the series that are new. A series another worker adds
        at the same moment is invisible to this statement's snapshot; the next attempt
        sees it."""
        cache = self._series
        if len(cache) + len(keys) > _SERIES_CACHE:
            cache.clear()
        for _ in range(5):
            sites, devices, metrics = (list(column) for column in zip(*keys, strict=True))
            for record in await conn.fetch(_SERIES_SQL, sites, devices, metrics):
                cache[(record[1], record[2], record[3])] = record[0]
            keys = [k for k in keys if k not in cache]
            if not keys:
                return
        raise RuntimeError(f"series ids not found after five attempts: {keys[:3]}")

    async def _partitions(
        self, conn: asyncpg.Connection[asyncpg.Record], table: str, prepared: _Prepared | None
    ) -> None:
        if prepared is None:
            return
        months: dict[tuple[int, int], datetime] = {}
        for at in prepared.times:  # the batch's distinct observation times, few
            months.setdefault((at.year, at.month), at)
        for (year, month), at in months.items():
            if (table, year, month) not in self._months:
                await conn.execute(f"SELECT {SCHEMA}.ensure_partition($1, $2)", table, at)
                self._months.add((table, year, month))

    async def _insert(
        self, conn: asyncpg.Connection[asyncpg.Record], kind: str, prepared: _Prepared | None
    ) -> int:
        """COPY straight into the table when the batch is all new (the common case, and
        PostgreSQL's fastest way in); a batch with a row already stored or repeated
        fails that COPY whole, inside a savepoint, and goes in again with ON CONFLICT DO
        NOTHING. Redeliveries come in runs (a reconnect, a replay), so after one the
        next batches take the conflict-safe way straight away."""
        if prepared is None:
            return 0
        if self._careful[kind]:
            self._careful[kind] -= 1
        else:
            try:
                async with conn.transaction():
                    status = await conn.copy_to_table(
                        _TABLES[kind],
                        schema_name=SCHEMA,
                        source=_Once(prepared.body),
                        columns=_SAMPLE_COLUMNS,
                        format="binary",
                    )
                return int(status.rsplit(" ", 1)[1])
            except asyncpg.UniqueViolationError:
                self._careful[kind] = _CAREFUL_BATCHES
        ids, codes = self._series, QUALITY_CODES
        records = [(ids[(s, d, m)], at, v, codes[q]) for s, d, m, v, at, q in prepared.rows]
        columns = zip(*records, strict=True)
        status = await conn.execute(_INSERT[kind], *columns)
        return int(status.rsplit(" ", 1)[1])


class _Prepared:
    """A batch's rows of one table, with the COPY body made of them."""

    __slots__ = ("body", "rows", "times")

    def __init__(self, rows: list[RowTuple], body: bytes, times: Iterable[datetime]) -> None:
        self.rows = rows
        self.body = body
        self.times = times


class _Once:
    """``body`` as the asynchronous iterable that asyncpg's COPY takes (a bytes object
    it would take for a file name)."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._body is None:
            raise StopAsyncIteration
        body, self._body = self._body, None
        return body


def _command_args(record: CommandRecord) -> list[object]:
    values = msgspec.structs.asdict(record)
    args: list[object] = []
    for name in _COMMAND_FIELDS:
        value = values[name]
        if name in ("value", "payload"):
            value = None if value is None else _json.encode(value).decode()
        args.append(value)
    return args
