"""Upgrading the historian schema: a version-1 database keeps its command records through
migration 2, and a worker whose database is behind says what to run, not one failed
insert per batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
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


def _in_fresh_database(postgres: Service, scenario: Callable[[str], Awaitable[None]]) -> None:
    """Run ``scenario`` against a database of its own, dropped afterwards."""

    async def main() -> None:
        dsn = await _fresh_database(postgres)
        try:
            await scenario(dsn)
        finally:
            await _drop(postgres, dsn)

    asyncio.run(main())


async def _at_version(dsn: str, version: int) -> None:
    """The schema as `historian init` of an earlier release left it."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"CREATE SCHEMA {SCHEMA}; CREATE TABLE {SCHEMA}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in migrations()[:version]:
            await conn.execute(migration.sql)
            await conn.execute(
                f"INSERT INTO {SCHEMA}.schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
    finally:
        await conn.close()


async def _version_one(dsn: str) -> None:
    await _at_version(dsn, 1)
    conn = await asyncpg.connect(dsn)
    try:
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
    async def scenario(dsn: str) -> None:
        await _version_one(dsn)
        historian = Historian(dsn)
        with pytest.raises(SchemaBehind) as behind:
            await historian.connect()
        assert "version 1" in str(behind.value) and "energybus historian init" in str(behind.value)

        conn = await asyncpg.connect(dsn)
        try:
            result = await migrate(conn)
            assert [m.version for m in result.applied] == list(range(2, len(migrations()) + 1))
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

    _in_fresh_database(postgres, scenario)


def test_a_database_without_the_schema_is_behind_too(postgres: Service) -> None:
    async def scenario(dsn: str) -> None:
        with pytest.raises(SchemaBehind) as behind:
            await Historian(dsn).connect()
        assert behind.value.current == 0

    _in_fresh_database(postgres, scenario)


# Rows a version-1 historian holds (version 2 kept its sample tables): two sites, two
# months, every quality, a device whose counter resets and rolls over, a declared wrap.
_MONTH_EDGE = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)


_WideRow = tuple[str, str, str, datetime, float, str]


def _wide_rows() -> tuple[list[_WideRow], list[_WideRow]]:
    qualities = ["good", "degraded", "stale", "bad"]
    measurements = [
        (site, f"load.c-{c}", metric, _MONTH_EDGE + timedelta(minutes=15 * i),
         float(i * 10 + c), qualities[(i + c) % 4])
        for site in ("vad", "north")
        for c in range(3)
        for metric in ("active_power", "voltage")
        for i in range(8)
    ]  # fmt: skip
    wh = [100.0, 200.0, 300.0, 50.0, 150.0, 999_990.0, 20.0, 5e6, 5e6 + 100]
    counters = [
        (site, "source.meter-1", "energy_total", _MONTH_EDGE + timedelta(minutes=15 * i),
         value, "good")
        for site in ("vad", "north")
        for i, value in enumerate(wh)
    ]  # fmt: skip
    return measurements, counters


async def _answers(conn: asyncpg.Connection[asyncpg.Record]) -> dict[str, list[tuple[object, ...]]]:
    """Everything a reader of the historian can ask, as plain tuples."""
    start, end = _MONTH_EDGE - timedelta(hours=1), _MONTH_EDGE + timedelta(hours=3)
    answers: dict[str, list[tuple[object, ...]]] = {}
    for view in ("measurements", "counter_readings"):
        rows = await conn.fetch(
            f"SELECT * FROM {SCHEMA}.{view} ORDER BY site, device_id, metric_name, observed_at"
        )
        answers[view] = [tuple(r) for r in rows]
        answers[view + " columns"] = [tuple(rows[0].keys())]
    for site in ("vad", "north", None):
        for label, sql in (
            ("energy", f"SELECT * FROM {SCHEMA}.counter_energy($1, $2, $3, $4, $5, $6)"),
            ("events", f"SELECT * FROM {SCHEMA}.counter_events($1, $2, $3, $4, $5)"),
        ):
            args: list[object] = [site, "source.meter-1", "energy_total", start, end]
            if label == "energy":
                args.append(timedelta(minutes=30))
            rows = await conn.fetch(sql, *args)
            answers[f"{label} {site}"] = [tuple(r) for r in rows]
    return answers


