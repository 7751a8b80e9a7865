"""Wire messages and the delivery policy: which QoS and retain flag each stream gets.

The policy is one table. Messages built with :func:`message` take QoS and retain from
it, so no caller can choose a retained ``set``; :func:`check_delivery` guards messages
that arrive from elsewhere with flags of their own.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final, NamedTuple

import msgspec

from energybus.errors import PolicyError
from energybus.topics import Stream, parse_topic

__all__ = [
    "DELIVERY",
    "Delivery",
    "Message",
    "check_delivery",
    "message",
]


class Delivery(NamedTuple):
    qos: int
    retain: bool


DELIVERY: Final[MappingProxyType[Stream, Delivery]] = MappingProxyType(
    {
        "value": Delivery(qos=1, retain=False),
        "last": Delivery(qos=1, retain=True),
        "meta": Delivery(qos=1, retain=True),
        "availability": Delivery(qos=1, retain=True),
        "set": Delivery(qos=1, retain=False),
    }
)
"""The contract's default delivery policy, per stream."""


class Message(msgspec.Struct, frozen=True, gc=False):
    """One MQTT publish, ready for the wire: what every sink and the CLI hand on."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def message(topic: str, payload: bytes) -> Message:
    """A message for ``topic`` with the stream's QoS and retain flag from :data:`DELIVERY`."""
    stream = parse_topic(topic).stream
    qos, retain = DELIVERY[stream]
    return Message(topic, payload, qos, retain)


def check_delivery(topic: str, *, retain: bool) -> None:
    """Refuse what the contract forbids outright: ``set`` topics MUST NOT be retained.

    A retained command would be executed again by every handler that (re)subscribes,
    long after it was meant; so it is refused, not corrected.
    """
    if retain and topic.endswith("/set"):
        raise PolicyError(
            "retained_set",
            "set topics must not be retained; a retained command replays on every subscribe",
            topic=topic,
        )
