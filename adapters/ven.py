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

import operator
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import msgspec

from energybus.errors import CommandError, EnergyBusError, IdentifierError, SourceError
from energybus.filters import canonical_filter
from energybus.messages import Message
from energybus.payloads import Scalar, SetEnvelope, decode_set, explain
from energybus.render import SeriesSpec
from energybus.samples import Sample, observation
from energybus.topics import EntityType, parse_topic, to_kebab
from energybus.units import Conversion

from .base import Adapter, Formatted, Normalized, Plan, Rejection
from .commands import CommandRecord
from .mapping import (
    CompiledAttribute,
    CompiledRow,
    Document,
    EntityGroup,
    Located,
    MappingDocument,
    Positive,
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


class VenOptions(Document, frozen=True, kw_only=True):
    """The ``[adapters.ven]`` section of a site configuration."""

    site: str | None = None
    """One site for every VEN not listed with its own; default: each VEN's kebab-case id."""
    vens: dict[str, VenEntry] = {}
    accept_unlisted: bool = True
    """With ``false``, a VEN not listed under ``vens`` is rejected (``unknown_ven``)."""
    telemetry: bool = False
    """Also consume ``ven/telemetry/+`` (same payload as metering, translated once)."""
    loads: bool = False
    """Also consume ``ven/loads/+`` (load snapshots)."""
    command_timeout_s: Positive = 30.0
    default_duration_s: Positive = 3600.0
    """Event duration when a ``set`` does not give ``duration_s``."""
    mapping: str | None = None
    """Another mapping file instead of the packaged ``ven.toml``."""


class _Group:
    """One compiled :class:`EntityGroup`."""

    __slots__ = (
        "attributes",
        "cache",
        "each",
        "get",
        "key",
        "nfields",
        "rows",
        "rows_hot",
        "template",
        "type",
    )

    def __init__(
        self,
        group: EntityGroup,
        rows: list[CompiledRow],
        attributes: list[CompiledAttribute],
        attrs: list[str],
    ) -> None:
        self.type: EntityType = group.type
        self.template = group.id
        self.each = group.each
        self.key = group.key
        self.rows = rows
        self.rows_hot = [(row.metric, row.convert, row.unit, row.spec) for row in rows]
        """Per row what the hot loop reads, spec included; see :meth:`hot`."""
        self.attributes = attributes
        self.nfields = len(rows)
        self.cache: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        """``rows_hot`` with meta attributes in the specs, by the static fields' values."""
        getter = operator.attrgetter(*attrs)
        # attrgetter gives a bare value for one name; the hot path wants a tuple always.
        self.get: Callable[[Any], tuple[Any, ...]] = (
            getter if len(attrs) > 1 else (lambda obj: (getter(obj),))
        )


class VenPlan(Plan):
    def __init__(
        self,
        *,
        root: list[_Group],
        arrays: list[tuple[str, str, str, list[_Group]]],
        metering: msgspec.json.Decoder[Any],
        command: VenCommand,
        command_row: CompiledRow,
        rows: int,
    ) -> None:
        self.root = root
        self.arrays = arrays
        """``(source name, attribute on the message, attribute of the item key, groups)``."""
        self.metering = metering
        """Decodes metering, telemetry and load snapshots: the latter is a subset."""
        self.command = command
        self.command_row = command_row
        self.to_source = Conversion(command.unit).inverse()
        """Canonical watts back to the VEN's kilowatts, exact for decimal input."""
        self.rows = rows


class _Ack(msgspec.Struct):
    op: str
    status: str
    correlationId: str | None = None
    event_id: str | None = None
    actual_shed_kw: float | None = None
    ts: float | None = None


_ack_decoder: Final = msgspec.json.Decoder(_Ack)
_json: Final = msgspec.json.Encoder()
_OK_STATUSES: Final = frozenset({"accepted", "success", "ok", "pong"})
_RECENT: Final = 16  # timestamps remembered per VEN to spot the same message twice


class _Ven:
    """What the adapter knows of one VEN: its names, and the messages just seen."""

    __slots__ = (
        "command_entity",
        "item_ids",
        "recent",
        "recent_set",
        "root_ids",
        "site",
        "source_id",
        "ven",
    )

    def __init__(self, source_id: str, site: str, ven: str, plan: VenPlan) -> None:
        self.source_id = source_id
        self.site = site
        self.ven = ven
        self.root_ids = [group.template.format(ven=ven) for group in plan.root]
        self.command_entity = plan.command.id.format(ven=ven)
        self.item_ids: list[dict[object, str]] = [{} for _ in plan.arrays]
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
        self.source_filters = tuple(filters)
        command = self.plan.command
        self.command_filters = (
            canonical_filter("set", entity_type=command.type, metric=command.metric),
        )
        self._vens: dict[str, _Ven] = {}
        self._targets: dict[tuple[str, str], str] = {}
        for source_id in opts.vens:
            self._ven(source_id)

    # Compiling ------------------------------------------------------------------------

    @classmethod
    def compile(cls, document: VenMapping, where: Located) -> VenPlan:
        root: list[_Group] = []
        arrays: dict[str, tuple[str, list[_Group]]] = {}
        root_fields: dict[str, tuple[str, Any]] = {}
        item_fields: dict[str, dict[str, tuple[str, Any]]] = {}
        rows = 0
        for gi, group in enumerate(document.entity):
            path = f"$.entity[{gi}]"
            if (group.each is None) != (group.key is None):
                raise where.error("each_needs_key", "'each' and 'key' go together", path)
            placeholders = ("ven",) if group.each is None else ("ven", "id")
            where.template(group.id, placeholders, f"{path}.id")
            fields = root_fields if group.each is None else item_fields.setdefault(group.each, {})
            compiled: list[CompiledRow] = []
            attrs: list[str] = []
            for name, row in group.fields.items():
                compiled_row = where.row(
                    row, document.defaults, f"{path}.fields.{name}", entity_type=group.type
                )
                kind = bool if compiled_row.value_type == "boolean" else float
                attrs.append(_declare(fields, name, kind, where, f"{path}.fields.{name}"))
                compiled.append(compiled_row)
            attributes = []
            for name, attribute in group.meta.items():
                at = f"{path}.meta.{name}"
                attributes.append(where.attribute(attribute, at))
                attrs.append(_declare(fields, name, str | int | float | bool, where, at))
            for name in group.ignore:
                if name in group.fields or name in group.meta:
                    raise where.error(
                        "ignored_and_mapped", f"{name!r} is both mapped and ignored", path
                    )
            if not compiled:
                raise where.error("no_fields", "an entity needs at least one field", path)
            rows += len(compiled)
            built = _Group(group, compiled, attributes, attrs)
            if group.each is None:
                root.append(built)
            else:
                assert group.key is not None
                key_attr = _declare(fields, group.key, str | int, where, f"{path}.key", key=True)
                siblings = arrays.setdefault(group.each, (key_attr, []))[1]
                if siblings and (siblings[0].key, siblings[0].template) != (group.key, group.id):
                    raise where.error(
                        "conflicting_array",
                        f"entities over {group.each!r} must share one key and id template",
                        path,
                    )
                siblings.append(built)
        for name in document.ignore:
            if name in root_fields:
                raise where.error(
                    "ignored_and_mapped", f"{name!r} is both mapped and ignored", "$.ignore"
                )
        where.template(document.command.id, ("ven",), "$.command.id")
        command_row = where.row(
            _command_row(document.command),
            document.defaults,
            "$.command",
            entity_type=document.command.type,
        )

        # msgspec Structs generated from the mapping: decoding checks every mapped
        # field's type (with a path) and skips what the mapping does not use.
        array_specs = []
        for each, (_, groups) in arrays.items():
            key_name = arrays[each][1][0].key
            item = _struct(
                f"VenItem_{to_kebab(each).replace('-', '_')}",
                item_fields[each],
                required=(key_name,) if key_name else (),
            )
            array_specs.append((each, item, groups))
        envelope = {
            "venId": ("ven_id", str),
            "timestamp": ("timestamp", float | None),
        }
        metering_fields = {**root_fields, **envelope}
        for each, item, _ in array_specs:
            metering_fields[each] = (_attr(each), list[item] | None)  # type: ignore[valid-type]
        metering = _struct("VenMetering", metering_fields, required=("venId",))
        # The confirmation shares its series with metering's row for the same metric
        # (shedPowerKw): one series, one spec, or its meta would flip back and forth.
        for built_group in root:
            for mapped in built_group.rows:
                same = (built_group.type, built_group.template, mapped.metric)
                if same == (document.command.type, document.command.id, command_row.metric):
                    command_row.spec = mapped.spec
        return VenPlan(
            root=root,
            arrays=[
                (each, _attr(each), arrays[each][0], groups) for each, _, groups in array_specs
            ],
            metering=msgspec.json.Decoder(metering),
            command=document.command,
            command_row=command_row,
            rows=rows,
        )

    # Translating ----------------------------------------------------------------------

    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        try:
            if topic == METERING_TOPIC:
                return self._metering(payload, received_at, None, snapshot=False)
            kind, _, source_id = topic.rpartition("/")
            if kind == "ven/ack":
                return self._ack(source_id, payload, received_at)
            if kind == "ven/telemetry" and self.options.telemetry:
                return self._metering(payload, received_at, source_id, snapshot=False)
            if kind == "ven/loads" and self.options.loads:
                return self._metering(payload, received_at, source_id, snapshot=True)
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
    ) -> Normalized:
        message = _decode(self.plan.metering, payload)
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

        site = ven.site
        samples: list[Sample] = []
        specs: list[SeriesSpec] = []
        add = samples.append
        add_spec = specs.append
        # The hot path: one tight loop per object, with everything per row precomputed.
        # The array loop below repeats this loop's body on purpose: one shared loop over
        # a list of (group, object, entity) measured 15% slower (./dev bench --only ven).
        for group, entity_id in zip(self.plan.root, ven.root_ids, strict=True):
            values = group.get(message)
            entity_type = group.type
            hot = group.rows_hot
            if group.attributes:
                hot = group.cache.get(values[group.nfields :]) or self._specs(group, values)
            for value, (metric, convert, unit, spec) in zip(values, hot, strict=False):
                if value is None:
                    continue
                if convert is not None:
                    value = convert(value)
                add(Sample(site, entity_type, entity_id, metric, value, observed, quality, unit))
                add_spec(spec)
        for ai, (each, attr, key_attr, groups) in enumerate(self.plan.arrays):
            items = getattr(message, attr)
            if not items:
                continue
            ids = ven.item_ids[ai]
            for index, item in enumerate(items):
                key = getattr(item, key_attr)
                entity_id = ids.get(key) or _item_id(ven, groups[0].template, key, each, index, ids)
                for group in groups:
                    values = group.get(item)
                    entity_type = group.type
                    hot = group.rows_hot
                    if group.attributes:
                        hot = group.cache.get(values[group.nfields :]) or self._specs(group, values)
                    for value, (metric, convert, unit, spec) in zip(values, hot, strict=False):
                        if value is None:
                            continue
                        if convert is not None:
                            value = convert(value)
                        add(
                            Sample(
                                site, entity_type, entity_id, metric, value, observed, quality, unit
                            )
                        )
                        add_spec(spec)
        if seen_key is not None:
            ven.remember(seen_key)  # only now: a refused message may come again, fixed
        return Normalized(samples=samples, specs=specs)

    @staticmethod
    def _specs(group: _Group, values: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The group's hot rows with its static fields as meta attributes in the specs,
        built once per distinct set of static values."""
        static = values[group.nfields :]
        attributes: dict[str, str | int | float | bool] = {}
        for attribute, value in zip(group.attributes, static, strict=True):
            if value is None:
                continue
            convert = attribute.convert
            if convert is not None and type(value) is not str:
                value = convert(value)
            attributes[attribute.name] = value
        hot = [
            (metric, convert, unit, msgspec.structs.replace(spec, attributes=attributes or None))
            for metric, convert, unit, spec in group.rows_hot
        ]
        if len(group.cache) >= 4096:
            group.cache.clear()  # "static" fields that keep changing: stay bounded
        group.cache[static] = hot
        return hot

    def _ack(self, source_id: str, payload: bytes, received_at: datetime) -> Normalized:
        ack = _decode(_ack_decoder, payload)
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
            row = self.plan.command_row
            entity_id = ven.command_entity
            result.samples.append(
                Sample(
                    ven.site,
                    self.plan.command.type,
                    entity_id,
                    row.metric,
                    value if row.convert is None else row.convert(value),
                    observed,
                    quality,
                    row.unit,
                )
            )
            result.specs.append(row.spec)
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
        try:
            kebab = to_kebab(source_id)
        except IdentifierError as exc:
            raise SourceError("bad_identifier", exc.message, path="$.venId") from None
        site = (entry.site if entry is not None else None) or opts.site or kebab
        ven = _Ven(source_id, site, kebab, self.plan)
        self._targets[(site, ven.command_entity)] = source_id
        self._vens[source_id] = ven
        return ven

    # Commands -------------------------------------------------------------------------

    def format(self, topic: str, payload: bytes, *, received_at: datetime) -> Formatted:
        parsed = parse_topic(topic)
        command = self.plan.command
        if (
            parsed.stream != "set"
            or parsed.entity_type != command.type
            or (parsed.metric != command.metric)
        ):
            raise CommandError(
                "not_commandable",
                f"the ven adapter takes commands on {command.type}/<ven>/{command.metric}/set",
                topic=topic,
            )
        source_id = self._targets.get((parsed.site, parsed.entity_id))
        if source_id is None:
            raise CommandError(
                "unknown_target", "no VEN is known under this site and entity", topic=topic
            )
        request = decode_set(payload)
        value: Scalar = request.value if isinstance(request, SetEnvelope) else request
        if type(value) is bool or value < 0:
            raise CommandError(
                "invalid_value", "shed power must be a number of watts >= 0", topic=topic
            )
        command_id = self.new_id()
        body: dict[str, Any]
        if value == 0:
            action = "restore"
            body = {"op": "restore", "correlationId": command_id}
            event_id = None
        else:
            action = "event"
            duration = self.options.default_duration_s
            event_id = f"evt-{command_id}"
            if isinstance(request, SetEnvelope):
                duration = request.duration_s or duration
                event_id = request.event_id or event_id
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
        record = CommandRecord(
            id=command_id,
            adapter=self.name,
            site=parsed.site,
            entity_type=parsed.entity_type,
            entity_id=parsed.entity_id,
            metric=parsed.metric,
            value=value,
            target=source_id,
            action=action,
            payload=body,
            state="accepted",
            accepted_at=received_at,
            expires_at=self.commands.deadline(received_at),
        )
        self.commands.accept(record)
        message = Message(f"ven/cmd/{source_id}", _json.encode(body), 1, False)
        return Formatted(record=record, messages=[message])


def _command_row(command: VenCommand) -> Any:
    from .mapping import SeriesRow

    # A confirmation is news even when it repeats the last value, so it is never deduped.
    return SeriesRow(metric=command.metric, unit=command.unit, dedupe=False)


def _attr(name: str) -> str:
    """A Python attribute name for a source field name (which may not be one)."""
    return "f_" + "".join(c if c.isalnum() else "_" for c in name)


def _declare(
    fields: dict[str, tuple[str, Any]],
    name: str,
    kind: Any,
    where: Located,
    path: str,
    *,
    key: bool = False,
) -> str:
    """Add a source field to a generated Struct; one field may not take two types."""
    existing = fields.get(name)
    typed = kind if key else kind | None
    if existing is not None:
        if existing[1] != typed:
            raise where.error(
                "conflicting_field", f"field {name!r} is mapped twice with different types", path
            )
        return existing[0]
    fields[name] = (_attr(name), typed)
    return fields[name][0]


def _struct(
    name: str, fields: dict[str, tuple[str, Any]], required: tuple[str, ...] = ()
) -> type[msgspec.Struct]:
    spec: list[Any] = []
    for source, (attr, kind) in fields.items():
        if source in required:
            spec.append((attr, kind, msgspec.field(name=source)))
        else:
            spec.append((attr, kind, msgspec.field(default=None, name=source)))
    # Required fields first: msgspec wants them before the optional ones.
    spec.sort(key=lambda field: field[2].default is not msgspec.NODEFAULT)
    return msgspec.defstruct(name, spec, kw_only=True, gc=False, module=__name__)


def _decode(decoder: msgspec.json.Decoder[Any], payload: bytes) -> Any:
    try:
        return decoder.decode(payload)
    except msgspec.MsgspecError as exc:
        code, detail, path = explain(exc)
        if code == "malformed_json":
            raise SourceError(code, detail) from None
        raise SourceError(code, f"{detail} (at {path})", path=path) from None


def _unix(seconds: float, path: str) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise SourceError(
            "bad_timestamp", "timestamp is not a time in Unix seconds", path=path
        ) from None


def _item_id(
    ven: _Ven, template: str, key: object, each: str, index: int, ids: dict[object, str]
) -> str:
    try:
        entity_id = template.format(ven=ven.ven, id=to_kebab(str(key)))
    except IdentifierError as exc:
        raise SourceError("bad_identifier", exc.message, path=f"$.{each}[{index}]") from None
    if len(ids) < 4096:
        ids[key] = entity_id
    return entity_id
