"""Source adapters: pure translation between a platform's messages and the energy bus.

An adapter's name is the same everywhere: its module here, its mapping file in
``energybus.mappings``, its configuration key and its golden-test folder. Adapters of
other packages register under the ``energybus.adapters`` entry-point group::

    [project.entry-points."energybus.adapters"]
    acme = "acme_energybus:AcmeAdapter"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Final

from energybus.commands import FINAL_STATES, CommandBook, CommandRecord, CommandState
from energybus.errors import MappingError

from .base import (
    Adapter,
    AmqpEndpoint,
    Formatted,
    ModbusEndpoint,
    ModbusRead,
    Normalized,
    Plan,
    Rejection,
    SourceDeclaration,
    Transport,
)
from .pipeline import Output, Pipeline

__all__ = [
    "BUILTIN",
    "ENTRY_POINT_GROUP",
    "FINAL_STATES",
    "Adapter",
    "AmqpEndpoint",
    "CommandBook",
    "CommandRecord",
    "CommandState",
    "Formatted",
    "ModbusEndpoint",
    "ModbusRead",
    "Normalized",
    "Output",
    "Pipeline",
    "Plan",
    "Rejection",
    "SourceDeclaration",
    "Transport",
    "adapter_class",
    "adapter_names",
    "create_adapter",
]

ENTRY_POINT_GROUP: Final = "energybus.adapters"
BUILTIN: Final = {
    "cpi": "energybus.adapters.cpi:CpiAdapter",
    "modbus": "energybus.adapters.modbus:ModbusAdapter",
    "ven": "energybus.adapters.ven:VenAdapter",
    "voke": "energybus.adapters.voke:VokeAdapter",
}


def _registry() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    # A plug-in cannot take over a built-in name: the name must mean one thing.
    return {**found, **BUILTIN}


def adapter_names() -> list[str]:
    """Built-in adapters and those registered by installed packages."""
    return sorted(_registry())


def adapter_class(name: str) -> type[Adapter[Any, Any]]:
    """The adapter registered as ``name``; loads its module on first use."""
    target = _registry().get(name)
    if target is None:
        raise MappingError(
            "unknown_adapter",
            f"no adapter named {name!r}; known: {', '.join(adapter_names())}",
        )
    module_name, _, attribute = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attribute)
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise MappingError("unknown_adapter", f"{target} is not an energybus Adapter")
    return cls


def create_adapter(name: str, **kwargs: Any) -> Adapter[Any, Any]:
    """Build adapter ``name`` with ``options=``, ``mapping=`` and ``new_id=`` as given."""
    return adapter_class(name)(**kwargs)
