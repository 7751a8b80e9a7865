"""The row engine every JSON dialect is written on: mapping rows in, readings out.

Three levels, each compiled once when a mapping loads:

- :class:`Field`: one source field through its named transforms (``lookup`` or
  ``enum``, then unit and scale, then the plausible ``range``; or ``bits``) into
  reading values.
- :class:`Template`: a device template (signals a device sends as a JSON object of
  name to number, and the actions it accepts), for platforms that send
  ``{"values": {...}}`` per device.
- :class:`Entities`: entity groups over one JSON document (fields of the message
  itself, or of each item of an array), decoded by msgspec Structs generated from the
  mapping so that decoding checks every mapped field's type and skips the rest.

A value fault (implausible for its unit, a code the mapping does not list, a bitmask
that is no whole number) refuses that one value with its path; the message's other
values are still published, so one broken sensor does not silence a device. A fault of
the message's structure is the adapter's to raise, and rejects the whole message.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from energybus.errors import EnergyBusError, IdentifierError, SourceError
from energybus.payloads import DECODE_ERRORS, Quality, Scalar, explain
from energybus.render import SeriesSpec
from energybus.samples import Reading
from energybus.topics import EntityType, to_kebab
from energybus.units import Conversion

from .mapping import (
    BitRow,
    Compiler,
    Document,
    EntityGroup,
    SeriesRow,
    ValueType,
)

__all__ = [
    "ActionRow",
    "DeviceTemplate",
    "Entities",
    "EntityContext",
    "Field",
    "Template",
    "compile_templates",
    "decode",
    "implausible",
    "refuse",
]

Value = tuple[str, Scalar | None, str | None, SeriesSpec]
"""One value of a :class:`Reading`: ``(metric, value, unit, spec)``."""
Special = Callable[[Any], list[Value]]
Hot = tuple[
    str, Callable[[float], float] | None, str | None, SeriesSpec, float, float, Special | None, str
]
"""What the per-message loop reads per field: metric, convert, unit, spec, the plausible
range, the transform function for fields that are not a plain number or boolean, and
the source field's name (for the path of a refusal)."""

_BIG: Final = 1.7976931348623157e308  # the largest double: infinities are implausible
_CACHE: Final = 4096  # bound of every per-value cache: a source that varies stays bounded
_PER_ENTITY: Final = 256
"""Bound of each entity's own caches (the ids of its items, a VEN's circuits and loads,
and their attributes' series): tens of entries in practice, and kept for every entity,
so that a source inventing ids costs little per entity (docs/worker.md, "Input
limits")."""


class ActionRow(SeriesRow, frozen=True, kw_only=True):
    """A command a device accepts: its ``set`` metric, and the payload field for the value.

    ``unit`` and ``scale`` are the device's: a canonical value is converted back to them.
    Without ``param`` the action takes no value and is sent for a ``set`` of ``true``.
    """

    param: str | None = None


class DeviceTemplate(Document, frozen=True, kw_only=True):
    """What a device's signals mean and which actions it takes."""

    entity_type: EntityType
    description: str = ""
    signals: dict[str, SeriesRow] = {}
    actions: dict[str, ActionRow] = {}
    ignore: dict[str, str] = {}


def decode(decoder: msgspec.json.Decoder[Any], payload: bytes) -> Any:
    """A source message decoded, or a :class:`SourceError` with the path of the fault
    (never an exception of the decoder's own, whatever the bytes).

    Bytes that are not UTF-8 are ``invalid_utf8`` wherever they are, as errors.md says.
    A typed decoder does not read what it skips (a field the mapping does not know, or
    the name of one), so it would take such a message, or refuse it for a field that
    seems missing; the whole payload is checked once it is not plain ASCII.
    """
    try:
        document = decoder.decode(payload)
    except DECODE_ERRORS as exc:
        code, detail, path = explain(exc)
        if code != "invalid_utf8" and not _utf8(payload):
            code = "invalid_utf8"
        if code in ("malformed_json", "invalid_utf8", "too_deep"):
            raise SourceError(code, detail if code != "invalid_utf8" else _NOT_UTF8) from None
        raise SourceError(code, f"{detail} (at {path})", path=path) from None
    if not _utf8(payload):
        raise SourceError("invalid_utf8", _NOT_UTF8)
    return document


