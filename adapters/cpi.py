"""The Voke / CPI plant adapter: signed telemetry, alarms, commands and their ACKs.

Topics (docs/adapters.md has the whole design, including the telemetry message, which the
platform's own documents leave out):
- ``cpi/{plantId}/telemetry``: one sub-device's signals; numeric signals map through
  the device template, bitmask signals give one boolean metric per bit.
- ``cpi/{plantId}/alarm``: a PLC alarm raised or cleared, as a boolean event metric.
- ``cpi/{plantId}/commands``: written, from a canonical ``set``, signed.
- ``cpi/{plantId}/commands/ack``: the plant's answer, correlated by ``cmdId``.

Every message from a plant with secrets must carry a valid ``sig`` (HMAC-SHA256, see
:mod:`energybus.adapters.signing`), a ``ts`` inside the replay window, and a signature
(or, for an ACK, a ``cmdId``) not seen before inside it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Final

import msgspec

from energybus.admission import Admitted
from energybus.errors import (
    EnergyBusError,
    SourceError,
)
from energybus.filters import canonical_filter
from energybus.messages import Message
from energybus.payloads import DECODE_ERRORS, explain
from energybus.samples import Reading
from energybus.topics import Topic

from .base import Adapter, Formatted, Normalized, Rejection, SourceDeclaration
from .mapping import CommandOptions, Compiler, Document, MappingDocument, Positive
from .plants import Plant, PlantMapping, PlantPlan, Plants, Target, ms, plant_site, unix_ms
from .signing import ReplayGuard, Signer

__all__ = [
    "CpiAdapter",
    "CpiMapping",
    "CpiOptions",
    "CpiPlant",
    "CpiTarget",
]


CpiMapping = PlantMapping
"""``mappings/cpi.toml``: device templates and alarm codes (``plants.PlantMapping``)."""


CpiTarget = Target
"""A sub-device of a plant, by its externalId (``energybus.adapters.plants.Target``)."""


class CpiPlant(Document, frozen=True, kw_only=True):
    """One plant, by its plantId (``[adapters.cpi.plants.<plantId>]``)."""

    site: str | None = None
    """Default: the options' ``site``, else the kebab-case plantId."""
    entity_id: str | None = None
    """The plant's own entity; default: the kebab-case plantId."""
    template: str = "plant"
    """The device template of the plant's own entity."""
    secrets: list[str] = []
    """Active HMAC secrets, newest first (use ``${VAR}``); empty: the plant does not sign."""
    targets: dict[str, CpiTarget] = {}
    """The plant's sub-devices by their externalId (a message's ``target``)."""

    def __repr__(self) -> str:
        shown = f"site={self.site!r}, secrets={len(self.secrets)}, targets={list(self.targets)}"
        return f"CpiPlant({shown})"  # the secrets counted, never shown


class CpiOptions(CommandOptions, frozen=True, kw_only=True):
    """The ``[adapters.cpi]`` section of a site configuration."""

    site: str | None = None
    """The default site of every plant; default: each plant's kebab-case plantId."""
    plants: dict[str, CpiPlant] = {}
    """The plants taken; a message from any other is rejected (``unknown_plant``)."""
    replay_window_s: Positive = 300.0
    """How far a message's ``ts`` may be from the receive time; a signed message seen
    before within it is a replay."""
    command_timeout_s: Positive = 30.0
    """A command without an ACK by then expires."""
    mapping: str | None = None
    """Another mapping file instead of the packaged ``cpi.toml``."""


class _Plant(Plant):
    def __init__(self, plant_id: str, site: str, signer: Signer | None, window_s: float):
        super().__init__(plant_id, site)
        self.signer = signer
        self.guard = ReplayGuard(window_s=window_s)


_decoder: Final = msgspec.json.Decoder()
_json: Final = msgspec.json.Encoder()


