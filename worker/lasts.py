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

A floor is a lower bound, so what arrived before a failure is kept. A member of a
partitioned group keeps only its own sites' floors (it never renders the others'), and a
floor dated further ahead than the contract's clock skew allowance is taken at that
bound: a ``last`` stamped in the future by a bad clock must not hold a series back for
ever (docs/worker.md, "Retained `last` at start-up").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec

from energybus.admission import CommandPolicy
from energybus.errors import EnergyBusError
from energybus.payloads import DECODE_ERRORS
from energybus.samples import SeriesKey
from energybus.topics import parse_topic

from .bus import BusClient, BusError, Received, reason_text
from .config import MqttConfig, site_member

__all__ = ["LAST_FILTER", "read_lasts"]

log = logging.getLogger("energybus.worker")

LAST_FILTER: Final = "+/energy/+/+/+/last"
SKEW: Final = timedelta(seconds=CommandPolicy().max_future_s)
"""How far ahead of now a floor may be: the clock skew the contract allows a ``set``."""


class _Last(msgspec.Struct):
    observed_at: datetime


_decoder: Final = msgspec.json.Decoder(_Last)


async def read_lasts(
    config: MqttConfig,
    *,
    client_id: str,
    marker_prefix: str,
    member: tuple[int, int] | None = None,
    limit: int | None = None,
    timeout: float = 30.0,
) -> dict[SeriesKey, datetime]:
    """The observation time of each series' retained ``last`` (for ``member``, of its own
    sites' series only); what was read so far, with one log line, when the broker cannot
    be asked or does not answer (the worker then starts with that). At most ``limit``
    series are kept (the worker's ``max_series``): anyone who may publish on the bus
    can retain a ``last`` for a series invented for the purpose."""
    found: dict[SeriesKey, datetime] = {}
    marker = f"{marker_prefix}/{secrets.token_hex(6)}"
    arrived = asyncio.Event()
    refused: list[int] = []
    horizon = datetime.now(UTC) + SKEW
    ahead = 0
    beyond = 0
    client: BusClient

    def on_message(received: Received) -> None:
        nonlocal ahead, beyond
        if received.packet_id:
            client.ack(received.packet_id)
        if received.topic == marker:
            arrived.set()
            return
        try:
            topic = parse_topic(received.topic)
            observed = _decoder.decode(received.payload).observed_at
        except (EnergyBusError, *DECODE_ERRORS):
            # Not a `last` energybus could have published (nested past what the decoder
            # follows, too: raised out of here, that would drop the connection and end
            # the reading for every worker start while it is retained).
            return
        if observed.tzinfo is None:
            return
        if member is not None and site_member(topic.site, member[1]) != member[0]:
            return
        if observed > horizon:
            ahead += 1
            observed = horizon
        key = (topic.site, topic.entity_type, topic.entity_id, topic.metric)
        if key not in found and limit is not None and len(found) >= limit:
            beyond += 1
            return
        if key not in found or observed > found[key]:
            found[key] = observed

    def on_puback(token: object, reason: int) -> None:
        if reason >= 0x80:  # the marker will not come back: nothing to wait for
            refused.append(reason)
            arrived.set()

    client = BusClient(on_message=on_message, on_puback=on_puback, max_inflight=16)
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
        if refused:
            log.warning(
                "the broker refused the publish on %s (reason %s): the worker needs "
                "permission to publish there to know when the retained last values have "
                "all arrived; starting with the %d read so far",
                marker,
                reason_text(refused[0]),
                len(found),
            )
    except (OSError, BusError, TimeoutError) as error:
        log.warning(
            "the bus's retained last values were not all read (%s; %d were): a message "
            "given again after a restart may step another series' last back",
            str(error) or type(error).__name__,
            len(found),
        )
    finally:
        if connected:
            with contextlib.suppress(OSError, BusError, TimeoutError):
                await asyncio.wait_for(client.disconnect(), 5)
        client.abort()
    if beyond:
        log.warning(
            "the bus holds retained last values of more series than the worker keeps"
            " (worker.max_series, %d): %d were not read",
            limit,
            beyond,
        )
    if ahead:
        log.warning(
            "%d retained last values are dated more than %g s ahead of now; their series "
            "start from now + %g s",
            ahead,
            SKEW.total_seconds(),
            SKEW.total_seconds(),
        )
    return found