def test_a_version_one_historian_migrates_to_series_keys_without_losing_a_row(
    postgres: Service,
) -> None:
    async def scenario(dsn: str) -> None:
        await _at_version(dsn, 1)
        measurements, counters = _wide_rows()
        conn = await asyncpg.connect(dsn)
        try:
            for table, rows in (("measurements", measurements), ("counter_readings", counters)):
                for month in {(r[3].year, r[3].month): r[3] for r in rows}.values():
                    await conn.execute(f"SELECT {SCHEMA}.ensure_partition($1, $2)", table, month)
                await conn.executemany(
                    f"INSERT INTO {SCHEMA}.{table}"
                    " (site, device_id, metric_name, observed_at, value, quality)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    rows,
                )
            await conn.execute(
                f"INSERT INTO {SCHEMA}.counter_series (site, device_id, metric_name, wrap_at)"
                " VALUES ('vad', '*', 'energy_total', 1000000)"
            )
            before = await _answers(conn)
            result = await migrate(conn)
            assert [m.version for m in result.applied] == list(range(2, len(migrations()) + 1))
            after = await _answers(conn)
            series = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.series")
        finally:
            await conn.close()

        assert len(before["measurements"]) == len(measurements) == 96
        assert len(before["counter_readings"]) == len(counters) == 18
        assert [r[0] for r in before["events vad"]] and before["energy None"]  # not empty
        for key in before:
            assert after[key] == before[key], key
        assert series == 2 * 3 * 2 + 2

        # Idempotent across the migration: the same rows again add nothing, and a row
        # already stored keeps its first value.
        historian = Historian(dsn)
        again = Batch(
            measurements=[
                (site, device, metric, value + 1000, at, quality)
                for site, device, metric, at, value, quality in measurements
            ],
            counters=[
                (site, device, metric, value, at, quality)
                for site, device, metric, at, value, quality in counters
            ],
        )
        written = await historian.write(again)
        assert (written.measurements, written.counters, written.duplicates) == (0, 0, 96 + 18)
        await historian.close()
        # A writer that has seen no conflict yet tries a plain COPY first; a repeat
        # inside the batch fails it whole, and the batch goes in conflict-safe.
        historian = Historian(dsn)
        new_at = _MONTH_EDGE + timedelta(days=40)
        fresh = Batch(
            measurements=[
                ("vad", "load.c-0", "active_power", 1.0, new_at, "good"),
                ("vad", "load.c-0", "active_power", 2.0, new_at, "good"),
                ("vad", "load.new", "active_power", 3.0, new_at, "stale"),
            ]
        )
        written = await historian.write(fresh)
        await historian.close()
        assert (written.measurements, written.duplicates) == (2, 1)
        conn = await asyncpg.connect(dsn)
        try:
            stored = await conn.fetch(
                f"SELECT device_id, value, quality FROM {SCHEMA}.measurements"
                " WHERE observed_at = $1 ORDER BY device_id",
                new_at,
            )
            unchanged = await conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.measurements WHERE value >= 1000"
            )
        finally:
            await conn.close()
        assert [tuple(r) for r in stored] == [("load.c-0", 1.0, "good"), ("load.new", 3.0, "stale")]
        assert unchanged == 0

    _in_fresh_database(postgres, scenario)


