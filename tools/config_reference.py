"""Write ``docs/configuration.md``, the site configuration reference, from the schemas.

The worker's sections are pydantic models (``worker/config.py``) and each adapter's
``[adapters.<name>]`` table is a msgspec Struct (the adapter's ``options_type``); both
give a JSON Schema, so one renderer turns both into the same tables: every key with its
type, default, constraints and description. Descriptions are the attribute docstrings
next to each field in the code, so the reference cannot say something the code does
not; a key without one is an error here, fixed where the field is declared.

A maintainer's tool rather than an ``energybus`` command: it writes a file of this
repository, which no user of an installed energybus has. ``tests/docs/test_configuration.py`` fails
when the committed file is not what this prints::

    python -m tools.config_reference --write   # regenerate docs/configuration.md
    python -m tools.config_reference --check   # exit 1 when it is out of date
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import textwrap
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pydantic

from energybus.adapters import BUILTIN, adapter_class

TARGET = Path("docs") / "configuration.md"
"""Where ``--write`` writes, from the checkout's root (``python -m tools...`` runs there)."""
REGENERATE = "python -m tools.config_reference --write"

Schema = dict[str, Any]

INTRO = f"""\
# Configuration reference

<!-- Generated from the schemas by `{REGENERATE}`; edit the docstrings in the code. -->

A site configuration is one TOML file, read by `energybus check` and `energybus run`
(docs/worker.md, "Configuration"; `examples/site.toml` is a complete one). Every table
below is validated at start-up: an unknown key, a wrong type or a value out of range is
one error naming the file, the line and the key. `${{VAR}}` anywhere is replaced from the
environment, which is how secrets get in. A default of *none* means the key is absent
unless set; *required* keys have no default. `<key>` in a table's name stands for a name
you choose (a device, a plant, an organisation).
"""


def render() -> str:
    """The whole reference, as Markdown."""
    return "\n".join(_sections([])).rstrip("\n") + "\n"


def undocumented() -> list[str]:
    """Keys of the reference without a description in the code (``[mqtt] host``)."""
    missing: list[str] = []
    for _ in _sections(missing):
        pass
    return missing


def _sections(missing: list[str]) -> Iterator[str]:
    from energybus.worker.config import _Root

    yield INTRO
    root = _Root.model_json_schema()
    classes = _classes(_Root)
    defs = root.get("$defs", {})
    for name, prop in root["properties"].items():
        if name == "adapters":
            continue
        yield from _table(f"[{name}]", _resolve(prop, defs), defs, classes, missing)
    for adapter in sorted(BUILTIN):
        cls = adapter_class(adapter).options_type
        schema = msgspec.json.schema(cls)
        classes = _classes(cls)
        defs = schema.get("$defs", {})
        table = _resolve(schema, defs)
        yield from _table(f"[adapters.{adapter}]", table, defs, classes, missing)


def _table(
    title: str,
    schema: Schema,
    defs: dict[str, Schema],
    classes: dict[str, type],
    missing: list[str],
    level: int = 2,
) -> Iterator[str]:
    cls = classes[schema["title"]]
    docs = _attribute_docs(cls)
    yield f"{'#' * level} `{title}`\n"
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        yield _markdown(cls.__doc__) + "\n"
    yield "| key | type | default | constraints | description |"
    yield "|---|---|---|---|---|"
    nested: list[tuple[str, Schema]] = []
    required = set(schema.get("required", []))
    path = title.strip("[]")
    for key, prop in schema.get("properties", {}).items():
        kind, sub = _type(prop, defs)
        default = "required" if key in required else _default(prop.get("default"))
        described = _markdown(docs.get(key, ""))
        if not described:
            missing.append(f"{title} {key}")
        yield f"| `{key}` | {kind} | {default} | {_constraints(prop, defs)} | {described} |"
        if sub is not None:
            nested.append((sub[0].format(path=f"{path}.{key}"), sub[1]))
    yield ""
    for sub_title, sub_schema in nested:
        yield from _table(sub_title, sub_schema, defs, classes, missing, level + 1)


def _resolve(schema: Schema, defs: dict[str, Schema]) -> Schema:
    ref = schema.get("$ref")
    return defs[ref.rsplit("/", 1)[1]] if ref else schema


