"""The dead-letter stream: every refused message, with its reason and the original.

Dead letters go to ``<topic_prefix>/dead_letter/<source>`` at QoS 1, not retained: the
original topic and payload (as text, or base64 when it is not UTF-8) with its size in
bytes, the reason code, the message and the path of the fault (and every refusal, when
several values of one message were refused), so a refused message can be read, fixed
and sent again. A message refused as ``too_large`` keeps only its size: copying it
would put on the bus what the limit keeps out of the worker. Each refusal is counted
by source and reason.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Final

import msgspec

from energybus.adapters import Rejection

__all__ = ["DeadLetter", "Refusal", "dead_letter"]

_encode: Final = msgspec.json.Encoder().encode


class Refusal(msgspec.Struct, omit_defaults=True):
    reason: str
    message: str
    path: str | None = None


class DeadLetter(msgspec.Struct, omit_defaults=True):
    reason: str
    message: str
    source: str
    topic: str
    received_at: datetime
    worker: str
    size: int
    """The payload's length in bytes, also when the payload itself is left out."""
    path: str | None = None
    refusals: list[Refusal] | None = None
    payload: str | None = None
    payload_base64: str | None = None


def dead_letter(
    rejections: Sequence[Rejection],
    *,
    source: str,
    topic: str,
    payload: bytes,
    received_at: datetime,
    worker: str,
) -> bytes:
    """The dead letter's payload: one per message, however many of its values were
    refused (the first gives ``reason``; all are in ``refusals`` when there are several),
    so a message with many bad values is not copied once per value."""
    text: str | None = None
    raw: str | None = None
    if not any(r.code == "too_large" for r in rejections):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raw = base64.b64encode(payload).decode()
    first = rejections[0]
    refusals = (
        [Refusal(r.code, r.message, r.path) for r in rejections] if len(rejections) > 1 else None
    )
    return _encode(
        DeadLetter(
            reason=first.code,
            message=first.message,
            source=source,
            topic=topic,
            received_at=received_at,
            worker=worker,
            path=first.path,
            refusals=refusals,
            size=len(payload),
            payload=text,
            payload_base64=raw,
        )
    )