_NOT_UTF8: Final = "not valid UTF-8 text"


def _utf8(payload: bytes) -> bool:
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def refuse(error: EnergyBusError, path: str) -> SourceError:
    """``error`` as a refusal of the value at ``path``."""
    return SourceError(error.code, error.message, path=path)


# Fields ---------------------------------------------------------------------------------


class Field:
    """One compiled :class:`SeriesRow`.

    ``decode_type`` is the Python type a document decoder should give the field;
    ``rows`` counts the metrics it can produce (``mappings check`` reports them).
    """

    __slots__ = ("decode_type", "hot", "name", "rows", "words")

    def __init__(self, name: str, row: SeriesRow, compiler: Compiler, path: str) -> None:
        self.name = name
        self.words = False
        """True for a ``lookup`` field, which may take text and booleans."""
        special: Special | None = None
        chosen = [t for t in ("lookup", "enum", "bits") if getattr(row, t) is not None]
        if len(chosen) > 1:
            raise compiler.error(
                "conflicting_field", f"a field takes one of {', '.join(chosen)}", path
            )
        if row.bits is not None:
            if row.metric is not None or row.unit is not None or row.scale != 1.0:
                raise compiler.error(
                    "conflicting_field", "a bits field names its metrics per bit", path
                )
            special = _bits(row.bits, compiler, path)
            self.hot: Hot = ("", None, None, _NO_SPEC, -_BIG, _BIG, special, name)
            self.rows = len(row.bits)
            # A float is taken too and judged per value (3.0 is a mask, 3.5 is refused).
            self.decode_type: Any = int | float
            return
        if row.metric is None:
            raise compiler.error("missing_field", "a field needs a metric (or bits)", path)
        value_type: ValueType | None = None
        if row.lookup is not None:
            kinds = {type(v) is bool for v in row.lookup.values()}
            if len(kinds) > 1:
                raise compiler.error(
                    "wrong_type", "lookup values are all numbers or all booleans", path
                )
            value_type = "boolean" if kinds == {True} else "number"
        elif row.enum is not None:
            value_type = "number"
            if row.unit is not None or row.scale != 1.0:
                raise compiler.error("conflicting_field", "an enum is a state code: no unit", path)
        checked = compiler.check(row, path, value_type=value_type, unit=row.unit, scale=row.scale)
        convert = checked.conversion.fast() if checked.conversion is not None else None
        unit = checked.conversion.unit if checked.conversion is not None else None
        spec = checked.spec
        lo, hi = max(checked.lo, -_BIG), min(checked.hi, _BIG)
        self.decode_type = bool if checked.value_type == "boolean" else float
        if row.lookup is not None:
            special = _lookup(row.lookup, checked.metric, convert, unit, spec, lo, hi)
            self.decode_type = str | int | float | bool
            self.words = True
        elif row.enum is not None:
            states = _enum_codes(row.enum, compiler, path)
            names = ", ".join(f"{code}={name}" for code, name in sorted(states.items()))
            spec = msgspec.structs.replace(spec, attributes={"states": names})
            special = _enum(states, checked.metric, spec)
            self.decode_type = int | float
        self.hot = (checked.metric, convert, unit, spec, lo, hi, special, name)
        self.rows = 1


_NO_SPEC: Final = SeriesSpec()
_WORDS: Final = (str, bool)


def implausible(
    metric: str, lo: float, hi: float, unit: str | None, path: str = "$"
) -> SourceError:
    shown = f" {unit}" if unit else ""
    return SourceError(
        "implausible_value",
        f"{metric} is outside its plausible range [{lo:g}, {hi:g}]{shown}",
        path=path,
    )


def _whole(raw: Any, what: str) -> int:
    kind = type(raw)
    if kind is int:
        return int(raw)
    if kind is float and raw.is_integer():
        return int(raw)
    raise SourceError("wrong_type", f"{what} must be a whole number")


