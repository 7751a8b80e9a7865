"""Configuration documents: TOML read strictly, once, with errors that point at a line.

Mapping files, adapter options and the worker's site configuration are all read here:
:func:`read_toml` parses a file and remembers where each key sits, :func:`expand_env`
replaces ``${VAR}`` from the environment (how secrets get in, never through files), and
:func:`load_document` validates a table against a msgspec schema, naming the file, line
and path of the first fault. It lives in the contract layer because the adapters, the
worker and the CLI all read documents and must report faults the same way.
"""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from energybus.errors import MappingError
from energybus.payloads import explain

__all__ = ["Located", "env_values_hidden", "expand_env", "load_document", "read_toml"]

T = TypeVar("T", bound=msgspec.Struct)


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


@contextlib.contextmanager
def env_values_hidden(data: Any, environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """A :class:`MappingError` raised inside shows ``${VAR}`` where its message would
    repeat the value of a variable ``data`` refers to: a value from the environment is
    a secret as far as errors go, and a validator may quote a wrong value (msgspec's
    ``Invalid enum value '...'``)."""
    env = os.environ if environ is None else environ
    names: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            names.update(_ENV_RE.findall(value))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(data)
    # Longest first: one value may hold another.
    values = sorted(((n, env[n]) for n in names if env.get(n)), key=lambda v: -len(v[1]))
    try:
        yield
    except MappingError as error:
        shown = error.message
        for name, value in values:
            shown = shown.replace(value, f"${{{name}}}")
        if shown != error.message:
            error.message = shown
            error.args = (shown,)
        raise


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
