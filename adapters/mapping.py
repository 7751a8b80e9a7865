"""Mapping files and adapter options: TOML, checked strictly once, compiled into lookups.

A mapping file describes a source platform as data (per source field: entity, metric,
unit, scale, publishing settings; static fields that go to ``meta``; fields ignored on
purpose, with the reason). It is read with :func:`load_document`, which validates it
against the adapter's schema (unknown keys are errors) and reports every fault with
its file, line and path, and then each adapter compiles it into plain tuples and dicts
so that the per-message path looks nothing up by name.

The same machinery reads an adapter's options from a site configuration file, with
``${VAR}`` taken from the environment (secrets never live in files or logs).
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from energybus.errors import MappingError, TopicError, UnitError
from energybus.metrics import metric_info
from energybus.payloads import HistorianMode, explain
from energybus.render import SeriesSpec
from energybus.topics import EntityType, build_topic
from energybus.units import Conversion

__all__ = [
    "AttributeRow",
    "CompiledAttribute",
    "CompiledRow",
    "Document",
    "EntityGroup",
    "Located",
    "MappingDocument",
    "SeriesRow",
    "SeriesSettings",
    "expand_env",
    "load_document",
    "load_options",
    "read_toml",
]

T = TypeVar("T", bound=msgspec.Struct)

NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
ValueType = Literal["number", "boolean"]


class Document(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every mapping and options schema: immutable, unknown keys are errors."""


class SeriesSettings(Document, frozen=True, kw_only=True):
    """How a series is published; unset (``None``) means inherit from ``[defaults]``.

    TOML has no null, so ``max_interval_s = 0`` is how a file turns the heartbeat off.
    """

    profile: Literal["A", "B"] | None = None
    dedupe: bool | None = None
    deadband: NonNegative | None = None
    max_interval_s: NonNegative | None = None
    last_min_interval_s: NonNegative | None = None
    historian_mode: HistorianMode | None = None


class SeriesRow(SeriesSettings, frozen=True, kw_only=True):
    """One source value becoming one canonical metric."""

    metric: str
    unit: str | None = None
    scale: float = 1.0
    type: ValueType | None = None
    description: str | None = None
    precision: Positive | None = None


class AttributeRow(Document, frozen=True, kw_only=True):
    """One static source field becoming a ``meta.attributes`` entry."""

    attribute: str
    unit: str | None = None
    scale: float = 1.0


class EntityGroup(Document, frozen=True, kw_only=True):
    """The values of one JSON object that describe one entity.

    Without ``each`` the object is the message itself; with it, every item of that
    array is one entity, named by the item's ``key`` field. ``id`` is a template over
    the placeholders the adapter documents (``{id}`` is the kebab-case item key).
    """

    type: EntityType
    id: str
    each: str | None = None
    key: str | None = None
    fields: dict[str, SeriesRow] = {}
    meta: dict[str, AttributeRow] = {}
    ignore: dict[str, str] = {}


class MappingDocument(Document, frozen=True, kw_only=True):
    """What every mapping file has: the adapter it is for and the series defaults."""

    adapter: str
    description: str = ""
    defaults: SeriesSettings = SeriesSettings()


class CompiledRow:
    """A :class:`SeriesRow` made ready for the hot path."""

    __slots__ = ("convert", "metric", "spec", "unit", "value_type")

    def __init__(
        self,
        metric: str,
        unit: str | None,
        convert: Callable[[float], float] | None,
        spec: SeriesSpec,
        value_type: ValueType,
    ) -> None:
        self.metric = metric
        self.unit = unit
        self.convert = convert
        """``None`` when values pass unchanged, so the hot path skips a call."""
        self.spec = spec
        self.value_type = value_type


class CompiledAttribute:
    __slots__ = ("convert", "name")

    def __init__(self, name: str, convert: Callable[[float], float] | None) -> None:
        self.name = name
        self.convert = convert


