"""Reading the historians: counter energy per interval, counter events, command records,
how many rows each table holds."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from .schema import SCHEMA

__all__ = [
    "COMMAND_COLUMNS",
    "TABLES",
    "counter_energy",
    "counter_events",
    "recent_commands",
    "table_rows",
]

TABLES = ("measurement_samples", "counter_samples", "command_logs")
"""The tables that grow: samples of each historian, and the command records."""


async def counter_energy(
    conn: asyncpg.Connection[asyncpg.Record],
    *,
    site: str | None,
    device: str,
    metric: str,
    start: datetime,
    end: datetime,
    every: timedelta,
) -> list[asyncpg.Record]:
    """One record per interval: bucket_start, bucket_end, energy, readings, resets,
    rollovers, jumps (``energybus.counter_energy``)."""
    return await conn.fetch(
        f"SELECT * FROM {SCHEMA}.counter_energy($1, $2, $3, $4, $5, $6)",
        site, device, metric, start, end, every,
    )  # fmt: skip


async def counter_events(
    conn: asyncpg.Connection[asyncpg.Record],
    *,
    site: str | None,
    device: str,
    metric: str,
    start: datetime,
    end: datetime,
) -> list[asyncpg.Record]:
    """Resets, rollovers and jumps in the range (``energybus.counter_events``)."""
    return await conn.fetch(
        f"SELECT * FROM {SCHEMA}.counter_events($1, $2, $3, $4, $5)",
        site, device, metric, start, end,
    )  # fmt: skip


COMMAND_COLUMNS = (
    "id", "adapter", "site", "entity_type", "entity_id", "metric", "value", "target",
    "action", "state", "code", "reason", "response_status", "accepted_at", "sent_at",
    "acked_at", "updated_at",
)  # fmt: skip


async def recent_commands(
    conn: asyncpg.Connection[asyncpg.Record],
    *,
    site: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    metric: str | None = None,
    states: list[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
) -> list[asyncpg.Record]:
    """Command records newest first (by arrival), each filter applied when given: the
    answer to "why did my battery not move?" (docs/commands.md)."""
    return await conn.fetch(
        f"SELECT {', '.join(COMMAND_COLUMNS)} FROM {SCHEMA}.command_logs"
        " WHERE ($1::text IS NULL OR site = $1)"
        " AND ($2::text IS NULL OR entity_type = $2)"
        " AND ($3::text IS NULL OR entity_id = $3)"
        " AND ($4::text IS NULL OR metric = $4)"
        " AND ($5::text[] IS NULL OR state = ANY($5))"
        " AND ($6::timestamptz IS NULL OR accepted_at >= $6)"
        " AND ($7::timestamptz IS NULL OR accepted_at < $7)"
        " ORDER BY accepted_at DESC, id LIMIT $8",
        site, entity_type, entity_id, metric, states, since, until, limit,
    )  # fmt: skip


async def table_rows(conn: asyncpg.Connection[asyncpg.Record]) -> dict[str, int]:
    """How many rows each of :data:`TABLES` holds (an exact count: for watching a site
    grow, not for tables of billions of rows)."""
    counts = " UNION ALL ".join(
        f"SELECT '{table}', count(*) FROM {SCHEMA}.{table}" for table in TABLES
    )
    return {table: int(count) for table, count in await conn.fetch(counts)}
