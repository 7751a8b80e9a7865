"""Upgrading the historian schema: a version-1 database keeps its command records through
migration 2, and a worker whose database is behind says what to run, not one failed
insert per batch."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from energybus.commands import CommandRecord
from energybus.historian import SCHEMA, Batch, Historian, SchemaBehind, migrate, migrations
from energybus.topics import parse_topic
from tools.services import Service

pytestmark = pytest.mark.services

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


async def _fresh_database(postgres: Service) -> str:
    name = f"t_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return postgres.url.rsplit("/", 1)[0] + "/" + name


async def _drop(postgres: Service, dsn: str) -> None:
    """Leave the test server as the test found it."""
    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")
    finally:
        await admin.close()


async def _version_one(dsn: str) -> None:
    """The schema as `historian init` of the previous release left it."""
    first = migrations()[0]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"CREATE SCHEMA {SCHEMA}; CREATE TABLE {SCHEMA}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        await conn.execute(first.sql)
        await conn.execute(
            f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES (1, $1)", first.name
        )
        await conn.execute(
            f"INSERT INTO {SCHEMA}.command_logs (id, adapter, site, entity_type, entity_id,"
            " metric, value, target, action, state, accepted_at, expires_at)"
            " VALUES ('old-1', 'ven', 'vad', 'load', 'v1', 'shed_power', '2000', 'v1',"
            " 'event', 'confirmed', $1, $1)",
            AT,
        )
    finally:
        await conn.close()


def test_a_version_one_database_is_refused_clearly_then_migrated_without_loss(
    postgres: Service,
) -> None:
    async def main() -> None:
        dsn = await _fresh_database(postgres)
        try:
            await scenario(dsn)
        finally:
            await _drop(postgres, dsn)

    async def scenario(dsn: str) -> None:
        await _version_one(dsn)
        historian = Historian(dsn)
        with pytest.raises(SchemaBehind) as behind:
            await historian.connect()
        assert "version 1" in str(behind.value) and "energybus historian init" in str(behind.value)

        conn = await asyncpg.connect(dsn)
        try:
            result = await migrate(conn)
            assert [m.version for m in result.applied] == [2]
            old = await conn.fetchrow(f"SELECT * FROM {SCHEMA}.command_logs WHERE id = 'old-1'")
            assert old is not None and old["state"] == "confirmed" and old["code"] is None
        finally:
            await conn.close()

        refused = CommandRecord.refusal(
            command_id="new-1",
            adapter="ven",
            topic=parse_topic("vad/energy/load/v1/shed_power/set"),
            value=None,
            code="malformed_json",
            reason="not JSON",
            at=AT,
        )
        await historian.write(Batch(commands=[refused]))
        await historian.close()
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                f"SELECT id, state, code, value FROM {SCHEMA}.command_logs ORDER BY id"
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in rows] == [
            ("new-1", "refused", "malformed_json", None),
            ("old-1", "confirmed", None, "2000"),
        ]

    asyncio.run(main())


def test_a_database_without_the_schema_is_behind_too(postgres: Service) -> None:
    async def main() -> None:
        dsn = await _fresh_database(postgres)
        try:
            with pytest.raises(SchemaBehind) as behind:
                await Historian(dsn).connect()
            assert behind.value.current == 0
        finally:
            await _drop(postgres, dsn)

    asyncio.run(main())
