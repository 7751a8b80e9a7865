"""The historian's roles of docs/security.md, against a real PostgreSQL: the schema is
owned by the role that runs ``historian init``, the worker's role writes every kind of
row (a new month's partition included) and can create, change or delete nothing, and
the reader only reads."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from energybus.commands import CommandRecord
from energybus.historian import SCHEMA, Batch, Historian, recent_commands
from energybus.rows import CounterRow, MeasurementRow
from energybus.topics import parse_topic
from tools.services import Service

pytestmark = pytest.mark.services

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _as(dsn: str, user: str) -> str:
    """``dsn`` (``postgresql://energybus@host:port/db``) logging in as ``user``."""
    scheme, rest = dsn.split("://", 1)
    return f"{scheme}://{user}@{rest.split('@', 1)[1]}"


@asynccontextmanager
async def _roles(postgres: Service) -> AsyncIterator[tuple[str, str, str]]:
    """A database owned by nobody but the superuser, and the three roles: the owner may
    create the schema in it (and nothing else in the cluster), the writer and reader may
    only log in. Dropped afterwards, whatever happened."""
    tag = uuid.uuid4().hex[:8]
    database, owner, writer, reader = (f"{kind}_{tag}" for kind in ("db", "own", "wr", "rd"))
    admin = await asyncpg.connect(postgres.url)
    try:
        for role in (owner, writer, reader):
            await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"CREATE DATABASE {database}")
        await admin.execute(f"GRANT CREATE ON DATABASE {database} TO {owner}")
        base = postgres.url.rsplit("/", 1)[0] + "/" + database
        yield _as(base, owner), _as(base, writer), _as(base, reader)
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        for role in (owner, writer, reader):
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


def _energybus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "energybus.cli", *args], capture_output=True, text=True, timeout=60
    )


def _batch(at: datetime, command_id: str) -> Batch:
    batch = Batch()
    batch.add(MeasurementRow("s", "load.a", "active_power", 1.5, at, "good"))
    batch.add(CounterRow("s", "meter.m", "energy_import_total", 10.0, at, "good"))
    batch.commands.append(
        CommandRecord.refusal(
            command_id=command_id,
            adapter="ven",
            topic=parse_topic("s/energy/load/a/shed_power/set"),
            value=None,
            code="malformed_json",
            reason="not JSON",
            at=at,
        )
    )
    return batch


def test_the_writer_writes_every_kind_of_row_and_changes_nothing_else(
    postgres: Service,
) -> None:
    async def main() -> None:
        async with _roles(postgres) as (owner, writer, reader):
            user = writer.split("://", 1)[1].split("@", 1)[0]
            reader_user = reader.split("://", 1)[1].split("@", 1)[0]
            done = await asyncio.to_thread(
                _energybus,
                "historian", "init", "--dsn", owner, "--writer", user, "--reader", reader_user,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert f"granted  writer privileges to {user}" in done.stdout

            historian = Historian(writer)
            try:
                for wrap_at in (1e6, 2e6):  # declared again: an upsert
                    await historian.declare_counters(
                        [("s", "meter.m", "energy_import_total", wrap_at, None)]
                    )
                # Two months the owner never saw: the writer's batches create their partitions.
                for n, at in enumerate((AT, AT + timedelta(days=40))):
                    result = await historian.write(_batch(at, f"c-{n}"))
                    assert (result.measurements, result.counters, result.commands) == (1, 1, 1)
                # A command record written again is an upsert: UPDATE is needed and granted.
                await historian.write(_batch(AT, "c-0"))
            finally:
                await historian.close()

            conn = await asyncpg.connect(writer)
            try:
                refused = {
                    "CREATE TABLE": f"CREATE TABLE {SCHEMA}.intruder (x int)",
                    "CREATE SCHEMA": "CREATE SCHEMA intruder",
                    "CREATE TABLE in public": "CREATE TABLE public.intruder (x int)",
                    "DROP TABLE": f"DROP TABLE {SCHEMA}.series",
                    "ALTER TABLE": f"ALTER TABLE {SCHEMA}.series ADD COLUMN x int",
                    "DELETE": f"DELETE FROM {SCHEMA}.measurement_samples",
                    "UPDATE a sample": f"UPDATE {SCHEMA}.measurement_samples SET value = 0",
                    "TRUNCATE": f"TRUNCATE {SCHEMA}.command_logs",
                    "partition another table": (
                        f"SELECT {SCHEMA}.ensure_partition('command_logs', now())"
                    ),
                }
                for what, sql in refused.items():
                    with pytest.raises(asyncpg.PostgresError) as caught:
                        await conn.execute(sql)
                    assert isinstance(
                        caught.value,
                        asyncpg.InsufficientPrivilegeError | asyncpg.RaiseError,
                    ), (what, caught.value)
                samples = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.measurement_samples")
                assert samples == 2
                wrap = await conn.fetchval(f"SELECT wrap_at FROM {SCHEMA}.counter_series")
                assert wrap == 2e6
            finally:
                await conn.close()

            conn = await asyncpg.connect(reader)
            try:
                commands = await recent_commands(conn)
                assert sorted(c["id"] for c in commands) == ["c-0", "c-1"]
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(f"DELETE FROM {SCHEMA}.command_logs")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(
                        f"INSERT INTO {SCHEMA}.series (site, device_id, metric_name)"
                        " VALUES ('s', 'x.y', 'z')"
                    )
            finally:
                await conn.close()

    asyncio.run(main())


def test_init_names_a_role_that_does_not_exist_and_a_refusal_in_one_line(
    postgres: Service,
) -> None:
    async def main() -> None:
        async with _roles(postgres) as (owner, writer, _):
            missing = await asyncio.to_thread(
                _energybus, "historian", "init", "--dsn", owner, "--writer", "no_such_role"
            )
            assert missing.returncode == 1
            assert "no role 'no_such_role'" in missing.stderr
            # The writer itself may not create the schema.
            denied = await asyncio.to_thread(_energybus, "historian", "init", "--dsn", writer)
            assert denied.returncode == 1
            assert "the database refused: permission denied" in denied.stderr
            for output in (missing, denied):
                assert "Traceback" not in output.stdout + output.stderr

    asyncio.run(main())
