"""``energybus modbus``: ask Modbus devices what they hold. A thin layer over
:mod:`energybus.worker.sunspec` and :mod:`energybus.adapters.sunspec`."""

from __future__ import annotations

import asyncio
import logging
import sys
import tomllib
from pathlib import Path
from typing import NoReturn

import click

from energybus.topics import ENTITY_TYPES

STORAGE_MODELS = frozenset({124, 802})
"""Models that make a device a battery (inverter control of storage, battery base)."""


@click.group()
def modbus() -> None:
    """Modbus devices: find what a device holds, and write its register map."""


def _endpoint(value: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address."""
    host, port = value, "502"
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise click.BadParameter(f"{value!r} is not [ADDRESS]:PORT", param_hint="HOST")
        port = rest[1:] or port
    elif value.count(":") == 1:
        host, port = value.split(":")
    if not host:
        raise click.BadParameter("no host given", param_hint="HOST")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise click.BadParameter(f"port {port!r} is not 1..65535", param_hint="HOST")
    return host, int(port)


@modbus.command()
@click.argument("target", metavar="HOST[:PORT]")
@click.option(
    "--unit",
    type=click.IntRange(0, 255),
    default=1,
    show_default=True,
    metavar="N",
    help="The Modbus unit (device) id.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    metavar="S",
    help="Seconds to wait for the connection and for each answer.",
)
@click.option(
    "--write",
    "write",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the device's register map (TOML) to FILE.",
)
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@click.option(
    "--name", metavar="NAME", help="The device's name in the map's comments (default: FILE's stem)."
)
@click.option(
    "--entity-type",
    type=click.Choice(ENTITY_TYPES),
    help="The entity the device publishes as (default: storage if it has model 124 or 802, "
    "else source).",
)
def scan(
    target: str,
    unit: int,
    timeout: float,
    write: Path | None,
    force: bool,
    name: str | None,
    entity_type: str | None,
) -> None:
    """Scan a SunSpec device over Modbus TCP: find the 'SunS' marker (at 40000, 0 or
    50000), list the models it holds and its manufacturer, model and serial number.

    With --write, also write a register map for it (every point with a canonical metric;
    the rest listed under [ignore]). Name the file's stem in a site configuration's
    [adapters.modbus.devices.<name>] map, after `energybus mappings check FILE`.

    Exit status: 0 found; 1 no connection, no answer, no SunSpec device or FILE not
    written; 2 usage error.
    """
    host, port = _endpoint(target)
    if write is not None and write.exists() and not force:
        _fail(f"{write} exists (--force overwrites it)")
    from energybus.adapters.sunspec import device_map, model_name
    from energybus.worker.sunspec import ScanError, endpoint, scan as run_scan

    # A failure is reported in one line below; pymodbus would log it again on stderr.
    logging.getLogger("pymodbus").addHandler(logging.NullHandler())
    logging.getLogger("pymodbus").propagate = False
    try:
        result = asyncio.run(run_scan(host, port, unit=unit, timeout=timeout))
    except ScanError as error:
        _fail(str(error))
    where = endpoint(host, port)
    count = len(result.models)
    click.echo(
        f"found    SunSpec at {where} unit {unit}: marker at {result.base}, "
        f"{count} model{'' if count == 1 else 's'}"
    )
    for found in result.models:
        click.echo(
            f"model    {found.model_id:>5}  {model_name(found.model_id) or '(unknown)':<24}"
            f" at {found.address:>5}  length {found.length}"
        )
    if result.manufacturer is not None:
        click.echo(
            f"device   manufacturer {result.manufacturer!r}, model {result.model!r}, "
            f"serial {result.serial!r}"
            + (f", version {result.version!r}" if result.version else "")
        )
    chain = (result.base, [(m.model_id, m.length) for m in result.models])
    for same in _maps_with_chain(chain):
        click.echo(f'map      {same}: its SunSpec chain is this device\'s (use map = "{same}")')
    if write is None:
        return
    kinds = {m.model_id for m in result.models}
    chosen = entity_type or ("storage" if kinds & STORAGE_MODELS else "source")
    device = " ".join(x for x in (result.manufacturer, result.model) if x)
    note = f"scanned at {where} unit {unit}" + (f": {device}" if device else "")
    if result.serial:
        note += f", serial {result.serial}"
    try:
        text = device_map(
            result.models, name=name or write.stem, unit_id=unit, entity_type=chosen, note=note
        )
    except ValueError as error:
        _fail(f"no register map written: {error}")
    try:
        with write.open("w" if force else "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        _fail(f"{write} exists (--force overwrites it)")
    except OSError as error:
        _fail(f"cannot write {write}: {error.strerror or error}")
    registers = tomllib.loads(text)["registers"]
    metrics = sum(1 for row in registers.values() if "metric" in row)
    click.echo(
        f"wrote    {write}: {metrics} metrics from {len(registers)} registers, entity type"
        f" {chosen} (check it: energybus mappings check {write})"
    )


def _maps_with_chain(chain: tuple[int, list[tuple[int, int]]]) -> list[str]:
    """The packaged maps whose ``[device] sunspec`` chain is exactly ``chain``."""
    from energybus.adapters.modbus import load_map, map_directory

    found = []
    for path in sorted(map_directory().glob("*.toml")):
        declared = load_map(path).device.sunspec
        if declared is not None and (declared.base, list(declared.models)) == chain:
            found.append(path.stem)
    return found


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)
