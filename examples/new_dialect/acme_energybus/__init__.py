"""Acme site gateways for energybus: this adapter plus ``acme.toml`` is all of it.

Acme gateways publish ``acme/{device}/state`` with ``{"t": <unix ms>, "values": {...}}``.
The adapter knows only that envelope and which template each device uses (its options);
what every signal means is in the mapping, shipped beside this module.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from energybus.adapters import Adapter, Normalized, Plan, Rejection, SourceDeclaration
from energybus.adapters.engine import DeviceTemplate, Template, compile_templates, decode
from energybus.adapters.mapping import Compiler, Document, MappingDocument
from energybus.admission import Admitted
from energybus.errors import CommandError, EnergyBusError, SourceError
from energybus.samples import Reading
from energybus.topics import to_kebab


class AcmeMapping(MappingDocument, frozen=True, kw_only=True):
    templates: dict[str, DeviceTemplate]


class AcmeOptions(Document, frozen=True, kw_only=True):
    """The ``[adapters.acme]`` table of a site configuration."""

    site: str = "acme"
    """The site of every device."""
    devices: dict[str, str] = {}
    """Device name (the topic's ``{device}``) -> its template in the mapping."""


class AcmePlan(Plan):
    def __init__(self, templates: dict[str, Template], rows: int) -> None:
        self.templates, self.rows = templates, rows


class _Message(msgspec.Struct):
    t: int
    values: dict[str, Any]


_decoder = msgspec.json.Decoder(_Message)


class AcmeAdapter(Adapter[AcmeOptions, AcmeMapping]):
    name: ClassVar[str] = "acme"
    options_type: ClassVar[type[Document]] = AcmeOptions
    mapping_type: ClassVar[type[MappingDocument]] = AcmeMapping
    sources = (SourceDeclaration(transport="mqtt", patterns=("acme/+/state",)),)
    command_filters = ()
    plan: AcmePlan

    @classmethod
    def default_mapping(cls) -> Path:
        return Path(__file__).with_name("acme.toml")

    @classmethod
    def compile(cls, document: AcmeMapping, compiler: Compiler) -> AcmePlan:
        return AcmePlan(*compile_templates(document.templates, compiler))

    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        try:
            device = topic.split("/")[1]
            template = self.plan.templates.get(self.options.devices.get(device, ""))
            if template is None:
                raise SourceError("unknown_target", "this device is not configured")
            message = decode(_decoder, payload)
            at = datetime.fromtimestamp(message.t / 1000, UTC)
            reading = Reading(self.options.site, template.entity_type, to_kebab(device), at)
            errors: list[SourceError] = []
            template.read(message.values, reading, errors)
            return Normalized.of([reading] if reading.values else [], errors, topic)
        except EnergyBusError as error:
            return Normalized(rejections=[Rejection.of(error, topic)])

    def format(self, command: Admitted, *, received_at: datetime) -> Any:
        # Never routed here (no command_filters); said plainly should anyone call it.
        raise CommandError(
            "not_commandable", "acme devices take no commands", topic=str(command.topic)
        )
