"""Plants and their sub-devices, as the plant platforms (CPI, Voke) describe them.

A plant platform names a plant and, inside it, sub-devices by their ``externalId``; the
site configuration says which device template each one uses and which bus entity it is.
Both the CPI adapter (MQTT) and the Voke adapter (AMQP) speak of plants this way, send
alarms the same way and take commands through the templates' actions, so that part of
their translation is here, once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from energybus.errors import CommandError, IdentifierError, MappingError, SourceError, TopicError
from energybus.render import SeriesSpec
from energybus.samples import Reading
from energybus.topics import EntityType, Topic, build_topic, to_kebab, to_snake

from .base import Plan
from .engine import Action, DeviceTemplate, Template, compile_templates
from .mapping import Compiler, Document, MappingDocument

__all__ = [
    "AlarmRow",
    "Alarms",
    "Device",
    "Plant",
    "PlantMapping",
    "PlantPlan",
    "Plants",
    "Target",
    "ms",
    "plant_site",
    "unix_ms",
]


class AlarmRow(Document, frozen=True, kw_only=True):
    metric: str
    description: str | None = None


class Alarms(Document, frozen=True, kw_only=True):
    codes: dict[str, AlarmRow] = {}


class PlantMapping(MappingDocument, frozen=True, kw_only=True):
    """A plant platform's mapping file: device templates, and alarm codes by name."""

    templates: dict[str, DeviceTemplate]
    alarms: Alarms = Alarms()


class PlantPlan(Plan):
    """A compiled :class:`PlantMapping`."""

    def __init__(self, document: PlantMapping, compiler: Compiler) -> None:
        self.templates, rows = compile_templates(document.templates, compiler)
        self.alarms: dict[str, str] = {}
        for code, alarm in document.alarms.codes.items():
            compiler.metric(alarm.metric, f"$.alarms.codes.{code}")
            self.alarms[code] = alarm.metric
        self.alarm_spec = SeriesSpec(
            profile="B", dedupe=False, max_interval_s=None, historian_mode="event"
        )
        """What every alarm series starts from (its code and severity go in ``meta``)."""
        self.rows = rows + len(self.alarms)


class Target(Document, frozen=True, kw_only=True):
    """A sub-device, by its externalId: its template and its bus entity."""

    template: str
    entity_id: str | None = None
    """Default: ``<plant entity>-<kebab-case externalId>``."""
    entity_type: EntityType | None = None
    """Default: the template's."""


