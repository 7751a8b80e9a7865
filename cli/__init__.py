"""The ``energybus`` command: a thin click layer over the library.

Subcommands load lazily, so that ``energybus validate`` (started once per message by
Node-RED's exec node) imports only the contract and click, never the drivers.
"""

from energybus.cli.app import main

__all__ = ["main"]
