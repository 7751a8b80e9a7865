"""Retiring a worker: the broker drops its two sessions and everything queued for them.

A worker's sessions outlive it on purpose (docs/worker.md, "Delivery"): ``<client_id>-src``
for ``mqtt.session_expiry_s`` (a week), ``<client_id>-bus`` for
``mqtt.ingest_session_expiry_s`` (an hour). A worker that is gone for good, or whose
``client_id`` changes, should not leave the broker queuing for it until then (nor for
ever: Mosquitto before 2.0.15 never expires a session it restored from its persistence
file after a restart). :func:`retire` connects as each of the two clients with Clean
Start 0 and Session Expiry 0 and disconnects: a session with expiry 0 ends with its
connection, so the broker discards it and its queue.

Clean Start 0 rather than 1: it still ends the session at our disconnect, and CONNACK's
session-present flag then says whether there was one; the messages the broker delivers
from it before a marker that we publish to ourselves (it comes after everything that was
queued, since a broker delivers a client's messages in order) say how much it held.

The refusal rule. Connecting with a client id that is connected takes the connection
over: the broker closes the live one. Doing that to a running worker, then ending its
session, would lose what was queued for it, so the worker must be known to be gone
before anything connects under its ids, without connecting under them. The worker
announces itself on its retained status topic, ``<prefix>/worker/<client_id>/status``:
``online`` after each connect of ``<client_id>-src``, ``offline`` at shutdown and as the
last will of that connection, so the broker publishes it when a worker dies. Before
anything else, a client with an id of its own reads that retained message (with the
same marker: it arrives after the retained status, if there is one); ``online``
refuses. No retained status (a worker that never connected, or a status cleared by
hand) or ``offline`` goes on. While the source session is dropped and then the bus
session, the source connection stays open, so that a worker started meanwhile is noticed:
it takes the connection over, and :func:`retire` fails instead of reporting success. That
worker starts with a new, empty session (Mosquitto 2.0.11, tried: a session whose expiry
is 0 ends when its connection is taken over) and subscribes again, as it does at every
connect: what was queued before is gone, as retiring meant it to be.

What this cannot see: a worker still running while its source connection is down (its
will said ``offline``) and its bus connection up; retire then takes the bus connection
over, and the worker reconnects with a new bus session, missing what other publishers
sent in between. And a status left ``online`` by a broker crash while the worker was
connected (its will went down with the broker): retire refuses, on the safe side; clear
it with ``mosquitto_pub -r -n -t <status topic>`` once the worker is known to be gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass
from typing import Any

from .bus import BusClient, BusError, Received
from .config import Config

__all__ = ["Dropped", "RetireError", "Retired", "WorkerOnline", "retire"]


class RetireError(Exception):
    """The worker could not be retired; the message is one line for the operator."""


class WorkerOnline(RetireError):
    """A worker with this client id is connected: its status says ``online``."""


@dataclass(frozen=True)
class Dropped:
    """One of the worker's client ids, after :func:`retire`."""

    client_id: str
    present: bool
    """The broker had a session under this id (CONNACK's session-present flag)."""
    queued: int
    """Messages the broker delivered from that session before discarding it."""
    complete: bool
    """Whether ``queued`` is all of them; False when the broker held more than it would
    send at once (the session held at least ``queued``)."""


@dataclass(frozen=True)
class Retired:
    status_topic: str
    status: bytes | None
    """The retained status found there (``offline``), or None when there was none."""
    sessions: list[Dropped]
    """``<client_id>-src``, then ``<client_id>-bus``."""