class CpiAdapter(Adapter[CpiOptions, CpiMapping]):
    name: ClassVar[str] = "cpi"
    options_type: ClassVar[type[Document]] = CpiOptions
    mapping_type: ClassVar[type[MappingDocument]] = CpiMapping
    sources = (
        SourceDeclaration(
            transport="mqtt",
            patterns=("cpi/+/telemetry", "cpi/+/alarm", "cpi/+/commands/ack"),
        ),
    )

    plan: PlantPlan

    def start(self) -> None:
        opts = self.options
        plan = self.plan
        self._plants: dict[str, _Plant] = {}
        self.devices = Plants(plan)
        metrics = self.devices.command_metrics()
        self.command_filters = tuple(canonical_filter("set", metric=m) for m in metrics)
        for plant_id, config in opts.plants.items():
            path = f"$.plants.{plant_id}"
            site = plant_site(plant_id, config.site, opts.site, path=path)
            signer = Signer(config.secrets) if config.secrets else None
            plant = _Plant(plant_id, site, signer, opts.replay_window_s)
            self.devices.add(
                plant,
                entity_id=config.entity_id,
                template=config.template,
                targets=config.targets,
                path=path,
            )
            self._plants[plant_id] = plant

    def knows_target(self, parsed: Topic) -> bool:
        return self.devices.knows(parsed)

    # Compiling ------------------------------------------------------------------------

    @classmethod
    def compile(cls, document: PlantMapping, compiler: Compiler) -> PlantPlan:
        return PlantPlan(document, compiler)

    # Translating ----------------------------------------------------------------------

    def site_of(self, topic: str, payload: bytes) -> str | None:
        parts = topic.split("/")
        plant = self._plants.get(parts[1]) if len(parts) > 2 else None
        return plant.site if plant is not None else None

    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        try:
            parts = topic.split("/")
            if parts[0] != "cpi" or len(parts) not in (3, 4):
                raise SourceError("unrouted", "not a topic the cpi adapter consumes")
            kind = "/".join(parts[2:])
            if kind not in ("telemetry", "alarm", "commands/ack"):
                raise SourceError("unrouted", "not a topic the cpi adapter consumes")
            plant = self._plants.get(parts[1])
            if plant is None:
                raise SourceError("unknown_plant", "this plant is not in the configuration")
            document = self._authentic(plant, payload, received_at)
            if kind == "telemetry":
                return self._telemetry(plant, document, topic)
            if kind == "alarm":
                device = plant.device_for(document, "target")
                observed = ms(document["ts"])
                return Normalized(readings=[self.devices.alarm(device, observed, document)])
            return self._ack(plant, document, received_at)
        except EnergyBusError as error:
            return Normalized(rejections=[Rejection.of(error, topic)])

    def _authentic(self, plant: _Plant, payload: bytes, received_at: datetime) -> dict[str, Any]:
        """The decoded message, once its signature, time and novelty are checked."""
        try:
            document = _decoder.decode(payload)
        except DECODE_ERRORS as exc:
            code, detail, _ = explain(exc)
            raise SourceError(code, detail) from None
        if type(document) is not dict:
            raise SourceError("wrong_type", "message must be a JSON object")
        if plant.signer is not None:
            plant.signer.verify(document)
        plant.guard.check_time(unix_ms(document), received_at)
        sig = document.get("sig")
        if plant.signer is not None and type(sig) is str:
            plant.guard.check_and_remember("sig:" + sig.lower(), received_at, "this signature")
        return document

    def _telemetry(self, plant: _Plant, document: dict[str, Any], topic: str) -> Normalized:
        device = plant.device_for(document, "target")
        values = document.get("values")
        if type(values) is not dict:
            raise SourceError("wrong_type", "values must be an object of signals", path="$.values")
        reading = Reading(plant.site, device.entity_type, device.entity_id, ms(document["ts"]))
        errors: list[SourceError] = []
        device.template.read(values, reading, errors)
        readings = [reading] if reading.values else []
        return Normalized.of(readings, errors, topic)

    def _ack(self, plant: _Plant, document: dict[str, Any], received_at: datetime) -> Normalized:
        command_id = document.get("cmdId")
        if type(command_id) is not str:
            raise SourceError("missing_field", "ACK has no cmdId", path="$.cmdId")
        status = document.get("status")
        if type(status) is not str:
            raise SourceError("missing_field", "ACK has no status", path="$.status")
        plant.guard.check_and_remember("cmd:" + command_id, received_at, "this cmdId")
        pending = self.commands.get(command_id)
        if pending is None or pending.target.partition("/")[0] != plant.id:
            raise SourceError(
                "unknown_command",
                "no command with this cmdId is waiting for an answer",
                path="$.cmdId",
            )
        ok = status.lower() == "ok"
        record = self.commands.acked(command_id, ok=ok, status=status, at=received_at)
        assert record is not None
        result = Normalized(commands=[record])
        if ok and record.value is not None:  # a record in the book was accepted: it has one
            confirmed = self.devices.confirmation(
                record.site,
                record.entity_type,
                record.entity_id,
                record.metric,
                record.value,
                ms(document["ts"]),
            )
            result.readings.append(confirmed)
        return result

    # Commands -------------------------------------------------------------------------

    def format(self, command: Admitted, *, received_at: datetime) -> Formatted:
        parsed = command.topic
        value = command.value
        device, action, payload = self.devices.command(parsed, value)
        command_id = self.new_id()
        plant = device.plant
        assert isinstance(plant, _Plant)
        body: dict[str, Any] = {
            "cmdId": command_id,
            "ts": int(received_at.timestamp() * 1000),
            "action": action.key,
        }
        if payload is not None:
            body["payload"] = payload
        if device.external_id is not None:
            body["target"] = device.external_id
        if plant.signer is not None:
            body["sig"] = plant.signer.sign(body)
        target = plant.id if device.external_id is None else f"{plant.id}/{device.external_id}"
        message = Message(f"cpi/{plant.id}/commands", _json.encode(body), 1, False)
        return self.command(
            parsed,
            value,
            command_id=command_id,
            target=target,
            action=action.key,
            payload=payload,
            received_at=received_at,
            messages=[message],
        )
