"""``energybus commands``: what happened to the commands sent to a site's devices."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import click

from energybus.cli.database import DSN, connect, parse_time

_STATES = ("refused", "accepted", "sent", "confirmed", "rejected", "expired")
_SERIES = re.compile(r"([^/]+)/([^/]+)/([^/]+)/([^/]+)")


@click.group()
def commands() -> None:
    """Command records in the historian (command_logs): sent, confirmed, refused and why."""


@commands.command("list")
@DSN
@click.option("--site", help="Only this site.")
@click.option(
    "--series",
    metavar="SITE/TYPE/ID/METRIC",
    help="Only this series, e.g. vad/storage/battery-main/power_setpoint.",
)
@click.option("--device", metavar="TYPE.ID", help="Only this device, e.g. storage.battery-main.")
@click.option("--metric", help="Only this metric.")
@click.option("--state", "states", multiple=True, type=click.Choice(_STATES), help="Repeatable.")
@click.option("--since", help="ISO 8601: arrived at or after.")
@click.option("--until", help="ISO 8601: arrived before.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def list_commands(
    dsn: str,
    site: str | None,
    series: str | None,
    device: str | None,
    metric: str | None,
    states: tuple[str, ...],
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Recent commands, newest first, with their state and, when refused, rejected or
    expired, the reason."""
    import msgspec

    from energybus.historian import recent_commands

    entity_type = entity_id = None
    if series is not None:
        match = _SERIES.fullmatch(series)
        if match is None:
            raise click.BadParameter("give SITE/TYPE/ID/METRIC", param_hint="--series")
        site, entity_type, entity_id, metric = match.groups()
    if device is not None:
        entity_type, dot, entity_id = device.partition(".")
        if not dot or not entity_id:
            raise click.BadParameter("give TYPE.ID", param_hint="--device")
    begin = parse_time(since) if since else None
    end = parse_time(until) if until else None

    async def main() -> list[Any]:
        conn = await connect(dsn)
        try:
            return await recent_commands(
                conn,
                site=site,
                entity_type=entity_type,
                entity_id=entity_id,
                metric=metric,
                states=list(states) or None,
                since=begin,
                until=end,
                limit=limit,
            )
        finally:
            await conn.close()

    rows = asyncio.run(main())
    if as_json:
        for row in rows:
            record = dict(row)
            record["value"] = msgspec.json.decode(record["value"]) if record["value"] else None
            click.echo(msgspec.json.encode(record))
        return
    click.echo(f"{'arrived':<32} {'state':<9} {'series':<50} {'value':>10}  why")
    for row in rows:
        series_name = f"{row['site']}/{row['entity_type']}/{row['entity_id']}/{row['metric']}"
        why = f"{row['code']}: {row['reason']}" if row["code"] else (row["reason"] or "")
        click.echo(
            f"{row['accepted_at'].isoformat():<32} {row['state']:<9} {series_name:<50} "
            f"{row['value'] or '-':>10}  {why}"
        )
    if not rows:
        click.echo("(no commands match)")
