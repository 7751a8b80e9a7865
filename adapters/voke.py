"""The Voke ESM partner adapter: energybus as a partner on Voke's per-organisation queues.

Voke publishes to each organisation's queues on the ``vcp`` topic exchange, and reads
that organisation's command queue (docs/adapters.md, "the VCP wire format"):
- ``vcp.{org}.event.telemetry``: one device's values (realtime, or 1-minute meter
  readings), mapped through the device templates of ``mappings/voke.toml``.
- ``vcp.{org}.event.status``: ACK or NACK of a command, or a plant's mode change.
- ``vcp.{org}.event.alarm``: a PLC alarm raised or cleared, as a boolean event metric.
- ``vcp.{org}.event.execution``: how a command is getting on at the plant.
- ``vcp.{org}.command``: written, from a canonical ``set``, signed.

Every message is signed with the organisation's signing key (HMAC-SHA256 over RFC 8785
JSON, :mod:`energybus.adapters.signing`) and must come from the organisation whose queue
it is on. Which queues exist and how the worker connects to them is this adapter's
:attr:`sources`; the worker's AMQP source does the connecting.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, ClassVar, Final, Literal
from urllib.parse import urlsplit

import msgspec

from energybus.admission import Admitted
from energybus.commands import CommandRecord
from energybus.errors import EnergyBusError, MappingError, SourceError
from energybus.filters import canonical_filter
from energybus.messages import Message
from energybus.payloads import DECODE_ERRORS, explain
from energybus.samples import Reading
from energybus.topics import Topic

from .base import Adapter, AmqpEndpoint, Formatted, Normalized, Rejection, SourceDeclaration
from .mapping import CommandOptions, Compiler, Document, MappingDocument, Positive
from .plants import Device, Plant, PlantMapping, PlantPlan, Plants, Target, ms, plant_site, unix_ms
from .signing import ReplayGuard, Signer

__all__ = ["VokeAdapter", "VokeMapping", "VokeOptions", "VokeOrg", "VokePlant"]

EVENTS: Final = ("telemetry", "status", "alarm", "execution")
"""The event queues of an organisation, ``vcp.{org}.event.<kind>``."""
EXCHANGE: Final = "vcp"
VERSION: Final = 1
REMEMBERED_IDS: Final = 200_000
"""Message ids kept per organisation to recognise a replay (the oldest go first)."""

_SLUG: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_EXECUTION: Final = frozenset(
    {"RECEIVED", "DISPATCHED", "EXECUTING", "COMPLETED", "FAILED", "EXPIRED"}
)
_ENDED: Final[dict[str, Literal["rejected", "expired"]]] = {
    "FAILED": "rejected",
    "EXPIRED": "expired",
}


VokeMapping = PlantMapping
"""``mappings/voke.toml``: device templates and alarm codes (``plants.PlantMapping``)."""


class VokePlant(Document, frozen=True, kw_only=True):
    """One plant of the organisation, by its plantId."""

    site: str | None = None
    """Default: the organisation's ``site``, else the options' ``site``, else the
    kebab-case plantId."""
    entity_id: str | None = None
    """The plant's own entity; default: the kebab-case plantId."""
    template: str = "plant"
    """The device template of the plant's own entity."""
    targets: dict[str, Target] = {}
    """The plant's devices by externalId (the envelope's ``device``)."""


class VokeOrg(Document, frozen=True, kw_only=True):
    """One organisation's connection bundle and its plants (``[adapters.voke.orgs.<slug>]``)."""

    uri: str = "amqp://127.0.0.1:5672"
    """``amqps://host:port`` from the bundle (``amqp://`` on a trusted network); the
    credentials are ``api_key`` and the slug, never part of the URI."""
    vhost: str = "/"
    """The virtual host of the organisation's queues, as the bundle gives it."""
    api_key: str
    """The API key secret (``vcp:connect`` scope), the AMQP password: use ``${VAR}``."""
    signing_keys: list[str]
    """Active signing keys, newest first (use ``${VAR}``); commands are signed with the
    first, messages verify with any (key rotation)."""
    site: str | None = None
    """The default site of the organisation's plants; default: the adapter's ``site``."""
    prefetch: Positive = 500
    """Unacknowledged messages the broker may hand over per queue."""
    ca_file: str | None = None
    """CA bundle for ``amqps`` with a private CA; default: the system's trust store."""
    plants: dict[str, VokePlant] = {}
    """The plants taken, by plantId; a message from any other is rejected."""

    def __repr__(self) -> str:
        return f"VokeOrg(uri={self.uri!r}, vhost={self.vhost!r}, plants={list(self.plants)})"


