"""``energybus historian``: create the schema, read energy per interval."""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta

import click

from energybus.cli.database import DSN, connect, database_errors, first_line, parse_time

_EVERY = re.compile(r"(\d+)\s*(s|m|h|d)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _every(value: str) -> timedelta:
    match = _EVERY.fullmatch(value.strip())
    if not match or int(match[1]) == 0:
        raise click.BadParameter(f"{value!r}: give a positive number and s, m, h or d, e.g. 15m")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


@click.group()
def historian() -> None:
    """The PostgreSQL historians: schema and counter energy."""


@historian.command()
@DSN
@click.option(
    "--writer",
    metavar="ROLE",
    help="Grant ROLE what the worker needs and nothing more (docs/security.md).",
)
@click.option(
    "--reader",
    metavar="ROLE",
    help="Grant ROLE read access, for watch, commands list and historian energy.",
)
def init(dsn: str, writer: str | None, reader: str | None) -> None:
    """Create or migrate the schema; safe to run again, or from several places at once.

    Run it as the role that is to own the schema; the worker can then write as a role
    that may create nothing (--writer)."""
    import asyncpg

    from energybus.historian import grant, migrate

    async def main() -> None:
        conn = await connect(dsn)
        try:
            result = await migrate(conn)
            for migration in result.applied:
                click.echo(f"applied  {migration.version:04d} {migration.name}")
            click.echo(f"schema   energybus at version {result.current}")
            if result.timescaledb:
                click.echo(
                    "note     TimescaleDB is installed; tables stay plain partitioned tables"
                )
            for kind, role in (("writer", writer), ("reader", reader)):
                if role is not None:
                    await grant(conn, kind, role)
                    click.echo(f"granted  {kind} privileges to {role}")
        except asyncpg.PostgresError as error:
            raise click.ClickException(f"the database refused: {error}") from None
        except ValueError as error:  # grant's: no such role
            raise click.ClickException(str(error)) from None
        except database_errors() as error:  # the connection lost half way
            raise click.ClickException(f"the database went away: {first_line(error)}") from None
        finally:
            await conn.close()

    asyncio.run(main())


@historian.command()
@DSN
@click.option("--device", required=True, help="device_id, <entity_type>.<entity_id>")
@click.option("--metric", required=True, help="A *_total counter metric.")
@click.option("--from", "start", required=True, help="ISO 8601 start (inclusive).")
@click.option("--to", "end", required=True, help="ISO 8601 end (exclusive).")
@click.option("--every", default=None, help="Interval length, e.g. 15m; default: one interval.")
@click.option("--site", default=None, help="Only this site (default: every site's series).")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def energy(
    dsn: str,
    device: str,
    metric: str,
    start: str,
    end: str,
    every: str | None,
    site: str | None,
    as_json: bool,
) -> None:
    """Energy per interval from the counter historian, correct across resets and
    rollovers; resets, rollovers and jumps are listed after the table."""
    import msgspec

    from energybus.historian import counter_energy, counter_events

    begin, finish = parse_time(start), parse_time(end)
    if finish <= begin:
        raise click.BadParameter("--to must be after --from")
    step = _every(every) if every else finish - begin

    async def main() -> None:
        conn = await connect(dsn)
        try:
            rows = await counter_energy(
                conn, site=site, device=device, metric=metric, start=begin, end=finish, every=step
            )
            events = await counter_events(
                conn, site=site, device=device, metric=metric, start=begin, end=finish
            )
        finally:
            await conn.close()
        if as_json:
            for row in rows:
                click.echo(msgspec.json.encode(dict(row)))
            for event in events:
                click.echo(msgspec.json.encode({"event": dict(event)}))
            return
        click.echo(f"{'from':<26} {'to':<26} {'energy':>16} {'readings':>8}  events")
        for row in rows:
            marks = ", ".join(f"{row[k]} {k}" for k in ("resets", "rollovers", "jumps") if row[k])
            click.echo(
                f"{row['bucket_start'].isoformat():<26} {row['bucket_end'].isoformat():<26} "
                f"{row['energy']:>16.6g} {row['readings']:>8}  {marks}"
            )
        for event in events:
            click.echo(
                f"{event['event']:<8} at {event['observed_at'].isoformat()} "
                f"({event['site']}): {event['previous']:g} -> {event['value']:g}, "
                f"counted {event['delta']:g}"
            )

    asyncio.run(main())
