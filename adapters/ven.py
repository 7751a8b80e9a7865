"""The VEN adapter: a demand-response node's metering, ACKs and commands.

Topics (docs/adapters.md has the whole design):
- ``volttron/metering`` and, with ``telemetry = true``, ``ven/telemetry/{venId}``: the same
  metering message; a message seen on both is translated once.
- ``ven/ack/{venId}``: the answer to a command; it moves the command record and
  confirms the shed power actually achieved on ``value``.
- ``ven/loads/{venId}`` with ``loads = true``: a snapshot of the sheddable loads.
- Commands: a canonical ``set`` on ``load/{ven}/shed_power`` becomes an ``event`` (or, for
  0, a ``restore``) on ``ven/cmd/{venId}``.

The field-by-field knowledge is in ``mappings/ven.toml``; this module only knows the
message envelope (``venId``, ``timestamp``) and the command protocol.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Final

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
from energybus.render import SeriesSpec
from energybus.samples import Reading, observation
from energybus.topics import EntityType, Topic, build_topic, to_kebab
from energybus.units import Conversion

from .base import Adapter, Formatted, Normalized, Plan, Rejection, SourceDeclaration
from .engine import Entities, EntityContext, decode
from .mapping import (
    CommandOptions,
    Compiler,
    Document,
    EntityGroup,
    MappingDocument,
    Positive,
    SeriesRow,
)

__all__ = ["VenAdapter", "VenCommand", "VenEntry", "VenMapping", "VenOptions"]

METERING_TOPIC: Final = "volttron/metering"


class VenCommand(Document, frozen=True, kw_only=True):
    """The series a ``set`` commands, and the unit of ``shed_kw`` on the wire."""

    type: EntityType = "load"
    id: str = "{ven}"
    metric: str = "shed_power"
    unit: str = "kW"


class VenMapping(MappingDocument, frozen=True, kw_only=True):
    entity: list[EntityGroup]
    ignore: dict[str, str] = {}
    command: VenCommand = VenCommand()


class VenEntry(Document, frozen=True, kw_only=True):
    """One listed VEN; ``site`` overrides the default (the kebab-case venId)."""

    site: str | None = None
    """The VEN's site; default: the adapter's ``site``, else the kebab-case venId."""


class VenOptions(CommandOptions, frozen=True, kw_only=True):
    """The ``[adapters.ven]`` section of a site configuration."""

    site: str | None = None
    """One site for every VEN not listed with its own; default: each VEN's kebab-case id."""
    vens: dict[str, VenEntry] = {}
    """VENs by venId, each with its own site."""
    accept_unlisted: bool = True
    """With ``false``, a VEN not listed under ``vens`` is rejected (``unknown_ven``)."""
    max_unlisted: Annotated[int, msgspec.Meta(ge=0)] = 1000
    """VENs not listed under ``vens`` kept track of at most: a flood of invented venIds
    cannot grow the adapter's memory without bound (a VEN's records take up to about
    0.17 MB, its items' ids and series cached); past it a new one is refused
    (``too_many_series``)."""
    telemetry: bool = False
    """Also consume ``ven/telemetry/+`` (same payload as metering, translated once)."""
    loads: bool = False
    """Also consume ``ven/loads/+`` (load snapshots)."""
    command_timeout_s: Positive = 30.0
    """A command without an answer by then expires."""
    default_duration_s: Positive = 3600.0
    """Event duration when a ``set`` does not give ``duration_s``."""
    mapping: str | None = None
    """Another mapping file instead of the packaged ``ven.toml``."""


class VenPlan(Plan):
    def __init__(
        self,
        *,
        entities: Entities,
        command: VenCommand,
        command_unit: str | None,
        command_convert: Any,
        command_spec: SeriesSpec,
        command_range: tuple[float, float],
    ) -> None:
        self.entities = entities
        self.command_range = command_range
        """Decodes metering, telemetry and load snapshots: the latter is a subset."""
        self.command = command
        self.command_unit = command_unit
        self.command_convert = command_convert
        self.command_spec = command_spec
        self.to_source = Conversion(command.unit).inverse()
        """Canonical watts back to the VEN's kilowatts, exact for decimal input."""
        self.rows = entities.rows