def _bits(bits: dict[str, BitRow], compiler: Compiler, path: str) -> Special:
    compiled: list[tuple[int, str, SeriesSpec]] = []
    for bit, row in bits.items():
        at = f'{path}.bits["{bit}"]'
        if not bit.isdigit() or not 0 <= int(bit) <= 63:
            raise compiler.error("bad_bit", f"bit {bit!r} is not a number 0..63", at)
        checked = compiler.check(row, at, value_type="boolean")
        compiled.append((1 << int(bit), checked.metric, checked.spec))

    def read_bits(raw: Any) -> list[Value]:
        word = _whole(raw, "a bitmask")
        if not 0 <= word < 1 << 64:
            raise SourceError("wrong_type", "a bitmask must be a whole number 0..2**64-1")
        return [(metric, bool(word & mask), None, spec) for mask, metric, spec in compiled]

    return read_bits


def _key(raw: Any) -> str:
    """A source value as a lookup key: TOML keys are text, so 3 and 3.0 are ``"3"``."""
    kind = type(raw)
    if kind is str:
        return raw  # type: ignore[no-any-return]
    if kind is bool:
        return "true" if raw else "false"
    if kind is float and raw.is_integer():
        return str(int(raw))
    return str(raw)


def _lookup(
    table: dict[str, int | float | bool],
    metric: str,
    convert: Callable[[float], float] | None,
    unit: str | None,
    spec: SeriesSpec,
    lo: float,
    hi: float,
) -> Special:
    def read_lookup(raw: Any) -> list[Value]:
        found = table.get(_key(raw))
        if found is None:
            raise SourceError("unknown_code", f"a value the mapping's lookup for {metric} lacks")
        value: Scalar = found if convert is None or type(found) is bool else convert(found)
        if type(value) is not bool and not lo <= value <= hi:
            raise implausible(metric, lo, hi, unit)
        return [(metric, value, unit, spec)]

    return read_lookup


def _enum_codes(enum: dict[str, str], compiler: Compiler, path: str) -> dict[int, str]:
    codes: dict[int, str] = {}
    for code, name in enum.items():
        try:
            codes[int(code)] = name
        except ValueError:
            raise compiler.error(
                "invalid_value", f"enum code {code!r} is not a whole number", f"{path}.enum"
            ) from None
    return codes


def _enum(states: dict[int, str], metric: str, spec: SeriesSpec) -> Special:
    def read_enum(raw: Any) -> list[Value]:
        code = _whole(raw, "a state code")
        if code not in states:
            raise SourceError("unknown_code", f"a state code the mapping's enum for {metric} lacks")
        return [(metric, code, None, spec)]

    return read_enum


# Device templates ------------------------------------------------------------------------


class Action:
    """A compiled :class:`ActionRow`: the command key, its value field and how a
    canonical value goes back to the device's unit."""

    __slots__ = ("high", "key", "low", "param", "spec", "to_source", "unit")

    def __init__(self, key: str, row: ActionRow, compiler: Compiler, path: str) -> None:
        if row.lookup is not None or row.enum is not None or row.bits is not None:
            raise compiler.error(
                "conflicting_field", "an action takes no lookup, enum or bits", path
            )
        kind: ValueType = "number" if row.param else "boolean"
        # A confirmation is news even when it repeats a value, so it is never deduped.
        checked = compiler.check(
            row, path, value_type=kind, unit=row.unit, scale=row.scale, dedupe=False
        )
        self.key = key
        self.param = row.param
        self.spec = checked.spec
        self.unit = checked.conversion.unit if checked.conversion is not None else None
        self.to_source = Conversion(row.unit, row.scale).inverse() if row.param else None
        self.low, self.high = checked.lo, checked.hi
        """The plausible values of a command, in the canonical unit (the row's ``range``)."""


