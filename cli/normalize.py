"""``energybus normalize``: translate source messages to canonical ones, for Node-RED and
scripts. A thin layer over :class:`energybus.adapters.Pipeline`."""

from __future__ import annotations

import binascii
import sys
from base64 import b64decode
from datetime import UTC, datetime
from typing import IO, Any, NamedTuple

import click
import msgspec

from energybus.adapters import Output, Pipeline, adapter_class
from energybus.errors import EnergyBusError, MappingError

_json = msgspec.json.Encoder()


class _Input(msgspec.Struct, forbid_unknown_fields=False):
    """One ``--stream`` line; ``payload`` is the wire text, or JSON to be encoded."""

    payload: Any
    topic: str | None = None
    retain: bool = False


_input = msgspec.json.Decoder(_Input)


class _Unread(NamedTuple):
    """Why an input line cannot be read: an error code and its message."""

    code: str
    message: str


def _read_input(line: bytes, topic: str | None) -> tuple[str, bytes, bool] | _Unread:
    """One input as ``--stream`` and ``--input-base64`` take it: (topic, payload bytes,
    retain), or why it cannot be read (``bad_input``; ``too_deep`` for a line nested
    past what the decoder can follow: a payload nested less deeply is decoded here,
    encoded again and held to the adapter's ``max_depth`` like any other)."""
    try:
        item = _input.decode(line)
    except RecursionError:
        return _Unread("too_deep", "JSON nested too deeply to decode")
    except msgspec.MsgspecError as exc:
        return _Unread("bad_input", str(exc))
    item_topic = item.topic or topic
    if item_topic is None:
        return _Unread("bad_input", "no topic in the input or --topic")
    payload = item.payload
    data = payload.encode("utf-8") if isinstance(payload, str) else _json.encode(payload)
    return item_topic, data, item.retain


def _pipeline(adapter: str, config: str | None, site: str | None, mapping: str | None) -> Pipeline:
    try:
        cls = adapter_class(adapter)
        options = cls.options_from_file(config) if config else cls.options_type()
        if site is not None:
            if "site" not in options.__struct_fields__:
                raise click.UsageError(f"adapter {adapter!r} has no site option")
            options = msgspec.structs.replace(options, site=site)
        return Pipeline(cls(options=options, mapping=mapping))
    except EnergyBusError as error:
        text = str(error) if isinstance(error, MappingError) else f"{error} [{error.code}]"
        raise click.UsageError(text) from None


def _write(out: IO[str], result: Output) -> None:
    for message in result.messages:
        record = {
            "topic": message.topic,
            "payload": message.payload.decode("utf-8"),
            "qos": message.qos,
            "retain": message.retain,
        }
        out.write(_json.encode(record).decode("utf-8") + "\n")
    out.flush()


def _complain(result: Output, where: str = "") -> None:
    for rejection in result.rejections:
        path = rejection.path
        at = f" (at {path})" if path not in (None, "$") and path not in rejection.message else ""
        sys.stderr.write(f"error: {where}{rejection.code}: {rejection.message}{at}\n")
    sys.stderr.flush()


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("not an ISO 8601 time", param_hint="--received-at") from None
    if moment.tzinfo is None:
        raise click.BadParameter("needs a time zone (e.g. Z)", param_hint="--received-at")
    return moment.astimezone(UTC)


@click.command()
@click.option("--adapter", "adapter_name", required=True, metavar="NAME", help="ven, cpi, ...")
@click.option("--topic", metavar="TOPIC", help="Source topic (or canonical set topic).")
@click.option("--site", metavar="SITE", help="Site for every device, overriding the config.")
@click.option("--config", type=click.Path(dir_okay=False), help="Site config (TOML).")
@click.option("--mapping", type=click.Path(dir_okay=False), help="Another mapping file.")
@click.option("--retain", is_flag=True, help="The input arrived retained.")
@click.option("--stream", is_flag=True, help="Read JSON lines from stdin until EOF.")
@click.option("--received-at", metavar="TIME", help="When the input arrived (default: now).")
@click.option(
    "--input-base64",
    "encoded",
    metavar="BASE64",
    help="One input as --stream reads it, base64-encoded (for Node-RED's exec node).",
)
@click.argument("payload", required=False)
def normalize(
    adapter_name: str,
    topic: str | None,
    site: str | None,
    config: str | None,
    mapping: str | None,
    retain: bool,
    stream: bool,
    received_at: str | None,
    encoded: str | None,
    payload: str | None,
) -> None:
    """Translate a source message into canonical messages, one JSON line each.

    Each line is {"topic", "payload", "qos", "retain"}, what a Node-RED mqtt-out node
    takes. Without PAYLOAD the payload is read from stdin. A canonical set topic is
    turned into the source platform's command instead.

    With --stream, stdin carries JSON lines {"topic", "payload", "retain"?} and each
    input's messages are written as soon as they are ready; errors go to stderr and the
    stream goes on. --input-base64 gives one such line, base64-encoded, as an argument
    that no argument splitting or shell can change. Exit status: 0 done, 1 input refused
    (one-shot), 2 usage error.
    """
    at = _time(received_at)
    pipeline = _pipeline(adapter_name, config, site, mapping)
    out = sys.stdout
    if stream:
        if payload is not None:
            raise click.UsageError("--stream reads payloads from stdin, not an argument")
        if encoded is not None:
            raise click.UsageError("--stream reads its inputs from stdin, not --input-base64")
        _stream(pipeline, topic, at, out)
        return
    if encoded is not None:
        if payload is not None:
            raise click.UsageError("--input-base64 carries the payload: give no PAYLOAD")
        topic, data, retain = _decoded(encoded, topic, retain)
    elif topic is None:
        raise click.UsageError("--topic is required (except with --stream or --input-base64)")
    else:
        data = (
            sys.stdin.buffer.read()
            if payload is None
            else payload.encode("utf-8", "surrogateescape")
        )
    result = pipeline.feed(topic, data, received_at=at or datetime.now(UTC), retain=retain)
    if result.rejections:
        _complain(result)
        sys.exit(1)
    _write(out, result)


def _decoded(encoded: str, topic: str | None, retain: bool) -> tuple[str, bytes, bool]:
    """The input ``--input-base64`` carries; bad input (exit 1) when it carries none."""
    try:
        line = b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        read: tuple[str, bytes, bool] | _Unread = _Unread(
            "bad_input", "--input-base64 is not base64"
        )
    else:
        read = _read_input(line, topic)
    if isinstance(read, _Unread):
        sys.stderr.write(f"error: {read.code}: {read.message}\n")
        sys.exit(1)
    item_topic, data, item_retain = read
    return item_topic, data, item_retain or retain


def _stream(pipeline: Pipeline, topic: str | None, at: datetime | None, out: IO[str]) -> None:
    for number, line in enumerate(sys.stdin.buffer, start=1):
        if not line.strip():
            continue
        where = f"line {number}: "
        read = _read_input(line, topic)
        if isinstance(read, _Unread):
            sys.stderr.write(f"error: {where}{read.code}: {read.message}\n")
            sys.stderr.flush()
            continue
        item_topic, data, retain = read
        now = at or datetime.now(UTC)
        result = pipeline.feed(item_topic, data, received_at=now, retain=retain)
        pipeline.expire(now)
        if result.rejections:
            _complain(result, where)
        _write(out, result)