def _branch(schema: Schema) -> Schema:
    """The one non-null branch of an optional value."""
    options = [s for s in schema.get("anyOf", []) if s.get("type") != "null"]
    return options[0] if len(options) == 1 else schema


def _type(schema: Schema, defs: dict[str, Schema]) -> tuple[str, tuple[str, Schema] | None]:
    """How a value is written in TOML, and the table of its own it has (a title with a
    ``{path}`` placeholder, and its schema) when it is a table or an array of tables."""
    schema = _branch(schema)
    if "$ref" in schema:
        target = _resolve(schema, defs)
        return "table (below)", ("[{path}]", target)
    if "anyOf" in schema:
        return " or ".join(_type(s, defs)[0] for s in schema["anyOf"]), None
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return " or ".join(_literal(v) for v in values), None
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            items = ", ".join(_type(s, defs)[0] for s in schema["prefixItems"])
            return f"array [{items}]", None
        item = _branch(schema.get("items", {}))
        if "$ref" in item:
            return "array of tables (below)", ("[[{path}]]", _resolve(item, defs))
        return f"array of {_type(item, defs)[0]}", None
    if kind == "object":
        value = schema.get("additionalProperties")
        if isinstance(value, dict) and value:
            value = _branch(value)
            if "$ref" in value:
                return "table of tables (below)", ("[{path}.<key>]", _resolve(value, defs))
            return f"table of {_type(value, defs)[0]}", None
        return "table", None
    if kind == "string":
        return {"password": "string (secret)", "path": "path"}.get(
            schema.get("format", ""), "string"
        ), None
    return {"integer": "integer", "number": "float", "boolean": "boolean"}.get(
        str(kind), str(kind)
    ), None


def _constraints(schema: Schema, defs: dict[str, Schema]) -> str:
    schema = _branch(schema)
    found = []
    for key, sign in (
        ("minimum", ">="),
        ("exclusiveMinimum", ">"),
        ("maximum", "<="),
        ("exclusiveMaximum", "<"),
    ):
        if key in schema:
            found.append(f"{sign} {_number(schema[key])}")
    if "minLength" in schema or "maxLength" in schema:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        found.append(f"{low} to {high} characters" if high else f"at least {low} characters")
    if "pattern" in schema:
        found.append(f"matches `{schema['pattern']}`".replace("|", "\\|"))
    items = schema.get("items")
    if isinstance(items, dict) and "$ref" not in _branch(items):
        inner = _constraints(items, defs)
        if inner:
            found.append(f"each {inner}")
    return ", ".join(found)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _default(value: Any) -> str:
    if value is None:
        return "none"
    return f"`{_literal(value)}`"


def _literal(value: Any) -> str:
    """A value as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_literal(v)}" for k, v in value.items()) + "}"
    return str(value)


_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]*\.)?([^`]+)`")


def _markdown(docstring: str) -> str:
    """A docstring as one Markdown table cell: reST literals as code, roles as names."""
    text = " ".join(inspect.cleandoc(docstring).split())
    text = _ROLE.sub(r"`\1`", text).replace("``", "`")
    return text.replace("|", "\\|")


def _attribute_docs(cls: type) -> dict[str, str]:
    """The docstring under each annotated attribute of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.split(".")[0] in {"builtins", "pydantic", "msgspec", "abc", "typing"}:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = after.value.value
    return docs


def _classes(root: type) -> dict[str, type]:
    """Every model or Struct reachable from ``root``'s fields, by the name its JSON
    Schema gives it."""
    found: dict[str, type] = {}

    def visit(kind: Any) -> None:
        if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel | msgspec.Struct):
            if kind.__name__ in found:
                return
            found[kind.__name__] = kind
            for hint in typing.get_type_hints(kind, include_extras=True).values():
                visit(hint)
            return
        for arg in typing.get_args(kind):
            visit(arg)

    visit(root)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help=f"write {TARGET}")
    action.add_argument("--check", action="store_true", help="exit 1 when it is out of date")
    args = parser.parse_args(argv)
    missing = undocumented()
    if missing:
        print("keys without a description (add a docstring under the field):", file=sys.stderr)
        for key in missing:
            print(f"  {key}", file=sys.stderr)
        return 1
    text = render()
    if args.write:
        TARGET.write_text(text)
    elif args.check:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
