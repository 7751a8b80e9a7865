"""Creating and migrating the historian schema.

Migrations are the numbered SQL files in ``historian/migrations/``; each runs once, in
its own transaction, and is recorded in ``energybus.schema_migrations``. An advisory lock
serializes concurrent ``init`` runs (two workers starting at once), so running it again
or from several places is safe.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Final

import asyncpg

__all__ = ["GRANTS", "SCHEMA", "Migration", "MigrationResult", "grant", "migrate", "migrations"]

SCHEMA: Final = "energybus"
_LOCK: Final = 0x656E6572  # pg_advisory_lock key, constant across versions
_NAME: Final = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class MigrationResult:
    applied: list[Migration]
    current: int
    timescaledb: bool
    """Whether the TimescaleDB extension is installed in the database (not used yet)."""


def migrations() -> list[Migration]:
    """The packaged migrations in version order."""
    found = []
    for entry in files("energybus.historian").joinpath("migrations").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"historian migrations must be numbered 1..n without gaps: {versions}")
    return found


async def migrate(connection: asyncpg.Connection[asyncpg.Record]) -> MigrationResult:
    """Bring the schema to the newest version; a no-op when it is there already."""
    await connection.execute("SELECT pg_advisory_lock($1)", _LOCK)
    try:
        await connection.execute(
            f"CREATE SCHEMA IF NOT EXISTS {SCHEMA};"
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {
            row["version"]
            for row in await connection.fetch(f"SELECT version FROM {SCHEMA}.schema_migrations")
        }
        applied = []
        for migration in migrations():
            if migration.version in done:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration)
        current = await connection.fetchval(
            f"SELECT coalesce(max(version), 0) FROM {SCHEMA}.schema_migrations"
        )
        timescale = await connection.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')"
        )
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK)
    return MigrationResult(applied=applied, current=int(current), timescaledb=bool(timescale))


GRANTS: Final = {
    "writer": (
        f"GRANT USAGE ON SCHEMA {SCHEMA} TO {{role}}",
        f"GRANT SELECT ON {SCHEMA}.schema_migrations TO {{role}}",
        f"GRANT SELECT, INSERT ON {SCHEMA}.series, {SCHEMA}.measurement_samples,"
        f" {SCHEMA}.counter_samples TO {{role}}",
        # Commands move forward through their states, and a counter declaration changed
        # in the configuration replaces the stored one: both are upserts.
        f"GRANT SELECT, INSERT, UPDATE ON {SCHEMA}.command_logs, {SCHEMA}.counter_series"
        f" TO {{role}}",
        f"GRANT EXECUTE ON FUNCTION {SCHEMA}.ensure_partition(text, timestamptz) TO {{role}}",
    ),
    "reader": (
        f"GRANT USAGE ON SCHEMA {SCHEMA} TO {{role}}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {SCHEMA} TO {{role}}",
    ),
}
"""What each role of docs/security.md may do, and nothing more: the writer (the
worker) inserts and reads rows, and updates only the two kinds of row that change; the
reader (``watch``, ``commands list``, ``historian energy``) only reads. Neither may
create, alter or drop anything: that is the owner's, who runs ``historian init``."""


async def grant(connection: asyncpg.Connection[asyncpg.Record], kind: str, role: str) -> None:
    """Give ``role`` the privileges of a ``kind`` of :data:`GRANTS`, in one transaction;
    ValueError when the role does not exist (a typo must not look like success)."""
    exists = await connection.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
    if not exists:
        raise ValueError(f"no role {role!r} in this database cluster: create it first")
    quoted = '"' + role.replace('"', '""') + '"'
    async with connection.transaction():
        for statement in GRANTS[kind]:
            await connection.execute(statement.format(role=quoted))