class VokeOptions(CommandOptions, frozen=True, kw_only=True):
    """The ``[adapters.voke]`` section of a site configuration."""

    site: str | None = None
    """The default site of every plant; default: each plant's kebab-case plantId."""
    orgs: dict[str, VokeOrg] = {}
    """Organisations by slug (the AMQP username), one connection each."""
    replay_window_s: Positive = 300.0
    """How far a status (it confirms commands) may be from the receive time."""
    max_age_s: Positive = 86400.0
    """The oldest telemetry, alarm or execution update taken: they wait in a durable queue
    while energybus is away, and an outage must not cost them."""
    command_timeout_s: Positive = 30.0
    """A command without a final status by then expires."""
    mapping: str | None = None
    """Another mapping file instead of the packaged ``voke.toml``."""


class _Plant(Plant):
    def __init__(self, plant_id: str, site: str, org: _Org) -> None:
        super().__init__(plant_id, site)
        self.org = org


class _Org:
    __slots__ = ("fresh", "ids", "plants", "signer", "slug")

    def __init__(self, slug: str, signer: Signer, options: VokeOptions) -> None:
        self.slug = slug
        self.signer = signer
        self.plants: dict[str, _Plant] = {}
        self.fresh = ReplayGuard(window_s=options.replay_window_s)
        # A message is taken up to max_age_s after a ts up to replay_window_s ahead of
        # its receipt: its id is kept for as long.
        self.ids = ReplayGuard(
            window_s=options.replay_window_s,
            keep_s=options.max_age_s + options.replay_window_s,
            max_keys=REMEMBERED_IDS,
        )


_decoder: Final = msgspec.json.Decoder()
_json: Final = msgspec.json.Encoder()