class Template:
    """A compiled :class:`DeviceTemplate`."""

    __slots__ = ("actions", "entity_type", "fields", "ignored", "name", "rows")

    def __init__(self, name: str, template: DeviceTemplate, compiler: Compiler, path: str):
        self.name = name
        self.entity_type: EntityType = template.entity_type
        self.fields: dict[str, Field] = {}
        self.rows = 0
        for signal, row in template.signals.items():
            field = Field(signal, row, compiler, f"{path}.signals.{signal}")
            self.fields[signal] = field
            self.rows += field.rows
        self.actions: dict[str, Action] = {}
        """By the metric whose ``set`` sends the action."""
        for key, action in template.actions.items():
            at = f"{path}.actions.{key}"
            if action.metric is None:
                raise compiler.error("missing_field", "an action names its metric", at)
            if action.metric in self.actions:
                raise compiler.error(
                    "conflicting_field", f"two actions are sent by {action.metric!r}", at
                )
            self.actions[action.metric] = Action(key, action, compiler, at)
        for name_ in template.ignore:
            if name_ in template.signals:
                raise compiler.error(
                    "ignored_and_mapped", f"{name_!r} is both mapped and ignored", path
                )
        self.ignored = frozenset(template.ignore)

    def read(
        self,
        values: Mapping[str, Any],
        reading: Reading,
        errors: list[SourceError],
        path: str = "$.values",
        *,
        refuse_unknown: bool = False,
    ) -> Reading:
        """Add a device's ``{signal: number}`` object to ``reading``.

        A signal the template does not know is skipped (firmware adds signals), or,
        with ``refuse_unknown``, refused alone with its path (``unknown_field``) while the
        rest is read, for platforms whose fields are a published list; a signal under the
        template's ``ignore`` is skipped either way. A signal that is not a number (or,
        for a boolean signal, not true or false) rejects the message, since its sender
        is broken.
        """
        raws: list[Any] = []
        hot: list[Hot] = []
        fields = self.fields
        for name, raw in values.items():
            field = fields.get(name)
            if field is None:
                if refuse_unknown and name not in self.ignored:
                    errors.append(
                        SourceError(
                            "unknown_field",
                            f"a field the {self.name} template does not list",
                            path=f"{path}.{name}",
                        )
                    )
                continue
            if raw is None:
                continue
            kind = type(raw)
            if field.decode_type is bool:
                if kind is not bool:
                    raise SourceError(
                        "wrong_type", "this signal is true or false", path=f"{path}.{name}"
                    )
            elif kind is not float and kind is not int and not (field.words and kind in _WORDS):
                raise SourceError("wrong_type", "a signal must be a number", path=f"{path}.{name}")
            if kind is int and not -1e300 < raw < 1e300:
                raise SourceError(
                    "non_finite", "a signal is out of the range of a double", path=f"{path}.{name}"
                )
            if kind is int and field.hot[6] is None:
                raw = float(raw)  # numbers on the bus are doubles, as in any JSON decoder
            raws.append(raw)
            hot.append(field.hot)
        reading.values += _values(raws, hot, errors, path[2:] or None, -1)
        return reading


def compile_templates(
    templates: Mapping[str, DeviceTemplate], compiler: Compiler
) -> tuple[dict[str, Template], int]:
    """Every template of a mapping, and how many metrics they can produce."""
    compiled = {
        name: Template(name, template, compiler, f"$.templates.{name}")
        for name, template in templates.items()
    }
    return compiled, sum(t.rows for t in compiled.values())


# Entity groups over one JSON document -------------------------------------------------------


