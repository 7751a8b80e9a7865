"""Reading the counter historian: energy per interval and counter events."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from .schema import SCHEMA

__all__ = ["counter_energy", "counter_events"]


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