class Located:
    """A loaded TOML document's file and key lines, to point errors at their line."""

    def __init__(self, file: str | None, text: str) -> None:
        self.file = file
        self._lines = _key_lines(text)

    def error(self, code: str, message: str, path: str) -> MappingError:
        return MappingError(code, message, file=self.file, line=self.line(path), path=path)

    def line(self, path: str) -> int | None:
        """The line of the longest prefix of ``path`` that a key or header names."""
        parts = _split_path(path)
        while parts:
            line = self._lines.get(tuple(parts))
            if line is not None:
                return line
            parts.pop()
        return None

    # Compiling --------------------------------------------------------------------------

    def row(
        self,
        row: SeriesRow,
        defaults: SeriesSettings,
        path: str,
        *,
        entity_type: EntityType = "load",
        value_type: ValueType | None = None,
    ) -> CompiledRow:
        """Check ``row`` against the contract and compile it; errors point at ``path``."""
        try:
            build_topic("site", entity_type, "entity", row.metric)
        except TopicError as exc:
            raise self.error(exc.code, exc.message, f"{path}.metric") from None
        info = metric_info(row.metric)
        kind = value_type or row.type or (info.value_type if info else "number")
        if value_type is not None and row.type not in (None, value_type):
            raise self.error("wrong_type", f"this row is always a {value_type}", f"{path}.type")
        convert: Callable[[float], float] | None = None
        unit: str | None = None
        if kind == "boolean":
            if row.unit is not None or row.scale != 1.0:
                raise self.error(
                    "unit_on_boolean", f"boolean metric {row.metric!r} takes no unit or scale", path
                )
        else:
            conversion = self._conversion(row.unit, row.scale, path)
            unit = conversion.unit
            convert = conversion.fast()
        if info is not None and info.value_type != kind:
            raise self.error(
                "wrong_type", f"metric {row.metric!r} is a {info.value_type}, not a {kind}", path
            )
        if info is not None and kind == "number" and info.unit != unit:
            raise self.error(
                "unit_mismatch",
                f"metric {row.metric!r} is published in {info.unit or 'no unit'}, "
                f"but unit {row.unit!r} converts to {unit or 'no unit'}",
                f"{path}.unit",
            )

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(row, name)
            if value is None:
                value = getattr(defaults, name)
            return fallback if value is None else value

        interval = pick("max_interval_s", 60.0)
        spec = SeriesSpec(
            profile=pick("profile", "A"),
            dedupe=pick("dedupe", True),
            deadband=pick("deadband", 0.0),
            max_interval_s=interval or None,
            last_min_interval_s=pick("last_min_interval_s", 0.0),
            description=row.description or (info.description if info else None),
            precision=row.precision,
            historian_mode=pick("historian_mode", "sample"),
        )
        return CompiledRow(row.metric, unit, convert, spec, kind)

    def attribute(self, row: AttributeRow, path: str) -> CompiledAttribute:
        if not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", row.attribute):
            raise self.error(
                "not_snake_case", f"attribute {row.attribute!r} must be snake_case", path
            )
        if row.unit is None and row.scale == 1.0:
            return CompiledAttribute(row.attribute, None)
        conversion = self._conversion(row.unit, row.scale, path)
        return CompiledAttribute(row.attribute, conversion.fast())

    def template(self, template: str, placeholders: Iterable[str], path: str) -> str:
        """Check an id template: known placeholders only, kebab-case once filled in."""
        allowed = set(placeholders)
        try:
            names = [
                name for _, name, _, _ in string.Formatter().parse(template) if name is not None
            ]
        except ValueError as exc:
            raise self.error("bad_template", f"id template {template!r}: {exc}", path) from None
        unknown = sorted(set(names) - allowed)
        if unknown or any(not name for name in names):
            known = ", ".join("{" + name + "}" for name in sorted(allowed)) or "none"
            raise self.error(
                "bad_template",
                f"id template {template!r} uses {unknown or ['{}']}; known placeholders: {known}",
                path,
            )
        sample = template.format(**dict.fromkeys(allowed, "x1"))
        try:
            build_topic("site", "load", sample, "metric")
        except TopicError as exc:
            raise self.error(
                "bad_template", f"id template {template!r} gives {sample!r}: {exc.message}", path
            ) from None
        return template

    def _conversion(self, unit: str | None, scale: float, path: str) -> Conversion:
        try:
            return Conversion(unit, scale)
        except UnitError as exc:
            raise self.error(exc.code, exc.message, f"{path}.unit") from None


def read_toml(source: str | Path) -> tuple[dict[str, Any], Located]:
    """Parse a TOML file; a syntax error becomes a :class:`MappingError` with its line."""
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError("unreadable", f"cannot read: {exc.strerror}", file=str(path)) from None
    except UnicodeDecodeError:
        raise MappingError("invalid_utf8", "not UTF-8 text", file=str(path)) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"at line (\d+)", str(exc))
        raise MappingError(
            "bad_toml",
            str(exc),
            file=str(path),
            line=int(line.group(1)) if line else None,
        ) from None
    return data, Located(str(path), text)