class Device:
    __slots__ = ("entity_id", "entity_type", "external_id", "plant", "template")

    def __init__(
        self,
        plant: Plant,
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


class Plant:
    """A configured plant: its site, its own device and its sub-devices by externalId.
    Adapters subclass it with what they keep per plant (a signer, a replay guard)."""

    def __init__(self, plant_id: str, site: str) -> None:
        self.id = plant_id
        self.site = site
        self.device: Device | None = None
        self.targets: dict[str, Device] = {}

    def device_for(self, document: dict[str, Any], key: str) -> Device:
        """The device the message's field ``key`` names (absent or null: the plant)."""
        target = document.get(key)
        if target is None:
            assert self.device is not None
            return self.device
        if type(target) is not str:
            raise SourceError("wrong_type", f"{key} must be a string", path=f"$.{key}")
        device = self.targets.get(target)
        if device is None:
            raise SourceError(
                "unknown_target", f"this {key} is not configured for the plant", path=f"$.{key}"
            )
        return device


class Plants:
    """Every configured device of one adapter, by plant and by bus entity, and what the
    devices share: alarms and the commands their templates accept."""

    def __init__(self, plan: PlantPlan) -> None:
        self.templates = plan.templates
        self.alarms = plan.alarms
        self.alarm_spec = plan.alarm_spec
        self.by_entity: dict[tuple[str, str, str], Device] = {}
        self._alarm_specs: dict[tuple[str, str | None], SeriesSpec] = {}

    def command_metrics(self) -> list[str]:
        return sorted({m for t in self.templates.values() for m in t.actions})

    # Configuration --------------------------------------------------------------------

    def add(
        self,
        plant: Plant,
        *,
        entity_id: str | None,
        template: str,
        targets: dict[str, Target],
        path: str,
    ) -> None:
        """Register ``plant``'s own device and its targets; refuses a bad identifier, an
        unknown template and two devices on one bus entity, with the setting's path."""
        try:
            own = entity_id or to_kebab(plant.id)
            build_topic(plant.site, "source", own, "metric")
        except (IdentifierError, TopicError) as exc:
            raise MappingError(exc.code, exc.message, path=path) from None
        compiled = self._template(template, f"{path}.template")
        plant.device = self._device(plant, None, compiled, compiled.entity_type, own, path)
        for external_id, target in targets.items():
            at = f"{path}.targets.{external_id}"
            compiled = self._template(target.template, f"{at}.template")
            try:
                target_id = target.entity_id or f"{own}-{to_kebab(external_id)}"
                build_topic(plant.site, "source", target_id, "metric")
            except (IdentifierError, TopicError) as exc:
                raise MappingError(exc.code, exc.message, path=at) from None
            entity_type = target.entity_type or compiled.entity_type
            plant.targets[external_id] = self._device(
                plant, external_id, compiled, entity_type, target_id, at
            )

    def _template(self, name: str, path: str) -> Template:
        template = self.templates.get(name)
        if template is None:
            known = ", ".join(sorted(self.templates))
            raise MappingError(
                "unknown_template", f"no device template {name!r}; known: {known}", path=path
            )
        return template

    def _device(
        self,
        plant: Plant,
        external_id: str | None,
        template: Template,
        entity_type: EntityType,
        entity_id: str,
        path: str,
    ) -> Device:
        key = (plant.site, entity_type, entity_id)
        if key in self.by_entity:
            raise MappingError(
                "duplicate_entity",
                f"two devices would publish as {plant.site}/energy/{entity_type}/{entity_id}",
                path=path,
            )
        device = Device(plant, external_id, template, entity_type, entity_id)
        self.by_entity[key] = device
        return device

    # Translation ----------------------------------------------------------------------

    def alarm(self, device: Device, observed: datetime, document: dict[str, Any]) -> Reading:
        """An alarm raised or cleared: a boolean event metric named by its code (the
        mapping's name, else ``alarm_<snake_case code>``), code and severity in ``meta``."""
        code = document.get("code")
        if type(code) is not str or not code:
            raise SourceError("wrong_type", "code must be a non-empty string", path="$.code")
        active = document.get("active")
        if type(active) is not bool:
            raise SourceError("wrong_type", "active must be true or false", path="$.active")
        severity = document.get("severity")
        if severity is not None and type(severity) is not str:
            raise SourceError("wrong_type", "severity must be a string", path="$.severity")
        metric = self.alarms.get(code)
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
            spec = msgspec.structs.replace(self.alarm_spec, attributes=attributes)
            if len(self._alarm_specs) < _ALARM_SPECS:
                self._alarm_specs[(metric, severity)] = spec
        plant = device.plant
        value = (metric, active, None, spec)
        return Reading(plant.site, device.entity_type, device.entity_id, observed, "good", [value])

    def confirmation(
        self, site: str, entity_type: str, entity_id: str, metric: str, value: Any, at: datetime
    ) -> Reading:
        """A confirmed command's value on its series' ``value`` stream, with the spec of
        the template's action (so a confirmation does not change the series' ``meta``)."""
        device = self.by_entity[(site, entity_type, entity_id)]
        action = device.template.actions[metric]
        return Reading(
            site,
            device.entity_type,
            device.entity_id,
            at,
            "good",
            [(metric, value, action.unit, action.spec)],
        )

    def owns(self, series: Topic) -> bool:
        return (series.site, series.entity_type, series.entity_id) in self.by_entity

    def command(self, parsed: Topic, value: Any) -> tuple[Device, Action, dict[str, Any] | None]:
        """The device and action a canonical ``set`` asks for, and the action's payload
        in the device's unit (``None`` for a trigger); refuses what the templates do not
        allow."""
        topic = str(parsed)
        device = self.by_entity.get((parsed.site, parsed.entity_type, parsed.entity_id))
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
        if action.param is None:
            if value is not True:
                raise CommandError(
                    "invalid_value", f"action {action.key!r} is sent by a set of true", topic=topic
                )
            return device, action, None
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
        return device, action, {action.param: action.to_source(value)}


_ALARM_SPECS: Final = 4096
"""Distinct (metric, severity) specs kept; past that each alarm builds its own."""


def plant_site(plant_id: str, *settings: str | None, path: str) -> str:
    """A plant's site: the first of ``settings`` given (the plant's, then wider ones),
    else the kebab-case plantId."""
    for site in settings:
        if site:
            return site
    try:
        return to_kebab(plant_id)
    except IdentifierError as exc:
        raise MappingError(exc.code, exc.message, path=path) from None


def ms(ts: float, key: str = "ts") -> datetime:
    """Unix milliseconds as a time, or a refusal of the message's field ``key``."""
    try:
        return datetime.fromtimestamp(ts / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        raise SourceError(
            "bad_timestamp", f"{key} is not a time in Unix ms", path=f"$.{key}"
        ) from None


def unix_ms(document: dict[str, Any], key: str = "ts") -> float:
    """The field ``key`` checked to be a number of Unix milliseconds."""
    path = f"$.{key}"
    ts = document.get(key)
    if ts is None:
        raise SourceError("missing_field", f"message has no {key} (Unix ms)", path=path)
    if type(ts) is not int and type(ts) is not float:
        raise SourceError("wrong_type", f"{key} must be a number of Unix milliseconds", path=path)
    if not -1e15 < ts < 1e15:  # also keeps a huge integer from overflowing a float
        raise SourceError("bad_timestamp", f"{key} is not a time in Unix ms", path=path)
    return ts
