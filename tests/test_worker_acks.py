"""Acknowledgement: the ack queue's order, and paho's manual ack under aiomqtt (pinned)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from energybus.worker.acks import AckQueue
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


def _client(service: Service, identifier: str) -> aiomqtt.Client:
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 300
    client = aiomqtt.Client(
        service.host,
        service.port,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False,
        properties=properties,
    )
    client._client.manual_ack_set(True)
    return client


async def _receive(client: aiomqtt.Client, timeout: float) -> list[aiomqtt.Message]:
    got: list[aiomqtt.Message] = []

    async def take() -> None:
        # A loop, not a comprehension: the iterator never ends, and the messages taken
        # before the timeout are the result.
        async for message in client.messages:
            got.append(message)  # noqa: PERF401

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(take(), timeout)
    return got


@pytest.mark.services
def test_paho_manual_ack_under_aiomqtt_redelivers_only_what_was_not_acked(
    mosquitto: Service,
) -> None:
    """The worker relies on exactly this; a change in aiomqtt or paho shows up here."""
    identifier = f"ack-{uuid.uuid4().hex[:8]}"
    topic = f"acktest/{identifier}"

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        async with _client(mosquitto, identifier) as client:
            await client.subscribe(topic, qos=1)
        publish(mosquitto, [(topic, b"one"), (topic, b"two")])
        async with _client(mosquitto, identifier) as client:
            first = await _receive(client, 1.0)  # received, never acknowledged
        async with _client(mosquitto, identifier) as client:
            second = await _receive(client, 1.0)
            for message in second:
                client._client.ack(message.mid, 1)
            await asyncio.sleep(0.2)
        async with _client(mosquitto, identifier) as client:
            third = await _receive(client, 1.0)
        return (
            [bytes(m.payload) for m in first],
            [bytes(m.payload) for m in second],
            [bytes(m.payload) for m in third],
        )

    first, second, third = asyncio.run(main())
    assert first == [b"one", b"two"]
    assert second == [b"one", b"two"]  # redelivered: nothing was acknowledged
    assert third == []  # acknowledged by hand, so gone
