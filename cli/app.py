"""The command group, with subcommands imported only when they run."""

from __future__ import annotations

import importlib
from typing import Final

import click

from energybus._version import __version__

# name -> "module:attribute"; a new command is one line here and one module.
COMMANDS: Final = {
    "check": "energybus.cli.run:check",
    "commands": "energybus.cli.commands:commands",
    "historian": "energybus.cli.historian:historian",
    "mappings": "energybus.cli.mappings:mappings",
    "modbus": "energybus.cli.modbus:modbus",
    "normalize": "energybus.cli.normalize:normalize",
    "retire": "energybus.cli.retire:retire",
    "run": "energybus.cli.run:run",
    "simulate": "energybus.cli.simulate:simulate",
    "validate": "energybus.cli.validate:validate",
    "watch": "energybus.cli.watch:watch",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use (click's documented pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="energybus")
def main() -> None:
    """Normalize energy telemetry onto the canonical MQTT energy bus."""