class _Group:
    """One compiled :class:`EntityGroup`."""

    __slots__ = (
        "attributes",
        "each",
        "get",
        "gid",
        "hot",
        "interned",
        "key",
        "nfields",
        "template",
        "type",
        "values_of",
    )

    def __init__(
        self,
        group: EntityGroup,
        fields: list[Field],
        attributes: list[tuple[str, Conversion | None, str]],
        attrs: list[str],
        gid: int,
    ) -> None:
        self.type: EntityType = group.type
        self.template = group.id
        self.each = group.each
        self.key = group.key
        self.hot = [field.hot for field in fields]
        self.attributes = [(name, c.fast() if c else None, f) for name, c, f in attributes]
        self.nfields = len(fields)
        self.gid = gid
        plain = all(row[6] is None for row in self.hot)
        self.values_of: Callable[..., list[Value]] = _plain_values if plain else _values
        """:func:`_plain_values` for a group without transforms, chosen here, once."""
        self.interned: dict[tuple[Any, ...], SeriesSpec] = {}
        """Specs with attributes, one object per distinct content across devices: the
        renderer tells a series' spec unchanged by identity, and entities that several
        devices report (the same circuit id under one site) must not look reconfigured
        at every message."""
        """The group's place among all of its mapping's groups (for per-context caches)."""
        getter = operator.attrgetter(*attrs)
        # attrgetter gives a bare value for one name; the loop wants a tuple always.
        self.get: Callable[[Any], tuple[Any, ...]] = (
            getter if len(attrs) > 1 else (lambda obj: (getter(obj),))
        )

    def specs(
        self,
        static: tuple[Any, ...],
        cache: dict[tuple[Any, ...], list[Hot]],
        each: str | None,
        index: int,
    ) -> list[Hot]:
        """The hot rows with the static fields as meta attributes in the specs, built
        once per distinct set of static values and kept in ``cache`` (the caller looks
        there first). The cache is the source device's own, so one device's ``1`` is
        never another's ``true`` (equal as dict keys). A static field that cannot be
        converted rejects the message: it is no reading of its own to refuse alone."""
        attributes: dict[str, str | int | float | bool] = {}
        for (name, convert, field), value in zip(self.attributes, static, strict=True):
            if value is None:
                continue
            if convert is not None and type(value) is not str and type(value) is not bool:
                try:
                    value = convert(value)
                except EnergyBusError as error:
                    raise refuse(error, _path(each, index, field)) from None
            attributes[name] = value
        # The value's type is part of the key: 1 and true are equal as dict keys.
        content = tuple((k, type(v), v) for k, v in attributes.items())
        interned = self.interned
        if len(interned) >= _CACHE:
            interned.clear()
        hot = []
        for row, (m, c, u, s, lo, hi, sp, n) in enumerate(self.hot):
            spec = interned.get((row, content))
            if spec is None:
                spec = interned[(row, content)] = _with_attributes(s, attributes)
            hot.append((m, c, u, spec, lo, hi, sp, n))
        if len(cache) >= _PER_ENTITY:
            cache.clear()
        cache[static] = hot
        return hot


def _with_attributes(
    spec: SeriesSpec, attributes: dict[str, str | int | float | bool]
) -> SeriesSpec:
    merged = {**(spec.attributes or {}), **attributes}
    return msgspec.structs.replace(spec, attributes=merged or None)


class EntityContext:
    """What one source device's messages share: its site, its placeholders, the root
    entity ids filled in once, and the array items' ids as they are first seen."""

    __slots__ = ("caches", "item_ids", "placeholders", "plans", "root_ids", "site")

    def __init__(self, site: str, placeholders: dict[str, str], entities: Entities) -> None:
        self.site = site
        self.placeholders = placeholders
        self.root_ids = [group.template.format(**placeholders) for group in entities.root]
        self.item_ids: list[dict[object, str]] = [{} for _ in entities.arrays]
        self.caches: list[dict[tuple[Any, ...], list[Hot]]] = [{} for _ in range(entities.groups)]
        """Per group: the hot rows with this device's static fields in the specs."""
        self.plans = [
            [
                (g.get, g.hot, g.nfields if g.attributes else -1, self.caches[g.gid], g.type, g)
                for g in groups
            ]
            for _, _, _, groups in entities.arrays
        ]
        """Per array, what the per-item loop reads of each group, gathered once per device."""