def test_rows_copied_in_binary_read_back_exactly(postgres: Service) -> None:
    """The writer builds the binary COPY itself: every field must come back as it went,
    to the microsecond and the last bit of the double, and counters in their table."""
    at = datetime(2026, 12, 1, 12, 0, 0, 123457, tzinfo=UTC)
    measurements = [
        ("vad", f"load.c-{i}", "active_power", 1075.0000000000002 * i - 0.1, at, quality)
        for i, quality in enumerate(("good", "degraded", "stale", "bad"))
    ]
    counters = [("vad", "grid.main", "import_energy_total", 1e15 + 0.5, at, "good")]

    async def scenario(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            historian = Historian(dsn)
            written = await historian.write(Batch(measurements=measurements, counters=counters))
            await historian.close()
            assert (written.measurements, written.counters, written.duplicates) == (4, 1, 0)
            stored = {
                view: [
                    (r["site"], r["device_id"], r["metric_name"], r["value"], r["observed_at"],
                     r["quality"])
                    for r in await conn.fetch(
                        f"SELECT * FROM {SCHEMA}.{view} ORDER BY device_id"
                    )
                ]
                for view in ("measurements", "counter_readings")
            }  # fmt: skip
        finally:
            await conn.close()
        assert stored == {"measurements": measurements, "counter_readings": counters}

    _in_fresh_database(postgres, scenario)


def test_two_writers_adding_the_same_new_series_at_once_both_store_their_rows(
    postgres: Service,
) -> None:
    """Each worker asks for the ids of series that are new to it; two asking for the same
    ones at the same moment must get the same ids, and neither batch may fail."""
    keys = [("vad", f"load.c-{i}", metric) for i in range(200) for metric in ("p", "q")]

    def batch(offset: int) -> Batch:
        at = AT + timedelta(seconds=offset)
        return Batch(measurements=[(s, d, m, float(offset), at, "good") for s, d, m in keys])

    async def scenario(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            writers = [Historian(dsn) for _ in range(4)]
            results = await asyncio.gather(*(w.write(batch(i)) for i, w in enumerate(writers)))
            for writer in writers:
                await writer.close()
            series = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.series")
            rows = await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.measurements")
        finally:
            await conn.close()
        assert [r.measurements for r in results] == [len(keys)] * 4
        assert series == len(keys)
        assert rows == 4 * len(keys)

    _in_fresh_database(postgres, scenario)


def test_command_logs_keep_the_latest_state_and_progress_without_going_back(
    postgres: Service,
) -> None:
    """A command's snapshots arrive in order of their states; progress (the source's
    DISPATCHED) updates a command still waiting, and nothing moves an outcome back."""

    async def scenario(dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        historian = Historian(dsn)
        await historian.connect()
        accepted = CommandRecord(
            id="c-1",
            adapter="voke",
            site="s",
            entity_type="storage",
            entity_id="b",
            metric="power_setpoint",
            value=100,
            target="acme/P-1/B1",
            action="set_power",
            payload={"kw": 0.1},
            state="accepted",
            accepted_at=AT,
            expires_at=AT,
        )
        replace = msgspec.structs.replace
        received = replace(accepted, response_status="RECEIVED")
        dispatched = replace(accepted, response_status="DISPATCHED")
        confirmed = replace(accepted, state="confirmed", response_status="ACK", acked_at=AT)
        late = replace(accepted, state="sent", sent_at=AT)  # a confirm behind the ACK
        expected = [
            ("accepted", None),
            ("accepted", "RECEIVED"),
            ("accepted", "DISPATCHED"),
            ("confirmed", "ACK"),
            ("confirmed", "ACK"),
        ]
        seen = []
        for record in (accepted, received, dispatched, confirmed, late):
            await historian.write(Batch(commands=[record]))
            conn = await asyncpg.connect(dsn)
            try:
                row = await conn.fetchrow(
                    f"SELECT state, response_status FROM {SCHEMA}.command_logs WHERE id = 'c-1'"
                )
            finally:
                await conn.close()
            assert row is not None
            seen.append((row["state"], row["response_status"]))
        await historian.close()
        assert seen == expected

    _in_fresh_database(postgres, scenario)