def load_document(schema: type[T], data: Mapping[str, Any], where: Located, path: str = "$") -> T:
    """Validate ``data`` against ``schema``; a fault names its file, line and full path."""
    try:
        return msgspec.convert(data, schema, strict=True)
    except msgspec.ValidationError as exc:
        code, detail, error_path = explain(exc)
        if "[...]" in error_path:
            error_path = _resolve_keys(schema, dict(data), error_path)
        full = path + error_path[1:]
        raise where.error(code, detail, full) from None


def load_options(
    schema: type[T],
    data: Mapping[str, Any],
    where: Located,
    path: str = "$",
    *,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Like :func:`load_document`, after :func:`expand_env`."""
    return load_document(schema, expand_env(dict(data), where, path, environ), where, path)


def expand_env(
    value: Any, where: Located, path: str = "$", environ: Mapping[str, str] | None = None
) -> Any:
    """``value`` with ``${VAR}`` in every string replaced from the environment.

    A missing variable is an error naming the variable, never its would-be value.
    """
    env = os.environ if environ is None else environ

    def expand(value: Any, at: str) -> Any:
        if isinstance(value, str):

            def lookup(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in env:
                    raise where.error("missing_env", f"environment variable {name} is not set", at)
                return env[name]

            return _ENV_RE.sub(lookup, value)
        if isinstance(value, dict):
            return {key: expand(item, f"{at}.{key}") for key, item in value.items()}
        if isinstance(value, list):
            return [expand(item, f"{at}[{index}]") for index, item in enumerate(value)]
        return value

    return expand(value, path)


_ENV_RE: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _resolve_keys(schema: type[msgspec.Struct], data: dict[str, Any], path: str) -> str:
    """Name the dict keys msgspec writes as ``[...]`` in an error path.

    msgspec does not say which key of a table failed; it is found by keeping one key of
    that table at a time and validating again (only on the error path, so cost is moot).
    """
    prefix, _, rest = path.partition("[...]")
    container = _walk(data, _split_path(prefix))
    if not isinstance(container, dict):
        return path
    for key in list(container):
        trial = _replace(data, _split_path(prefix), {key: container[key]})
        try:
            msgspec.convert(trial, schema, strict=True)
        except msgspec.ValidationError as exc:
            if explain(exc)[2].partition("[...]")[0] == prefix:
                resolved = (
                    f"{prefix}.{key}{rest}"
                    if _IDENT.fullmatch(key)
                    else (f'{prefix}["{key}"]{rest}')
                )
                return _resolve_keys(schema, data, resolved) if "[...]" in rest else resolved
    return path


_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_PART: Final = re.compile(r'\.([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\["([^"]*)"\]')


def _split_path(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for name, index, quoted in _PART.findall(path.removeprefix("$")):
        parts.append(int(index) if index else (name or quoted))
    return parts


def _walk(data: Any, parts: list[str | int]) -> Any:
    for part in parts:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _replace(data: Any, parts: list[str | int], value: Any) -> Any:
    if not parts:
        return value
    head, *tail = parts
    copy: Any = list(data) if isinstance(data, list) else dict(data)
    copy[head] = _replace(data[head], tail, value)
    return copy


# A line scanner for TOML: enough structure to name the line of a key or table. It
# relies on tomllib having accepted the text already, so it need not be strict.
_HEADER: Final = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY: Final = re.compile(
    r'^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\'))*)\s*='
)


def _keys(dotted: str) -> list[str]:
    return [part.strip().strip("\"'") for part in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', dotted)]


def _key_lines(text: str) -> dict[tuple[str | int, ...], int]:
    lines: dict[tuple[str | int, ...], int] = {}
    arrays: dict[tuple[str, ...], int] = {}
    table: tuple[str | int, ...] = ()
    depth = 0  # open brackets of a multi-line value still being skipped
    in_string = False
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            in_string = line.count('"""') % 2 == 0
            continue
        if depth:
            depth += _balance(line)
            continue
        header = _HEADER.match(line)
        if header:
            names = tuple(_keys(header.group(2)))
            if header.group(1) == "[[":
                arrays[names] = arrays.get(names, -1) + 1
            # A header's earlier parts resolve to the current element of any array.
            resolved: list[str | int] = []
            for i in range(len(names)):
                resolved.append(names[i])
                index = arrays.get(names[: i + 1])
                if index is not None:
                    resolved.append(index)
            table = tuple(resolved)
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            path = table + tuple(_keys(key.group(1)))
            lines.setdefault(path, number)
            rest = line[key.end() :]
            if rest.count('"""') % 2 == 1:
                in_string = True
            depth = max(0, _balance(rest))
    return lines


def _balance(text: str) -> int:
    """Open minus closed brackets outside strings and comments."""
    text = re.sub(r'"(?:\\.|[^"\\])*"|\'[^\']*\'', "", text).split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")
