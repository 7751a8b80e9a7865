"""Acknowledgement: the ack queue's order, and manual acknowledgement against a real broker."""

from __future__ import annotations

import asyncio
import uuid

from energybus.worker.acks import AckQueue
from energybus.worker.bus import BusClient, Received
from tests.workers import publish
from tools.services import Service


def test_acks_leave_in_arrival_order_once_each_entry_is_done() -> None:
    sent: list[int] = []
    queue = AckQueue(sent.append)
    first, second, third = queue.add(1), queue.add(2), queue.add(3)
    first.hold()  # e.g. a publish waiting for its PUBACK
    for entry in (first, second, third):
        entry.release()  # handling done
    assert sent == []  # the first still waits, so nothing after it may go
    first.release()
    assert sent == [1, 2, 3]


def test_a_new_queue_waits_for_the_old_one() -> None:
    old_sent: list[int] = []
    new_sent: list[int] = []
    old, new = AckQueue(old_sent.append), AckQueue(new_sent.append)
    pending = old.add(7, ("t", b"p"))
    new.after(old)
    assert old.pending_keys() == {("t", b"p")}
    entry = new.add(1)
    entry.release()
    assert new_sent == []
    pending.release()
    assert old_sent == [7] and new_sent == [1]


async def _session(
    service: Service, identifier: str, topic: str, *, ack: bool, wait: float = 1.0
) -> list[bytes]:
    """One connection of a persistent session: what it receives in ``wait`` seconds,
    acknowledged by hand or not at all."""
    got: list[bytes] = []
    client: BusClient

    def on_message(message: Received) -> None:
        got.append(message.payload)
        if ack:
            client.ack(message.packet_id)

    client = BusClient(on_message=on_message, on_puback=lambda *_: None)
    await client.connect(
        host=service.host, port=service.port, client_id=identifier, session_expiry=60
    )
    await client.subscribe([topic], no_local=False)
    await asyncio.sleep(wait)
    if not ack:
        client.abort()  # no DISCONNECT either: as a crash would leave it
        await asyncio.shield(client.closed)
    else:
        await client.disconnect()
    return got


def test_manual_ack_redelivers_only_what_was_not_acked(mosquitto: Service) -> None:
    """The worker relies on exactly this for its source connection (worker/bus.py)."""
    identifier = f"ack-{uuid.uuid4().hex[:8]}"
    topic = f"acktest/{identifier}"

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        await _session(mosquitto, identifier, topic, ack=True, wait=0)
        publish(mosquitto, [(topic, b"one"), (topic, b"two")])
        first = await _session(mosquitto, identifier, topic, ack=False)  # never acknowledged
        second = await _session(mosquitto, identifier, topic, ack=True)
        third = await _session(mosquitto, identifier, topic, ack=True)
        return first, second, third

    first, second, third = asyncio.run(main())
    assert first == [b"one", b"two"]
    assert second == [b"one", b"two"]  # redelivered: nothing was acknowledged
    assert third == []  # acknowledged by hand, so gone
