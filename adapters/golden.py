"""Golden cases: an adapter's input messages and exactly what must come out of them.

A case is a JSON file, ``<adapter>/<case>.json``: adapter options, secrets for signing
inputs, and steps, each a message (as JSON, raw text or hex, optionally retained or
signed) or a command timeout, with what must come out (messages, rejections, command
records, duplicate). :func:`check` feeds the steps through the same pipeline the worker
and ``energybus normalize`` use. It is here rather than in the test suite so that an
adapter of another package tests itself the same way (docs/new-source.md).

With ``ENERGYBUS_UPDATE_GOLDEN=1`` it writes what came out into the file instead: how
expectations are made after an intended change, and reviewed like code.
"""

from __future__ import annotations

import itertools
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from energybus.topics import is_valid_topic

from . import adapter_class
from .pipeline import Output, Pipeline
from .signing import Signer

__all__ = ["UPDATE_VARIABLE", "Case", "Step", "check"]

UPDATE_VARIABLE = "ENERGYBUS_UPDATE_GOLDEN"


class Step(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    note: str = ""
    at: datetime
    """The receive time."""
    topic: str | None = None
    payload: Any = None
    """JSON, encoded compactly before feeding; ``raw`` gives the wire text instead."""
    raw: str | None = None
    hex: str | None = None
    """Binary wire bytes in hex (a Modbus poll as the poller hands it over)."""
    retain: bool = False
    sign: int | None = None
    """Sign ``payload`` with this secret (index) of the case's ``secrets``."""
    expire: bool = False
    """Instead of a message: the commands overdue at ``at`` expire."""
    expect: dict[str, Any] | None = None


class Case(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: str
    options: dict[str, Any] = {}
    secrets: list[str] = []
    steps: list[Step]


def check(path: Path, adapter: str | None = None, *, update: bool | None = None) -> None:
    """Run the case in ``path`` through adapter ``adapter`` (default: the name of the
    folder the file is in); raise :class:`AssertionError` naming the first step whose
    output differs, or a canonical topic that breaks the contract."""
    if update is None:
        update = os.environ.get(UPDATE_VARIABLE) == "1"
    raw = msgspec.json.decode(path.read_bytes())
    case = msgspec.convert(raw, Case)
    cls = adapter_class(adapter or path.parent.name)
    options = msgspec.convert(case.options, cls.options_type)
    counter = itertools.count(1)
    pipeline = Pipeline(cls(options=options, new_id=lambda: str(uuid.UUID(int=next(counter)))))

    for index, step in enumerate(case.steps):
        if step.expire:
            out = pipeline.expire(step.at)
        else:
            if step.topic is None:
                raise AssertionError(f"{path}: step {index} has no topic")
            out = pipeline.feed(
                step.topic, _payload(case, step), received_at=step.at, retain=step.retain
            )
        for message in out.messages:
            # Canonical messages obey the contract; source commands are not on the bus.
            if "/energy/" in message.topic and not is_valid_topic(message.topic):
                raise AssertionError(f"{path}: step {index}: invalid topic {message.topic}")
        observed = _observed(out)
        if update:
            raw["steps"][index]["expect"] = observed
        elif step.expect is None:
            raise AssertionError(f"{path}: step {index} ({step.note}) has no expectation")
        elif observed != step.expect:
            raise AssertionError(
                f"{path}: step {index} ({step.note}):\n"
                f"expected {_json(step.expect)}\nobserved {_json(observed)}"
            )
    if update:
        path.write_text(_json(raw) + "\n")


def _json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def _payload(case: Case, step: Step) -> bytes:
    if step.raw is not None:
        return step.raw.encode("utf-8")
    if step.hex is not None:
        return bytes.fromhex(step.hex)
    body = step.payload
    if step.sign is not None:
        body = {**body, "sig": Signer([case.secrets[step.sign]]).sign(body)}
    return msgspec.json.encode(body)


def _observed(out: Output) -> dict[str, Any]:
    return {
        "messages": [
            {
                "topic": m.topic,
                "payload": m.payload.decode("utf-8"),
                "qos": m.qos,
                "retain": m.retain,
            }
            for m in out.messages
        ],
        "rejections": [
            {"code": r.code, "path": r.path, "message": r.message} for r in out.rejections
        ],
        "commands": msgspec.to_builtins(out.commands),
        "duplicate": out.duplicate,
        # Only sources that report reachability have it (a Modbus poller).
        **({"unavailable": [list(key) for key in out.unavailable]} if out.unavailable else {}),
    }
