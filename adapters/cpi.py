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

from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import msgspec

from energybus.admission import Admitted
from energybus.errors import (
    CommandError,
    EnergyBusError,
    IdentifierError,
    MappingError,
    SourceError,
    TopicError,
)
from energybus.filters import canonical_filter
from energybus.messages import Message
from energybus.payloads import DECODE_ERRORS, explain
from energybus.render import SeriesSpec
from energybus.samples import Reading
from energybus.topics import EntityType, build_topic, to_kebab, to_snake

from .base import Adapter, Formatted, Normalized, Plan, Rejection, SourceDeclaration
from .engine import DeviceTemplate, Template, compile_templates
from .mapping import CommandOptions, Compiler, Document, MappingDocument, Positive
from .signing import ReplayGuard, Signer

__all__ = [
    "CpiAdapter",
    "CpiMapping",
    "CpiOptions",
    "CpiPlant",
    "CpiTarget",
]


class AlarmRow(Document, frozen=True, kw_only=True):
    metric: str
    description: str | None = None


class Alarms(Document, frozen=True, kw_only=True):
    codes: dict[str, AlarmRow] = {}


class CpiMapping(MappingDocument, frozen=True, kw_only=True):
    templates: dict[str, DeviceTemplate]
    alarms: Alarms = Alarms()


class CpiTarget(Document, frozen=True, kw_only=True):
    """A sub-device, by its externalId: its template and its bus entity."""

    template: str
    entity_id: str | None = None
    """Default: ``<plant entity>-<kebab-case externalId>``."""
    entity_type: EntityType | None = None
    """Default: the template's."""


class CpiPlant(Document, frozen=True, kw_only=True):
    site: str | None = None
    """Default: the options' ``site``, else the kebab-case plantId."""
    entity_id: str | None = None
    """The plant's own entity; default: the kebab-case plantId."""
    template: str = "plant"
    secrets: list[str] = []
    """Active HMAC secrets, newest first (use ``${VAR}``); empty: the plant does not sign."""
    targets: dict[str, CpiTarget] = {}


class CpiOptions(CommandOptions, frozen=True, kw_only=True):
    """The ``[adapters.cpi]`` section of a site configuration."""

    site: str | None = None
    plants: dict[str, CpiPlant] = {}
    replay_window_s: Positive = 300.0
    command_timeout_s: Positive = 30.0
    mapping: str | None = None


class CpiPlan(Plan):
    def __init__(
        self,
        templates: dict[str, Template],
        alarms: dict[str, str],
        alarm_spec: SeriesSpec,
        rows: int,
    ) -> None:
        self.templates = templates
        self.alarms = alarms
        self.alarm_spec = alarm_spec
        self.rows = rows


class _Device:
    __slots__ = ("entity_id", "entity_type", "external_id", "plant", "template")

    def __init__(
        self,
        plant: _Plant,
        external_id: str | None,
        template: Template,
        entity_type: EntityType,
        entity_id: str,
    ) -> None:
        self.plant = plant
        self.external_id = external_id
        self.template = template
        self.entity_type = entity_type
        self.entity_id = entity_id