class Entities:
    """The entity groups of a mapping, compiled with a decoder for the whole message.

    ``envelope`` declares the message fields the adapter reads itself (name ->
    ``(attribute, type)``), ``required`` those that must be present.
    """

    def __init__(
        self,
        groups: list[EntityGroup],
        compiler: Compiler,
        *,
        placeholders: tuple[str, ...],
        envelope: dict[str, tuple[str, Any]],
        required: tuple[str, ...] = (),
        ignore: Mapping[str, str] = {},
        name: str = "Message",
    ) -> None:
        self.root: list[_Group] = []
        arrays: dict[str, tuple[str, list[_Group]]] = {}
        root_fields: dict[str, tuple[str, Any]] = {}
        item_fields: dict[str, dict[str, tuple[str, Any]]] = {}
        self.rows = 0
        for gi, group in enumerate(groups):
            path = f"$.entity[{gi}]"
            if (group.each is None) != (group.key is None):
                raise compiler.error("each_needs_key", "'each' and 'key' go together", path)
            names = placeholders if group.each is None else (*placeholders, "id")
            compiler.template(group.id, names, f"{path}.id")
            fields = root_fields if group.each is None else item_fields.setdefault(group.each, {})
            compiled: list[Field] = []
            attrs: list[str] = []
            for fname, row in group.fields.items():
                at = f"{path}.fields.{fname}"
                field = Field(fname, row, compiler, at)
                attrs.append(_declare(fields, fname, field.decode_type, compiler, at))
                compiled.append(field)
            attributes: list[tuple[str, Conversion | None, str]] = []
            for fname, attribute in group.meta.items():
                at = f"{path}.meta.{fname}"
                attributes.append((attribute.attribute, compiler.attribute(attribute, at), fname))
                attrs.append(_declare(fields, fname, str | int | float | bool, compiler, at))
            for fname in group.ignore:
                if fname in group.fields or fname in group.meta:
                    raise compiler.error(
                        "ignored_and_mapped", f"{fname!r} is both mapped and ignored", path
                    )
            if not compiled:
                raise compiler.error("no_fields", "an entity needs at least one field", path)
            self.rows += sum(f.rows for f in compiled)
            built = _Group(group, compiled, attributes, attrs, gi)
            if group.each is None:
                self.root.append(built)
                continue
            assert group.key is not None
            key_attr = _declare(fields, group.key, str | int, compiler, f"{path}.key", key=True)
            siblings = arrays.setdefault(group.each, (key_attr, []))[1]
            if siblings and (siblings[0].key, siblings[0].template) != (group.key, group.id):
                raise compiler.error(
                    "conflicting_array",
                    f"entities over {group.each!r} must share one key and id template",
                    path,
                )
            siblings.append(built)
        for fname in ignore:
            if fname in root_fields:
                raise compiler.error(
                    "ignored_and_mapped", f"{fname!r} is both mapped and ignored", "$.ignore"
                )
        message_fields = {**root_fields, **envelope}
        self.arrays: list[tuple[str, str, str, list[_Group]]] = []
        """``(source name, attribute on the message, attribute of the item key, groups)``."""
        for each, (key_attr, array_groups) in arrays.items():
            key_name = array_groups[0].key
            item = _struct(
                f"{name}Item_{to_kebab(each).replace('-', '_')}",
                item_fields[each],
                required=(key_name,) if key_name else (),
            )
            message_fields[each] = (_attr(each), list[item] | None)  # type: ignore[valid-type]
            self.arrays.append((each, _attr(each), key_attr, array_groups))
        self.groups = len(groups)
        self.decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            _struct(name, message_fields, required=required)
        )

    def context(self, site: str, **placeholders: str) -> EntityContext:
        return EntityContext(site, placeholders, self)

    def read(
        self,
        message: Any,
        context: EntityContext,
        observed: datetime,
        quality: Quality,
        errors: list[SourceError],
    ) -> list[Reading]:
        """The readings of a decoded message: one per group and entity with values."""
        readings: list[Reading] = []
        site = context.site
        caches = context.caches
        for group, entity_id in zip(self.root, context.root_ids):  # noqa: B905 (as in _values)
            values = group.get(message)
            hot = group.hot
            if group.attributes:
                static = values[group.nfields :]
                cache = caches[group.gid]
                hot = cache.get(static) or group.specs(static, cache, None, 0)
            out = group.values_of(values, hot, errors, None, 0)
            if out:
                readings.append(Reading(site, group.type, entity_id, observed, quality, out))
        add, reading = readings.append, Reading  # locals: per item
        for ai, (each, attr, key_attr, groups) in enumerate(self.arrays):
            items = getattr(message, attr)
            if not items:
                continue
            ids = context.item_ids[ai]
            plan = context.plans[ai]
            for index, item in enumerate(items):
                key = getattr(item, key_attr)
                entity_id = ids.get(key) or _item_id(
                    context, ids, groups[0].template, key, each, index
                )
                for get, hot, nfields, cache, entity_type, group in plan:
                    values = get(item)
                    if nfields >= 0:
                        static = values[nfields:]
                        hot = cache.get(static) or group.specs(static, cache, each, index)
                    out = group.values_of(values, hot, errors, each, index)
                    if out:
                        add(reading(site, entity_type, entity_id, observed, quality, out))
        return readings


