"""``energybus watch``: a live view of a site: the canonical bus, the historian and the
worker, refreshed until stopped.

The I/O is here: an MQTT subscription to the bus (``+/energy/#``, the dead letters and
the workers' status), a poll of the historian (row counts, newest command records) and a
scrape of the worker's metrics; what they bring goes into a :class:`~.view.Board`, which
:func:`~.view.render` draws (cli/view.py, pure). On a terminal the view is redrawn in
place with ANSI codes; otherwise it is printed in full at each refresh, for logs and
pipes.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import click

from energybus.cli.login import Login, login_options
from energybus.cli.signals import until_signal
from energybus.cli.view import Board, CommandLine, render

__all__ = ["Screen", "Where", "follow", "parse_metrics", "watch"]

_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"


@dataclass(frozen=True)
class Where:
    """Where to look: the broker, the historian (optional) and the worker's metrics
    (optional), and the worker's topic prefix."""

    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 18830
    dsn: str | None = field(default=None, repr=False)  # it may hold a password
    metrics_url: str | None = None
    prefix: str = "energybus"
    login: Login | None = None


def parse_metrics(text: str) -> dict[str, float]:
    """The samples of a Prometheus text page as ``name{label="value",...}`` (labels in
    the page's order) to value."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        body: bytes = response.read()
    return body.decode("utf-8", "replace")


async def follow(
    board: Board,
    where: Where,
    *,
    stop: asyncio.Event,
    every_s: float = 1.0,
    draw: Callable[[], None] | None = None,
    max_commands: int = 8,
    commands_since: datetime | None = None,
) -> None:
    """Feed ``board`` until ``stop`` is set: the bus as messages arrive, the historian
    (the newest commands, those that arrived from ``commands_since`` if given) and the
    metrics every ``every_s``, then ``draw``. Raises ConnectionError when the broker
    cannot be reached at the start; later faults of any part are shown on the board
    (:attr:`Board.problems`) while it tries again."""
    from energybus.cli.mqtt import MqttLink

    def on_message(topic: str, payload: bytes, retain: bool) -> None:
        board.message(topic, payload, retain=retain, at=time.time())

    filters = ["+/energy/#", f"{where.prefix}/dead_letter/#", f"{where.prefix}/worker/+/status"]
    link = MqttLink(on_message)
    await link.connect(where.mqtt_host, where.mqtt_port, name="energybus-watch", login=where.login)
    await link.subscribe(filters)
    bus = asyncio.create_task(_bus(board, where, link, filters, stop))
    conn: Any = None
    try:
        while not stop.is_set():
            conn = await _poll_database(board, where, conn, max_commands, commands_since)
            await _poll_metrics(board, where)
            if draw is not None:
                draw()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
    finally:
        bus.cancel()
        await asyncio.gather(bus, return_exceptions=True)
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)


async def _bus(
    board: Board, where: Where, link: Any, filters: list[str], stop: asyncio.Event
) -> None:
    """Keep the subscription: when the broker goes away, say so and connect again."""
    from energybus.cli.mqtt import MqttLink

    try:
        while True:
            await asyncio.shield(link.closed)
            if stop.is_set():
                return
            board.problem("bus", f"lost the broker at {where.mqtt_host}:{where.mqtt_port}")
            while True:
                await asyncio.sleep(1.0)
                link = MqttLink(link.on_message)
                try:
                    await link.connect(
                        where.mqtt_host, where.mqtt_port, name="energybus-watch", login=where.login
                    )
                    await link.subscribe(filters)
                except ConnectionError:
                    continue
                board.problems.pop("bus", None)
                break
    finally:
        await link.close()


async def _poll_database(
    board: Board, where: Where, conn: Any, limit: int, since: datetime | None
) -> Any:
    """Row counts and the newest command records; the connection kept for next time,
    or None after a fault (shown on the board)."""
    if where.dsn is None:
        return None
    import asyncpg

    from energybus.cli.database import database_errors, first_line
    from energybus.historian import recent_commands, table_rows

    try:
        if conn is None or conn.is_closed():
            conn = await asyncpg.connect(where.dsn, timeout=5)
        board.set_rows(await table_rows(conn))
        records = await recent_commands(conn, since=since, limit=limit)
    except database_errors() as error:
        board.problem("database", first_line(error))
        if conn is not None:
            conn.terminate()
        return None
    board.set_commands([_command(record) for record in records])
    return conn


def _command(record: Any) -> CommandLine:
    import msgspec

    why = f"{record['code']}: {record['reason']}" if record["code"] else record["reason"]
    value = record["value"]
    return CommandLine(
        accepted_at=record["accepted_at"],
        adapter=record["adapter"],
        series="/".join(
            (record["site"], record["entity_type"], record["entity_id"], record["metric"])
        ),
        value=msgspec.json.decode(value) if value else None,
        state=record["state"],
        updated_at=record["updated_at"],
        response_status=record["response_status"],
        why=why,
    )


async def _poll_metrics(board: Board, where: Where) -> None:
    if where.metrics_url is None:
        return
    try:
        text = await asyncio.to_thread(_scrape, where.metrics_url)
        samples = parse_metrics(text)
    except (OSError, ValueError) as error:
        board.problem("metrics", f"{where.metrics_url}: {error}")
        return
    board.set_metrics(samples, at=time.time())


class Screen:
    """Draws the view: redrawn in place on a terminal, printed whole otherwise."""

    def __init__(self, *, live: bool, title: str = "energybus watch") -> None:
        self.live = live
        self.title = title
        self.notes: list[str] = []
        self._started = False

    def draw(self, board: Board) -> None:
        size = shutil.get_terminal_size((120, 40))
        width = size.columns - 1
        notes = self.notes
        lines = render(
            board, time.time(), width=width, color=self.live, title=self.title, notes=notes
        )
        if self.live:
            lines = lines[: max(size.lines - 1, 10)]
            prefix = "" if self._started else _HIDE_CURSOR
            self._started = True
            sys.stdout.write(prefix + "\x1b[H" + "".join(f"{line}\x1b[K\n" for line in lines))
            sys.stdout.write("\x1b[J")
        else:
            sys.stdout.write("\n".join(lines) + "\n\n")
        sys.stdout.flush()

    def close(self) -> None:
        """Leave the terminal as it was: the cursor shown, below the last view."""
        if self.live and self._started:
            sys.stdout.write(_SHOW_CURSOR)
            sys.stdout.flush()


@click.command()
@click.option(
    "--mqtt",
    "broker",
    default="127.0.0.1:18830",
    show_default=True,
    metavar="HOST:PORT",
    help="The MQTT broker of the bus (default: the demo's).",
)
@click.option(
    "--dsn",
    envvar="ENERGYBUS_DSN",
    help="PostgreSQL (or ENERGYBUS_DSN): historian row counts and command records.",
)
@click.option(
    "--metrics",
    "metrics_url",
    metavar="URL",
    help="The worker's metrics, e.g. http://127.0.0.1:9464/metrics: source rates, refusals.",
)
@click.option("--prefix", default="energybus", show_default=True, help="The worker's topic root.")
@click.option(
    "--every",
    type=click.FloatRange(min=0.1),
    metavar="S",
    help="Seconds between refreshes (default: 1 on a terminal, 5 otherwise).",
)
@click.option("--once", is_flag=True, help="Print the view once after --settle seconds; exit.")
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    metavar="S",
    help="With --once: how long to gather before printing.",
)
@click.option("--duration", type=click.FloatRange(min=0), metavar="S", help="Stop after S s.")
@click.option("--plain", is_flag=True, help="Print whole views even on a terminal.")
@login_options
def watch(
    login: Login,
    broker: str,
    dsn: str | None,
    metrics_url: str | None,
    prefix: str,
    every: float | None,
    once: bool,
    settle: float,
    duration: float | None,
    plain: bool,
) -> None:
    """Watch a site live: every entity on the bus with its newest values (with units),
    their age and rate; the historian's rows; dead letters; the newest commands and
    their states.

    On a terminal the view is redrawn in place; otherwise (a pipe, a log, or --plain) it
    is printed whole at each refresh. Runs until SIGINT or SIGTERM or --duration. Exit
    status: 0 done; 1 the broker cannot be reached; 2 usage error.
    """
    host, _, port_text = broker.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise click.BadParameter(f"{broker!r}: give HOST:PORT", param_hint="--mqtt")
    if dsn is not None:
        from energybus.historian import dsn_problem

        problem = dsn_problem(dsn)
        if problem is not None:  # asyncpg's own error would quote the part at fault
            raise click.BadParameter(problem, param_hint="--dsn")
    where = Where(host, int(port_text), dsn, metrics_url, prefix, login)
    live = sys.stdout.isatty() and not plain and not once
    screen = Screen(live=live)
    board = Board(prefix=prefix)
    every_s = every if every is not None else (1.0 if live else 5.0)

    async def main(stop: asyncio.Event) -> None:
        limit = settle if once else duration
        if limit is not None:
            asyncio.get_running_loop().call_later(limit, stop.set)
        if once:  # two polls before the one view: metrics rates need two scrapes
            await follow(board, where, stop=stop, every_s=max(settle / 2, 0.1))
        else:
            await follow(board, where, stop=stop, every_s=every_s, draw=lambda: screen.draw(board))

    try:
        until_signal(main)
    except ConnectionError as error:
        click.echo(f"error    {error}", err=True)
        sys.exit(1)
    finally:
        screen.close()
    if once:
        screen.draw(board)