class _Plant:
    __slots__ = ("device", "guard", "id", "signer", "site", "targets")

    def __init__(self, plant_id: str, site: str, signer: Signer | None, window_s: float):
        self.id = plant_id
        self.site = site
        self.signer = signer
        self.guard = ReplayGuard(window_s=window_s)
        self.device: _Device | None = None
        self.targets: dict[str, _Device] = {}


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

    plan: CpiPlan

    def start(self) -> None:
        opts = self.options
        self._plants: dict[str, _Plant] = {}
        self._devices: dict[tuple[str, str, str], _Device] = {}
        self._alarm_specs: dict[tuple[str, str | None], SeriesSpec] = {}
        metrics = sorted({m for t in self.plan.templates.values() for m in t.actions})
        self.command_filters = tuple(canonical_filter("set", metric=m) for m in metrics)
        for plant_id, plant in opts.plants.items():
            self._add_plant(plant_id, plant)

    def _add_plant(self, plant_id: str, config: CpiPlant) -> None:
        path = f"$.plants.{plant_id}"
        try:
            kebab = to_kebab(plant_id)
            site = config.site or self.options.site or kebab
            entity_id = config.entity_id or kebab
            build_topic(site, "source", entity_id, "metric")
        except (IdentifierError, TopicError) as exc:
            raise MappingError(exc.code, exc.message, path=path) from None
        signer = Signer(config.secrets) if config.secrets else None
        plant = _Plant(plant_id, site, signer, self.options.replay_window_s)
        template = self._template(config.template, f"{path}.template")
        plant.device = self._device(plant, None, template, template.entity_type, entity_id)
        for external_id, target in config.targets.items():
            at = f"{path}.targets.{external_id}"
            template = self._template(target.template, f"{at}.template")
            try:
                target_id = target.entity_id or f"{entity_id}-{to_kebab(external_id)}"
                build_topic(site, "source", target_id, "metric")
            except (IdentifierError, TopicError) as exc:
                raise MappingError(exc.code, exc.message, path=at) from None
            entity_type = target.entity_type or template.entity_type
            plant.targets[external_id] = self._device(
                plant, external_id, template, entity_type, target_id
            )
        self._plants[plant_id] = plant

    def _template(self, name: str, path: str) -> Template:
        template = self.plan.templates.get(name)
        if template is None:
            known = ", ".join(sorted(self.plan.templates))
            raise MappingError(
                "unknown_template", f"no device template {name!r}; known: {known}", path=path
            )
        return template

    def _device(
        self,
        plant: _Plant,
        external_id: str | None,
        template: Template,
        entity_type: EntityType,
        entity_id: str,
    ) -> _Device:
        key = (plant.site, entity_type, entity_id)
        if key in self._devices:
            raise MappingError(
                "duplicate_entity",
                f"two devices would publish as {plant.site}/energy/{entity_type}/{entity_id}",
                path=f"$.plants.{plant.id}",
            )
        device = _Device(plant, external_id, template, entity_type, entity_id)
        self._devices[key] = device
        return device

    # Compiling ------------------------------------------------------------------------

    @classmethod
    def compile(cls, document: CpiMapping, compiler: Compiler) -> CpiPlan:
        templates, rows = compile_templates(document.templates, compiler)
        alarms = {}
        for code, alarm in document.alarms.codes.items():
            compiler.metric(alarm.metric, f"$.alarms.codes.{code}")
            alarms[code] = alarm.metric
            rows += 1
        alarm_spec = SeriesSpec(
            profile="B", dedupe=False, max_interval_s=None, historian_mode="event"
        )
        return CpiPlan(templates, alarms, alarm_spec, rows)

    # Translating ----------------------------------------------------------------------

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
                return self._alarm(plant, document)
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
        ts = document.get("ts")
        if ts is None:
            raise SourceError("missing_field", "message has no ts (Unix ms)", path="$.ts")
        if type(ts) is not int and type(ts) is not float:
            raise SourceError("wrong_type", "ts must be a number of Unix milliseconds", path="$.ts")
        if not -1e15 < ts < 1e15:  # also keeps a huge integer from overflowing a float
            raise SourceError("bad_timestamp", "ts is not a time in Unix ms", path="$.ts")
        plant.guard.check_time(ts, received_at)
        sig = document.get("sig")
        if plant.signer is not None and type(sig) is str:
            plant.guard.check_and_remember("sig:" + sig.lower(), received_at, "this signature")
        return document

    def _device_for(self, plant: _Plant, document: dict[str, Any]) -> _Device:
        target = document.get("target")
        if target is None:
            assert plant.device is not None
            return plant.device
        if type(target) is not str:
            raise SourceError("wrong_type", "target must be a string", path="$.target")
        device = plant.targets.get(target)
        if device is None:
            raise SourceError(
                "unknown_target", "this target is not configured for the plant", path="$.target"
            )
        return device

    def _telemetry(self, plant: _Plant, document: dict[str, Any], topic: str) -> Normalized:
        device = self._device_for(plant, document)
        values = document.get("values")
        if type(values) is not dict:
            raise SourceError("wrong_type", "values must be an object of signals", path="$.values")
        reading = Reading(plant.site, device.entity_type, device.entity_id, _ms(document["ts"]))
        errors: list[SourceError] = []
        device.template.read(values, reading, errors)
        readings = [reading] if reading.values else []
        return Normalized.of(readings, errors, topic)

    def _alarm(self, plant: _Plant, document: dict[str, Any]) -> Normalized:
        device = self._device_for(plant, document)
        code = document.get("code")
        if type(code) is not str or not code:
            raise SourceError("wrong_type", "code must be a non-empty string", path="$.code")
        active = document.get("active")
        if type(active) is not bool:
            raise SourceError("wrong_type", "active must be true or false", path="$.active")
        severity = document.get("severity")
        if severity is not None and type(severity) is not str:
            raise SourceError("wrong_type", "severity must be a string", path="$.severity")
        metric = self.plan.alarms.get(code)
        if metric is None:
            try:
                metric = "alarm_" + to_snake(code)
            except IdentifierError as exc:
                raise SourceError("bad_identifier", exc.message, path="$.code") from None
        spec = self._alarm_specs.get((metric, severity))
        if spec is None:
            attributes: dict[str, str | int | float | bool] = {"code": code}
            if severity is not None:
                attributes["severity"] = severity
            spec = msgspec.structs.replace(self.plan.alarm_spec, attributes=attributes)
            if len(self._alarm_specs) < 4096:
                self._alarm_specs[(metric, severity)] = spec
        reading = Reading(
            plant.site,
            device.entity_type,
            device.entity_id,
            _ms(document["ts"]),
            "good",
            [(metric, active, None, spec)],
        )
        return Normalized(readings=[reading])

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
            device = self._devices[(record.site, record.entity_type, record.entity_id)]
            action = device.template.actions[record.metric]
            value = (record.metric, record.value, action.unit, action.spec)
            result.readings.append(
                Reading(
                    record.site,
                    device.entity_type,
                    device.entity_id,
                    _ms(document["ts"]),
                    "good",
                    [value],
                )
            )
        return result

    # Commands -------------------------------------------------------------------------

    def format(self, command: Admitted, *, received_at: datetime) -> Formatted:
        parsed = command.topic
        topic = str(parsed)
        device = self._devices.get((parsed.site, parsed.entity_type, parsed.entity_id))
        if parsed.stream != "set" or device is None:
            raise CommandError(
                "unknown_target",
                "no plant device is known under this site and entity",
                topic=topic,
            )
        action = device.template.actions.get(parsed.metric)
        if action is None:
            raise CommandError(
                "action_not_in_template",
                f"template {device.template.name!r} declares no action for {parsed.metric!r}",
                topic=topic,
            )
        value = command.value
        command_id = self.new_id()
        plant = device.plant
        body: dict[str, Any] = {
            "cmdId": command_id,
            "ts": int(received_at.timestamp() * 1000),
            "action": action.key,
        }
        if action.param is not None:
            if type(value) is bool:
                raise CommandError(
                    "invalid_value", f"action {action.key!r} takes a number", topic=topic
                )
            if not action.low <= value <= action.high:
                raise CommandError(
                    "invalid_value",
                    f"action {action.key!r} takes values in [{action.low:g}, {action.high:g}]",
                    topic=topic,
                )
            assert action.to_source is not None
            body["payload"] = {action.param: action.to_source(value)}
        elif value is not True:
            raise CommandError(
                "invalid_value", f"action {action.key!r} is sent by a set of true", topic=topic
            )
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
            payload=body.get("payload"),
            received_at=received_at,
            messages=[message],
        )


def _ms(ts: float) -> datetime:
    try:
        return datetime.fromtimestamp(ts / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        raise SourceError("bad_timestamp", "ts is not a time in Unix ms", path="$.ts") from None
