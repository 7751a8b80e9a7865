"""Golden tests: every adapter's input messages and the exact canonical output.

``tests/golden/<adapter>/<case>.json`` holds adapter options and a list of steps; each
step feeds one message (or runs the command timeout) through the same pipeline the
worker and ``energybus normalize`` use, and lists exactly what must come out. After an
intended change of output, ``ENERGYBUS_UPDATE_GOLDEN=1 pytest tests/test_golden.py``
rewrites the expectations; review the diff before committing it.
"""

from __future__ import annotations

import itertools
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from energybus.adapters import Output, Pipeline, adapter_class
from energybus.adapters.signing import Signer
from energybus.topics import is_valid_topic

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(GOLDEN.glob("*/*.json"))
UPDATE = os.environ.get("ENERGYBUS_UPDATE_GOLDEN") == "1"


class Step(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    note: str = ""
    at: datetime
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
    expect: dict[str, Any] | None = None


class Case(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: str
    options: dict[str, Any] = {}
    secrets: list[str] = []
    steps: list[Step]


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


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_golden(path: Path) -> None:
    raw = msgspec.json.decode(path.read_bytes())
    case = msgspec.convert(raw, Case)
    cls = adapter_class(path.parent.name)
    options = msgspec.convert(case.options, cls.options_type)
    counter = itertools.count(1)
    pipeline = Pipeline(cls(options=options, new_id=lambda: str(uuid.UUID(int=next(counter)))))

    for index, step in enumerate(case.steps):
        if step.expire:
            out = pipeline.expire(step.at)
        else:
            assert step.topic is not None, f"step {index} has no topic"
            out = pipeline.feed(
                step.topic, _payload(case, step), received_at=step.at, retain=step.retain
            )
        observed = _observed(out)
        for message in out.messages:
            # Canonical messages obey the contract; source commands are not on the bus.
            if "/energy/" in message.topic:
                assert is_valid_topic(message.topic), message.topic
        if UPDATE:
            raw["steps"][index]["expect"] = observed
            continue
        assert step.expect is not None, f"step {index} ({step.note}) has no expectation"
        assert observed == step.expect, f"step {index}: {step.note}"

    if UPDATE:
        path.write_bytes(msgspec.json.format(msgspec.json.encode(raw), indent=2) + b"\n")


def test_every_adapter_has_golden_cases() -> None:
    from energybus.adapters import BUILTIN

    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(BUILTIN)
    for name in BUILTIN:
        assert len(list((GOLDEN / name).glob("*.json"))) >= 3, name
