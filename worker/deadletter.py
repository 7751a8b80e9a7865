"""The dead-letter stream: every refused message, with its reason and the original.

Dead letters go to ``<topic_prefix>/dead_letter/<source>`` at QoS 1, not retained: the
original topic and payload (as text, or base64 when it is not UTF-8) with the reason
code, the message and the path of the fault, so a refused message can be read, fixed
and sent again. They are counted by source and reason.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Final

import msgspec

from energybus.adapters import Rejection

__all__ = ["DeadLetter", "dead_letter"]

_encode: Final = msgspec.json.Encoder().encode


class DeadLetter(msgspec.Struct, omit_defaults=True):
    reason: str
    message: str
    source: str
    topic: str
    received_at: datetime
    worker: str
    path: str | None = None
    payload: str | None = None
    payload_base64: str | None = None


def dead_letter(
    rejection: Rejection,
    *,
    source: str,
    topic: str,
    payload: bytes,
    received_at: datetime,
    worker: str,
) -> bytes:
    """The dead letter's payload."""
    try:
        text: str | None = payload.decode("utf-8")
        raw = None
    except UnicodeDecodeError:
        text, raw = None, base64.b64encode(payload).decode()
    return _encode(
        DeadLetter(
            reason=rejection.code,
            message=rejection.message,
            source=source,
            topic=topic,
            received_at=received_at,
            worker=worker,
            path=rejection.path,
            payload=text,
            payload_base64=raw,
        )
    )
