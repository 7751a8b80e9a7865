"""``energybus validate``: check topics (and optionally a payload) against the contract."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import BinaryIO

import click
import msgspec

from energybus.errors import EnergyBusError, PayloadError, TopicError
from energybus.topics import parse_topic

_json = msgspec.json.Encoder()


def _topics(arguments: tuple[str, ...], stdin: BinaryIO) -> Iterator[bytes]:
    """The topics in argument order, as the bytes given; ``-`` stands for stdin's lines.

    Topics stay bytes so that invalid UTF-8 is reported as such rather than decoded
    away; stdin's lines are handled as they arrive, for Node-RED's daemon node.
    """
    for argument in arguments:
        if argument != "-":
            yield argument.encode("utf-8", "surrogateescape")
            continue
        for line in stdin:
            topic = line.rstrip(b"\r\n")
            if topic:
                yield topic


def check(topic: bytes, payload: bytes | None) -> EnergyBusError | None:
    """The first error of ``topic`` (then of ``payload`` on the topic's stream), or None."""
    try:
        parsed = parse_topic(topic)
    except TopicError as error:
        return error
    if payload is None:
        return None
    # Only now: a topic-only check (the common Node-RED call) skips building the schemas.
    from energybus.payloads import validate_payload

    return validate_payload(parsed.stream, payload)


def error_dict(error: EnergyBusError) -> dict[str, object]:
    """The JSON form of an error; a payload error names ``payload`` as its segment."""
    if isinstance(error, PayloadError):
        return {
            "code": error.code,
            "segment": "payload",
            "path": error.path,
            "message": error.message,
        }
    return error.to_dict()


def human(topic: str, error: EnergyBusError | None) -> str:
    """A report for a person: the topic, a caret under the level at fault, the message.

    ``topic`` is the form shown to people, with invalid UTF-8 escaped as ``\\xff``.
    """
    if error is None:
        return f"ok       {topic}"
    lines = [f"invalid  {topic}"]
    span = error.span if isinstance(error, TopicError) else None
    if span is not None:
        start, end = span
        lines.append(" " * (9 + start) + "^" * max(1, end - start))
    where = "payload" if isinstance(error, PayloadError) else "topic"
    lines.append(f"         {where}: {error.message} [{error.code}]")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per topic, for machines.")
@click.option(
    "--payload",
    metavar="PAYLOAD",
    help="Also validate this payload against each topic's stream.",
)
@click.argument("topics", nargs=-1, required=True)
def validate(as_json: bool, payload: str | None, topics: tuple[str, ...]) -> None:
    """Check TOPICS against the energy bus contract; '-' reads topics from stdin, one a line.

    Exit status: 0 when every topic is valid, 1 when any is not, 2 on usage errors.
    """
    payload_bytes = None if payload is None else payload.encode("utf-8", "surrogateescape")
    out = sys.stdout
    failed = False
    for topic in _topics(topics, sys.stdin.buffer):
        error = check(topic, payload_bytes)
        failed = failed or error is not None
        shown = topic.decode("utf-8", "backslashreplace")
        if as_json:
            record = {
                "topic": shown,
                "valid": error is None,
                "error": None if error is None else error_dict(error),
            }
            line = _json.encode(record).decode("utf-8")
        else:
            line = human(shown, error)
        out.write(line + "\n")
        out.flush()
    sys.exit(1 if failed else 0)