class _Connection:
    """A :class:`BusClient` that keeps what it receives and can tell when everything the
    broker had for it has arrived."""

    def __init__(self, config: Config, client_id: str, marker: str, *, worker: bool) -> None:
        self.config = config
        self.client_id = client_id
        self.marker = marker
        self.worker = worker
        """Whether ``client_id`` is one of the worker's, which a worker may take over."""
        self.received: list[Received] = []
        self.marked = asyncio.Event()
        self.client = BusClient(on_message=self._received, on_puback=_ignore, max_inflight=16)

    def _received(self, received: Received) -> None:
        if received.topic == self.marker:
            self.marked.set()
        else:
            self.received.append(received)

    async def connect(self, *, clean_start: bool, timeout: float) -> bool:
        """Connect with Session Expiry 0; whether the broker had a session (Clean Start 0)."""
        m = self.config.mqtt
        try:
            await self.client.connect(
                **m.broker(),
                client_id=self.client_id,
                clean_start=clean_start,
                session_expiry=0,
                timeout=timeout,
            )
        except (OSError, BusError, TimeoutError) as error:
            raise RetireError(
                f"cannot connect to the broker {m.host}:{m.port} as {self.client_id}: "
                f"{error or type(error).__name__}"
            ) from None
        return self.client.session_present

    async def drain(self, *, also: list[str], idle: float, timeout: float) -> bool:
        """Subscribe to ``also`` and the marker, publish the marker and wait for it: what
        arrives before it is what the broker had for this client. False when the marker
        did not arrive (the broker sends no more than the Receive Maximum unacknowledged,
        and nothing here is acknowledged) and nothing new came for ``idle`` seconds."""
        try:
            await self.client.subscribe([*also, self.marker], no_local=False)
        except (BusError, TimeoutError) as error:
            raise RetireError(f"{self.client_id}: {error or 'no SUBACK'}") from None
        self.client.publish(self.marker, b"", 1, False, None)
        self.client.flush()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        seen = -1
        while not self.marked.is_set():
            if self.client.closed.done():
                raise RetireError(self._lost())
            if len(self.received) == seen or loop.time() > deadline:
                return False
            seen = len(self.received)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.marked.wait(), idle)
        return True

    def _lost(self) -> str:
        if not self.worker:
            return f"the broker closed the connection as {self.client_id}"
        return (
            f"the broker closed the connection as {self.client_id}: a worker with this "
            "client id connected meanwhile (it runs on with a new session); stop it first"
        )

    def check(self) -> None:
        """Raise :class:`RetireError` if the broker closed this connection (taken over)."""
        if self.client.closed.done():
            raise RetireError(self._lost())

    async def close(self) -> None:
        """Disconnect normally: the Session Expiry of 0 sent at connect ends the session
        (so does any other end of the connection)."""
        with contextlib.suppress(OSError, BusError, TimeoutError):
            await asyncio.wait_for(self.client.disconnect(), 10)

    def abort(self) -> None:
        self.client.abort()


def _ignore(token: Any, reason: int) -> None:
    pass


async def retire(config: Config, *, timeout: float = 10.0, idle: float = 2.0) -> Retired:
    """Drop the broker sessions of the worker ``config`` describes, unless its status
    says it is online (:class:`WorkerOnline`); :class:`RetireError` when the broker cannot
    be reached or a worker takes a connection over meanwhile."""
    m, w = config.mqtt, config.worker
    status_topic = f"{w.topic_prefix}/worker/{m.client_id}/status"  # as Worker.plan
    marker = f"{w.topic_prefix}/worker/{m.client_id}/retire/{secrets.token_hex(6)}"

    # Is a worker with this client id connected? Asked under an id of our own.
    probe = _Connection(
        config, f"{m.client_id}-retire-{secrets.token_hex(4)}", marker, worker=False
    )
    await probe.connect(clean_start=True, timeout=timeout)
    try:
        if not await probe.drain(also=[status_topic], idle=timeout, timeout=timeout):
            raise RetireError(f"no answer from the broker on {status_topic} in {timeout:g} s")
    finally:
        await probe.close()
        probe.abort()
    # The retained status, or a live one published meanwhile by a worker that connected.
    seen = [r.payload for r in probe.received if r.topic == status_topic]
    status = seen[-1] if seen else None
    if status == b"online":
        raise WorkerOnline(
            f"worker {m.client_id} is online ({status_topic} is 'online'): stop it first"
        )

    source = _Connection(config, f"{m.client_id}-src", f"{marker}/src", worker=True)
    bus = _Connection(config, f"{m.client_id}-bus", f"{marker}/bus", worker=True)
    sessions: list[Dropped] = []
    try:
        # The source connection stays open until the bus session is gone too: a worker
        # starting meanwhile takes it over, and that is noticed.
        for connection in (source, bus):
            present = await connection.connect(clean_start=False, timeout=timeout)
            complete = await connection.drain(also=[], idle=idle, timeout=timeout)
            sessions.append(
                Dropped(connection.client_id, present, len(connection.received), complete)
            )
        bus.check()
        await bus.close()
        source.check()
        await source.close()
    finally:
        source.abort()
        bus.abort()
    return Retired(status_topic, status, sessions)