class _Ack(msgspec.Struct):
    op: str
    status: str
    correlationId: str | None = None
    event_id: str | None = None
    actual_shed_kw: float | None = None
    ts: float | None = None


_ack_decoder: Final = msgspec.json.Decoder(_Ack)


class _Named(msgspec.Struct):
    venId: str


_named_decoder: Final = msgspec.json.Decoder(_Named)
"""Only the VEN's id of a metering message (the rest is skipped, not decoded)."""
_json: Final = msgspec.json.Encoder()
_OK_STATUSES: Final = frozenset({"accepted", "success", "ok", "pong"})
_RECENT: Final = 16  # timestamps remembered per VEN to spot the same message twice


class _Ven:
    """What the adapter knows of one VEN: its names, and the messages just seen."""

    __slots__ = ("command_entity", "context", "recent", "recent_set", "site", "source_id")

    def __init__(self, source_id: str, site: str, ven: str, plan: VenPlan) -> None:
        self.source_id = source_id
        self.site = site
        self.context: EntityContext = plan.entities.context(site, ven=ven)
        self.command_entity = plan.command.id.format(ven=ven)
        self.recent: deque[tuple[bool, float]] = deque()
        self.recent_set: set[tuple[bool, float]] = set()

    def seen(self, key: tuple[bool, float]) -> bool:
        """True for a message already translated (the same message on another topic).

        The key is ``(snapshot, timestamp)``: load snapshots share timestamps with
        metering without being the same message.
        """
        return key in self.recent_set

    def remember(self, key: tuple[bool, float]) -> None:
        self.recent.append(key)
        self.recent_set.add(key)
        if len(self.recent) > _RECENT:
            self.recent_set.discard(self.recent.popleft())