def _values(
    values: Sequence[Any],
    hot: list[Hot],
    errors: list[SourceError],
    each: str | None,
    index: int,
) -> list[Value]:
    """The per-message loop, for entity groups and device templates alike: plain numbers
    and booleans inline, transforms by call. ``each`` and ``index`` place the object in
    the message, for the path of a refusal (:func:`_path`)."""
    out: list[Value] = []
    add = out.append
    # ``values`` may carry the static fields after the hot ones: zip stops at ``hot``'s
    # end. No ``strict=`` keyword: on Python 3.11 a keyword makes each zip() call slower,
    # 4 µs of a VEN message's 30 (24 calls, measured).
    for raw, (metric, convert, unit, spec, lo, hi, special, name) in zip(values, hot):  # noqa: B905
        if raw is None:
            continue
        try:
            if special is not None:
                out.extend(special(raw))
                continue
            value = raw if convert is None else convert(raw)
        except EnergyBusError as error:
            errors.append(refuse(error, _path(each, index, name)))
            continue
        if lo <= value <= hi:
            add((metric, value, unit, spec))
        else:
            errors.append(implausible(metric, lo, hi, unit, _path(each, index, name)))
    return out


def _plain_values(
    values: Sequence[Any],
    hot: list[Hot],
    errors: list[SourceError],
    each: str | None,
    index: int,
) -> list[Value]:
    """:func:`_values` for a group without transforms (lookup, enum, bits): numbers,
    booleans and unit conversions only, the common case, without the test for one."""
    out: list[Value] = []
    add = out.append
    for raw, (metric, convert, unit, spec, lo, hi, _, name) in zip(values, hot):  # noqa: B905
        if raw is None:
            continue
        if convert is not None:
            try:
                raw = convert(raw)
            except EnergyBusError as error:
                errors.append(refuse(error, _path(each, index, name)))
                continue
        if lo <= raw <= hi:
            add((metric, raw, unit, spec))
        else:
            errors.append(implausible(metric, lo, hi, unit, _path(each, index, name)))
    return out


def _path(each: str | None, index: int, name: str) -> str:
    """``$.name`` (the message itself), ``$.each.name`` (an object in it, index -1) or
    ``$.each[index].name`` (an item of an array)."""
    if each is None:
        return f"$.{name}"
    return f"$.{each}.{name}" if index < 0 else f"$.{each}[{index}].{name}"


def _item_id(
    context: EntityContext,
    ids: dict[object, str],
    template: str,
    key: object,
    each: str,
    index: int,
) -> str:
    try:
        entity_id = template.format(**context.placeholders, id=to_kebab(str(key)))
    except IdentifierError as exc:
        raise SourceError("bad_identifier", exc.message, path=f"$.{each}[{index}]") from None
    if len(ids) < _PER_ENTITY:
        ids[key] = entity_id
    return entity_id


def _attr(name: str) -> str:
    """A Python attribute name for a source field name (which may not be one)."""
    return "f_" + "".join(c if c.isalnum() else "_" for c in name)


def _declare(
    fields: dict[str, tuple[str, Any]],
    name: str,
    kind: Any,
    compiler: Compiler,
    path: str,
    *,
    key: bool = False,
) -> str:
    """Add a source field to a generated Struct; one field may not take two types."""
    existing = fields.get(name)
    typed = kind if key else kind | None
    if existing is not None:
        if existing[1] != typed:
            raise compiler.error(
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
