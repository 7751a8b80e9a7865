"""What the commands that read or write the database share: the DSN option, the
connection (a refusal is one line, never a traceback) and ISO 8601 times."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import click

DSN = click.option(
    "--dsn",
    envvar="ENERGYBUS_DSN",
    required=True,
    help="PostgreSQL connection string (or ENERGYBUS_DSN).",
)


def parse_time(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def connect(dsn: str) -> Any:
    import asyncpg

    from energybus.historian import dsn_problem

    problem = dsn_problem(dsn)
    if problem is not None:
        click.echo(f"cannot use --dsn: {problem}", err=True)
        sys.exit(2)
    try:
        return await asyncpg.connect(dsn, timeout=10)
    except database_errors() as error:
        click.echo(f"cannot connect to the database: {first_line(error)}", err=True)
        sys.exit(2)


def database_errors() -> tuple[type[Exception], ...]:
    """What a connection made from a user's DSN, and its queries, can raise. ValueError
    and InterfaceError: a DSN asyncpg cannot use. Their text may quote the part at
    fault, a piece of the password when its ``/`` or ``?`` was not percent-encoded: a
    DSN passes ``dsn_problem`` before it is connected with."""
    import asyncpg

    return (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)


def first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