class VenAdapter(Adapter[VenOptions, VenMapping]):
    name: ClassVar[str] = "ven"
    options_type: ClassVar[type[Document]] = VenOptions
    mapping_type: ClassVar[type[MappingDocument]] = VenMapping

    plan: VenPlan

    def start(self) -> None:
        opts = self.options
        filters = [METERING_TOPIC, "ven/ack/+"]
        if opts.telemetry:
            filters.append("ven/telemetry/+")
        if opts.loads:
            filters.append("ven/loads/+")
        self.sources = (SourceDeclaration(transport="mqtt", patterns=tuple(filters)),)
        command = self.plan.command
        self.command_filters = (
            canonical_filter("set", entity_type=command.type, metric=command.metric),
        )
        self._vens: dict[str, _Ven] = {}
        self._unlisted = 0
        self._targets: dict[tuple[str, str], str] = {}
        for source_id in opts.vens:
            try:
                self._ven(source_id)
            except SourceError as error:  # a listed VEN that can never publish: say so now
                raise MappingError(error.code, error.message, path=f"$.vens.{source_id}") from None
        if opts.site is not None:
            try:
                build_topic(opts.site, "load", "entity", "metric")
            except TopicError as error:
                raise MappingError(error.code, error.message, path="$.site") from None

    # Compiling ------------------------------------------------------------------------

    @classmethod
    def compile(cls, document: VenMapping, compiler: Compiler) -> VenPlan:
        entities = Entities(
            document.entity,
            compiler,
            placeholders=("ven",),
            envelope={"venId": ("ven_id", str), "timestamp": ("timestamp", float | None)},
            required=("venId",),
            ignore=document.ignore,
            name="VenMetering",
        )
        command = document.command
        compiler.template(command.id, ("ven",), "$.command.id")
        # A confirmation is news even when it repeats the last value: never deduped.
        row = SeriesRow(metric=command.metric, unit=command.unit)
        checked = compiler.check(row, "$.command", unit=command.unit, dedupe=False)
        spec = checked.spec
        # The confirmation shares its series with metering's row for the same metric
        # (shedPowerKw): one series, one spec, or its meta would flip back and forth.
        for group in entities.root:
            for hot in group.hot:
                if (group.type, group.template, hot[0]) == (
                    command.type,
                    command.id,
                    command.metric,
                ):
                    spec = hot[3]
        conversion = checked.conversion
        return VenPlan(
            entities=entities,
            command=command,
            command_unit=conversion.unit if conversion is not None else None,
            command_convert=conversion.fast() if conversion is not None else None,
            command_spec=spec,
            command_range=(checked.lo, checked.hi),
        )

    # Translating ----------------------------------------------------------------------

    def site_of(self, topic: str, payload: bytes) -> str | None:
        if topic == METERING_TOPIC:
            try:
                source_id = _named_decoder.decode(payload).venId
            except (msgspec.DecodeError, UnicodeDecodeError):
                return None
        else:
            source_id = topic.rpartition("/")[2]
        try:
            return self._ven(source_id).site
        except EnergyBusError:
            return None  # refused by whichever member handles it

    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        try:
            if topic == METERING_TOPIC:
                return self._metering(payload, received_at, None, snapshot=False, topic=topic)
            kind, _, source_id = topic.rpartition("/")
            if kind == "ven/ack":
                return self._ack(source_id, payload, received_at)
            if kind == "ven/telemetry" and self.options.telemetry:
                return self._metering(payload, received_at, source_id, snapshot=False, topic=topic)
            if kind == "ven/loads" and self.options.loads:
                return self._metering(payload, received_at, source_id, snapshot=True, topic=topic)
            raise SourceError("unrouted", "not a topic the ven adapter consumes")
        except EnergyBusError as error:
            return Normalized(rejections=[Rejection.of(error, topic)])

    def _metering(
        self,
        payload: bytes,
        received_at: datetime,
        topic_ven: str | None,
        *,
        snapshot: bool,
        topic: str,
    ) -> Normalized:
        message = decode(self.plan.entities.decoder, payload)
        source_id: str = message.ven_id
        if topic_ven is not None and topic_ven != source_id:
            raise SourceError(
                "ven_mismatch", "venId differs from the VEN named in the topic", path="$.venId"
            )
        ven = self._ven(source_id)
        timestamp = message.timestamp
        seen_key = None
        if timestamp is not None:
            seen_key = (snapshot, timestamp)
            if ven.seen(seen_key):
                return Normalized(duplicate=True)
        observed, quality = observation(
            None if timestamp is None else _unix(timestamp, "$.timestamp"), received_at
        )
        errors: list[SourceError] = []
        readings = self.plan.entities.read(message, ven.context, observed, quality, errors)
        if seen_key is not None and not errors:
            # Only now, and only whole: a message with a refused value may come again, fixed.
            ven.remember(seen_key)
        return Normalized.of(readings, errors, topic)

    def _ack(self, source_id: str, payload: bytes, received_at: datetime) -> Normalized:
        ack = decode(_ack_decoder, payload)
        ven = self._ven(source_id)
        observed, quality = observation(
            None if ack.ts is None else _unix(ack.ts, "$.ts"), received_at
        )
        ok = ack.status.lower() in _OK_STATUSES
        result = Normalized()
        if ack.correlationId is not None:
            record = self.commands.acked(
                ack.correlationId, ok=ok, status=ack.status, at=received_at
            )
            if record is not None:
                result.commands.append(record)
        value: float | None = None
        if ok and ack.op == "event" and ack.actual_shed_kw is not None:
            value = ack.actual_shed_kw
        elif ok and ack.op == "restore":
            value = 0.0
        if value is not None:
            plan = self.plan
            convert = plan.command_convert
            confirmed = value if convert is None else convert(value)
            low, high = plan.command_range
            if not low <= confirmed <= high:
                raise SourceError(
                    "implausible_value",
                    f"{plan.command.metric} is outside its plausible range",
                    path="$.actual_shed_kw",
                )
            result.readings.append(
                Reading(
                    ven.site,
                    plan.command.type,
                    ven.command_entity,
                    observed,
                    quality,
                    [(plan.command.metric, confirmed, plan.command_unit, plan.command_spec)],
                )
            )
        return result

    def _ven(self, source_id: str) -> _Ven:
        ven = self._vens.get(source_id)
        if ven is not None:
            return ven
        opts = self.options
        entry = opts.vens.get(source_id)
        if entry is None and not opts.accept_unlisted:
            raise SourceError(
                "unknown_ven", "this VEN is not listed in the configuration", path="$.venId"
            )
        if entry is None and self._unlisted >= opts.max_unlisted:
            raise SourceError(
                "too_many_series",
                f"{self._unlisted} VENs not listed in the configuration are known already,"
                f" at most {opts.max_unlisted} are taken (adapters.ven.max_unlisted)",
                path="$.venId",
            )
        try:
            kebab = to_kebab(source_id)
        except IdentifierError as exc:
            raise SourceError("bad_identifier", exc.message, path="$.venId") from None
        site = (entry.site if entry is not None else None) or opts.site or kebab
        ven = _Ven(source_id, site, kebab, self.plan)
        try:
            # The VEN's own series must fit the bus, or nothing of it can be published:
            # one clear rejection then, not one refusal per value.
            command = self.plan.command
            build_topic(site, command.type, ven.command_entity, command.metric, "availability")
            for entity_id in ven.context.root_ids:
                build_topic(site, "load", entity_id, "metric")
        except TopicError as error:
            raise SourceError(error.code, error.message, path="$.venId") from None
        self._targets[(site, ven.command_entity)] = source_id
        self._vens[source_id] = ven
        if entry is None:
            self._unlisted += 1
        return ven

    # Commands -------------------------------------------------------------------------

    def knows_target(self, parsed: Topic) -> bool:
        return (parsed.site, parsed.entity_id) in self._targets

    def format(self, command: Admitted, *, received_at: datetime) -> Formatted:
        parsed = command.topic
        topic = str(parsed)
        series = self.plan.command
        if parsed.entity_type != series.type or parsed.metric != series.metric:
            raise CommandError(
                "not_commandable",
                f"the ven adapter takes commands on {series.type}/<ven>/{series.metric}/set",
                topic=topic,
            )
        source_id = self._targets.get((parsed.site, parsed.entity_id))
        if source_id is None:
            raise CommandError(
                "unknown_target", "no VEN is known under this site and entity", topic=topic
            )
        value, envelope = command.value, command.envelope
        if type(value) is bool or not 0 <= value <= self.plan.command_range[1]:
            raise CommandError(
                "invalid_value",
                f"shed power must be a number of watts from 0 to {self.plan.command_range[1]:g}",
                topic=topic,
            )
        command_id = self.new_id()
        body: dict[str, Any]
        if value == 0:
            action = "restore"
            body = {"op": "restore", "correlationId": command_id}
        else:
            action = "event"
            duration = self.options.default_duration_s
            event_id = f"evt-{command_id}"
            if envelope is not None:
                duration = envelope.duration_s or duration
                event_id = envelope.event_id or event_id
            seconds: float = int(duration) if float(duration).is_integer() else duration
            shed_kw = self.plan.to_source(value)
            body = {
                "op": "event",
                "event_id": event_id,
                "shed_kw": shed_kw,
                "duration_sec": seconds,
                "correlationId": command_id,
                "data": {"requestedReductionKw": shed_kw, "duration_s": seconds},
            }
        message = Message(f"ven/cmd/{source_id}", _json.encode(body), 1, False)
        return self.command(
            parsed,
            value,
            command_id=command_id,
            target=source_id,
            action=action,
            payload=body,
            received_at=received_at,
            messages=[message],
        )


def _unix(seconds: float, path: str) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise SourceError(
            "bad_timestamp", "timestamp is not a time in Unix seconds", path=path
        ) from None