class VokeAdapter(Adapter[VokeOptions, VokeMapping]):
    name: ClassVar[str] = "voke"
    options_type: ClassVar[type[Document]] = VokeOptions
    mapping_type: ClassVar[type[MappingDocument]] = VokeMapping

    plan: PlantPlan

    def start(self) -> None:
        opts = self.options
        plan = self.plan
        self.devices = Plants(plan)
        self.command_filters = tuple(
            canonical_filter("set", metric=m) for m in self.devices.command_metrics()
        )
        self._orgs: dict[str, _Org] = {}
        self._max_age_ms = opts.max_age_s * 1000
        self._future_ms = opts.replay_window_s * 1000
        declarations = []
        for slug, config in opts.orgs.items():
            path = f"$.orgs.{slug}"
            if not _SLUG.fullmatch(slug):
                raise MappingError(
                    "bad_identifier",
                    "an organisation slug is lowercase letters, digits, - and _",
                    path=path,
                )
            declarations.append(self._org(slug, config, path))
        self.sources = tuple(declarations)

    def _org(self, slug: str, config: VokeOrg, path: str) -> SourceDeclaration:
        try:
            parts = urlsplit(config.uri)
            port = parts.port  # a port that is no number: raised here, not at connecting
        except ValueError:
            port = -1
        if port == -1 or parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise MappingError(
                "invalid_value", "uri is amqps://host:port (or amqp://)", path=f"{path}.uri"
            )
        if parts.username or parts.password or parts.path not in ("", "/"):
            raise MappingError(
                "invalid_value",
                "uri carries no credentials and no vhost: they are api_key and vhost",
                path=f"{path}.uri",
            )
        if not config.api_key:
            raise MappingError("missing_field", "api_key is empty", path=f"{path}.api_key")
        if not config.signing_keys or not all(config.signing_keys):
            raise MappingError(
                "missing_field", "at least one non-empty signing key", path=f"{path}.signing_keys"
            )
        org = _Org(slug, Signer(config.signing_keys), self.options)
        for plant_id, plant_config in config.plants.items():
            at = f"{path}.plants.{plant_id}"
            site = plant_site(plant_id, plant_config.site, config.site, self.options.site, path=at)
            plant = _Plant(plant_id, site, org)
            self.devices.add(
                plant,
                entity_id=plant_config.entity_id,
                template=plant_config.template,
                targets=plant_config.targets,
                path=at,
            )
            org.plants[plant_id] = plant
        self._orgs[slug] = org
        endpoint = AmqpEndpoint(
            name=f"voke org {slug}",
            uri=config.uri,
            vhost=config.vhost,
            username=slug,
            password=config.api_key,
            prefetch=int(config.prefetch),
            ca_file=config.ca_file,
            exchange=EXCHANGE,
            missing_queue=(
                f"Voke has no such queue for org {slug}: enable Voke ESM (or trading) for"
                f" the organisation in Voke, which creates its vcp.{slug}.* queues"
            ),
        )
        return SourceDeclaration(
            transport="amqp",
            patterns=tuple(f"vcp.{slug}.event.{kind}" for kind in EVENTS),
            endpoint=endpoint,
            publishes=(f"vcp.{slug}.command",),
        )

    def knows_target(self, parsed: Topic) -> bool:
        return self.devices.knows(parsed)

    def connected_sites(self) -> list[tuple[str, str, str]]:
        return [
            (f"plant {plant.id}", f"$.orgs.{org.slug}.plants.{plant.id}", plant.site)
            for org in self._orgs.values()
            for plant in org.plants.values()
        ]

    # Compiling ------------------------------------------------------------------------

    @classmethod
    def compile(cls, document: PlantMapping, compiler: Compiler) -> PlantPlan:
        return PlantPlan(document, compiler)

    # Translating ----------------------------------------------------------------------

    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        try:
            parts = topic.split(".")
            if len(parts) != 4 or parts[0] != "vcp" or parts[2] != "event":
                raise SourceError("unrouted", "not a queue the voke adapter consumes")
            kind = parts[3]
            if kind not in EVENTS:
                raise SourceError("unrouted", "not a queue the voke adapter consumes")
            org = self._orgs.get(parts[1])
            if org is None:
                raise SourceError(
                    "unknown_org", "this organisation is not in the configuration (orgs)"
                )
            document = self._authentic(org, kind, payload, received_at)
            plant_id = document.get("plant")
            plant = org.plants.get(plant_id) if type(plant_id) is str else None
            if plant is None:
                raise SourceError(
                    "unknown_plant", "this plant is not in the configuration", path="$.plant"
                )
            if kind == "telemetry":
                return self._telemetry(plant, document, topic)
            if kind == "alarm":
                device = plant.device_for(document, "device")
                alarm = self.devices.alarm(device, ms(document["ts"]), document)
                return Normalized(readings=[alarm])
            if kind == "status":
                return self._status(org, plant, document, topic, received_at)
            return self._execution(org, plant, document)
        except EnergyBusError as error:
            return Normalized(rejections=[Rejection.of(error, topic)])

    def _authentic(
        self, org: _Org, kind: str, payload: bytes, received_at: datetime
    ) -> dict[str, Any]:
        """The decoded envelope, once its version, type, signature, organisation, time and
        novelty are checked."""
        try:
            document = _decoder.decode(payload)
        except DECODE_ERRORS as exc:
            code, detail, _ = explain(exc)
            raise SourceError(code, detail) from None
        if type(document) is not dict:
            raise SourceError("wrong_type", "message must be a JSON object")
        version = document.get("v")
        if version != VERSION or type(version) is not int:
            raise SourceError(
                "unsupported_version",
                f"this is VCP version {VERSION}; the message says {_shown(version)}",
                path="$.v",
            )
        if document.get("type") != kind:
            raise SourceError(
                "wrong_queue",
                f"a {_shown(document.get('type'))} message on the {kind} queue",
                path="$.type",
            )
        org.signer.verify(document)
        if document.get("org") != org.slug:
            raise SourceError(
                "org_mismatch",
                "the message names another organisation than the queue's",
                path="$.org",
            )
        ts = unix_ms(document)
        if kind == "status" and document.get("event") is None:
            # An ACK or NACK confirms a command: as fresh as a command, or not taken.
            org.fresh.check_time(ts, received_at)
        else:
            now_ms = received_at.timestamp() * 1000
            if now_ms - ts > self._max_age_ms or ts - now_ms > self._future_ms:
                raise SourceError(
                    "expired",
                    f"ts is {abs(now_ms - ts) / 1000:.0f} s from the receive time; "
                    f"{kind} is taken up to {self.options.max_age_s:g} s old and "
                    f"{self.options.replay_window_s:g} s ahead",
                    path="$.ts",
                )
        message_id = document.get("id")
        if type(message_id) is not str or not message_id:
            raise SourceError("missing_field", "message has no id", path="$.id")
        org.ids.check_and_remember(message_id, received_at, "this message id")
        return document

    def _telemetry(self, plant: Plant, document: dict[str, Any], topic: str) -> Normalized:
        kind = document.get("kind")
        if kind != "realtime" and kind != "meter":
            raise SourceError("wrong_type", "kind is realtime or meter", path="$.kind")
        device = plant.device_for(document, "device")
        values = document.get("values")
        if type(values) is not dict:
            raise SourceError("wrong_type", "values must be an object of fields", path="$.values")
        return _read(device, document, values, "$.values", topic)

    def _status(
        self,
        org: _Org,
        plant: Plant,
        document: dict[str, Any],
        topic: str,
        received_at: datetime,
    ) -> Normalized:
        event = document.get("event")
        if event is not None:
            if event != "mode_change":
                raise SourceError("unknown_event", "a status event other than mode_change")
            device = plant.device_for(document, "device")
            mode = document.get("mode")
            if type(mode) is not str:
                raise SourceError("wrong_type", "mode must be a string", path="$.mode")
            return _read(device, document, {"mode": mode}, "$", topic)
        record, command_id = self._pending(org, plant, document)
        status = document.get("status")
        if status != "ACK" and status != "NACK":
            raise SourceError("wrong_type", "status is ACK or NACK", path="$.status")
        reason = document.get("reason")
        if reason is not None and type(reason) is not str:
            raise SourceError("wrong_type", "reason must be a string", path="$.reason")
        ok = status == "ACK"
        moved = self.commands.acked(command_id, ok=ok, status=status, at=received_at, reason=reason)
        assert moved is not None
        result = Normalized(commands=[moved])
        if ok and record.value is not None:
            result.readings.append(
                self.devices.confirmation(
                    record.site,
                    record.entity_type,
                    record.entity_id,
                    record.metric,
                    record.value,
                    ms(document["ts"]),
                )
            )
        return result

    def _execution(self, org: _Org, plant: Plant, document: dict[str, Any]) -> Normalized:
        state = document.get("state")
        if type(state) is not str or state not in _EXECUTION:
            raise SourceError(
                "wrong_type", f"state is one of {', '.join(sorted(_EXECUTION))}", path="$.state"
            )
        command_id = document.get("cmdId")
        if type(command_id) is not str:
            raise SourceError("missing_field", "execution update has no cmdId", path="$.cmdId")
        pending = self.commands.get(command_id)
        if pending is None or not _sent_to(pending, org, plant):
            # Progress of a command that already has its outcome (COMPLETED after the
            # ACK): the outcome stands, and there is nothing to tell.
            return Normalized()
        reason = document.get("reason")
        ended = _ENDED.get(state)
        if ended is not None:
            because = f"the source reported {state}" + (
                f": {reason}" if type(reason) is str and reason else ""
            )
            record = self.commands.end(command_id, ended, because)
        else:
            record = self.commands.progress(command_id, state)
        assert record is not None
        return Normalized(commands=[record])

    def _pending(
        self, org: _Org, plant: Plant, document: dict[str, Any]
    ) -> tuple[CommandRecord, str]:
        command_id = document.get("cmdId")
        if type(command_id) is not str:
            raise SourceError("missing_field", "status has no cmdId", path="$.cmdId")
        record = self.commands.get(command_id)
        if record is None or not _sent_to(record, org, plant):
            raise SourceError(
                "unknown_command",
                "no command with this cmdId is waiting for an answer",
                path="$.cmdId",
            )
        return record, command_id

    # Commands -------------------------------------------------------------------------

    def format(self, command: Admitted, *, received_at: datetime) -> Formatted:
        parsed = command.topic
        value = command.value
        device, action, payload = self.devices.command(parsed, value)
        plant = device.plant
        assert isinstance(plant, _Plant)
        org = plant.org
        command_id = self.new_id()
        expires = received_at + timedelta(seconds=self.options.command_timeout_s)
        body: dict[str, Any] = {
            "v": VERSION,
            "type": "command",
            "id": command_id,
            "org": org.slug,
            "plant": plant.id,
            "device": device.external_id,
            "ts": int(received_at.timestamp() * 1000),
            "cmdId": command_id,
            "action": action.key,
            "payload": payload,
            "expires_at": int(expires.timestamp() * 1000),
        }
        body["sig"] = org.signer.sign(body)
        target = f"{org.slug}/{plant.id}"
        if device.external_id is not None:
            target += f"/{device.external_id}"
        message = Message(f"vcp.{org.slug}.command", _json.encode(body), 1, False)
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


def _read(
    device: Device, document: dict[str, Any], values: dict[str, Any], path: str, topic: str
) -> Normalized:
    """``values`` through the device's template, observed at the message's ``ts``. Voke's
    fields are a published list: one the template lacks is refused alone (dead-lettered
    with its path, so the mapping can be given it), the rest published."""
    plant = device.plant
    reading = Reading(plant.site, device.entity_type, device.entity_id, ms(document["ts"]))
    errors: list[SourceError] = []
    device.template.read(values, reading, errors, path, refuse_unknown=True)
    return Normalized.of([reading] if reading.values else [], errors, topic)


def _sent_to(record: CommandRecord, org: _Org, plant: Plant) -> bool:
    """Whether ``record`` is a command to ``plant`` of ``org`` (its target is
    ``org/plant[/device]``): one plant's messages cannot answer another's commands."""
    parts = record.target.split("/")
    return len(parts) >= 2 and parts[0] == org.slug and parts[1] == plant.id


def _shown(value: Any) -> str:
    """A field's value for an error message: short, and only if it is a plain token."""
    if (type(value) is int and abs(value) < 1000) or (
        type(value) is str and len(value) <= 20 and value.isidentifier()
    ):
        return repr(value)
    return "something else"
