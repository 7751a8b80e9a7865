"""The retained ``last`` of every series on the bus, read once before the worker starts.

A worker that dies with messages handled but not acknowledged is given them again when
it comes back, and a member of a group may come back to messages queued while it was
down; its renderers start empty, so without this a sample older than a ``last`` that the
earlier run (or, in a shared group, another member) already published would replace it.
The observation times read here become the renderers' ``last_floors``.

A connection of its own (``<client_id>-lasts``, clean start, no session) subscribes to
``+/energy/+/+/+/last`` and to a marker topic, then publishes the marker: a broker
sends a subscription's retained messages before it handles the client's next packet,
so everything retained has arrived when the marker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import datetime
from typing import Any, Final

import msgspec

from energybus.errors import EnergyBusError
from energybus.samples import SeriesKey
from energybus.topics import parse_topic

from .bus import BusClient, BusError, Received
from .config import MqttConfig

__all__ = ["LAST_FILTER", "read_lasts"]

log = logging.getLogger("energybus.worker")

LAST_FILTER: Final = "+/energy/+/+/+/last"


class _Last(msgspec.Struct):
    observed_at: datetime


_decoder: Final = msgspec.json.Decoder(_Last)


async def read_lasts(
    config: MqttConfig, *, client_id: str, marker_prefix: str, timeout: float = 30.0
) -> dict[SeriesKey, datetime]:
    """The observation time of each series' retained ``last``; empty, with one log
    line, when the broker cannot be asked (the worker then starts without them)."""
    found: dict[SeriesKey, datetime] = {}
    marker = f"{marker_prefix}/{secrets.token_hex(6)}"
    arrived = asyncio.Event()
    client: BusClient

    def on_message(received: Received) -> None:
        if received.packet_id:
            client.ack(received.packet_id)
        if received.topic == marker:
            arrived.set()
            return
        try:
            topic = parse_topic(received.topic)
            observed = _decoder.decode(received.payload).observed_at
        except (EnergyBusError, msgspec.DecodeError, UnicodeDecodeError):
            return  # not a `last` energybus could have published: nothing to keep back
        if observed.tzinfo is None:
            return
        key = (topic.site, topic.entity_type, topic.entity_id, topic.metric)
        if key not in found or observed > found[key]:
            found[key] = observed

    client = BusClient(on_message=on_message, on_puback=_ignore, max_inflight=16)
    connected = False
    try:
        await client.connect(
            **config.broker(),
            client_id=f"{client_id}-lasts",
            clean_start=True,
            session_expiry=0,
            timeout=timeout,
        )
        connected = True
        await client.subscribe([LAST_FILTER, marker], no_local=False)
        client.publish(marker, b"", 1, False, None)
        client.flush()
        await asyncio.wait_for(arrived.wait(), timeout)
    except (OSError, BusError, TimeoutError) as error:
        log.warning(
            "the bus's retained last values were not read (%s): a message given again "
            "after a restart may step a series' last back",
            error or type(error).__name__,
        )
        found.clear()
    finally:
        if connected:
            with contextlib.suppress(OSError, BusError, TimeoutError):
                await asyncio.wait_for(client.disconnect(), 5)
        client.abort()
    return found


def _ignore(token: Any, reason: int) -> None:
    pass
