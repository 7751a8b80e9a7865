"""``energybus mappings``: check mapping files before a worker loads them."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from energybus.adapters import adapter_class
from energybus.documents import read_toml
from energybus.errors import MappingError
from energybus.mappings import packaged_files


@click.group()
def mappings() -> None:
    """Mapping files: the data that tells each adapter what a source's fields mean."""


@mappings.command()
@click.argument("paths", nargs=-1, type=click.Path())
def check(paths: tuple[str, ...]) -> None:
    """Validate mapping files (default: the packaged ones, Modbus register maps too)
    strictly, as a worker would. A directory stands for the ``*.toml`` files in it.

    Each error names file, line and path. Exit status: 0 all valid, 1 any invalid.
    """
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        files += sorted(path.glob("*.toml")) if path.is_dir() else [path]
    if not paths:
        files = packaged_files()
    failed = False
    for path in files:
        try:
            data, where = read_toml(path)
            name = data.get("adapter")
            if not isinstance(name, str):
                raise where.error("missing_field", "a mapping names its adapter", "$.adapter")
            plan = adapter_class(name).check_mapping(path)
        except MappingError as error:
            failed = True
            if error.file is None:
                error.file = str(path)
            click.echo(f"invalid  {error}")
            continue
        click.echo(f"ok       {path} (adapter {name}, {plan.rows} rows)")
    sys.exit(1 if failed else 0)
