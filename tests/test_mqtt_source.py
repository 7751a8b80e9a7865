"""The MQTT source while the dispatcher's gate is closed (the bus down or full): what
arrives is held in order, reading pauses past a bound, and a lost connection drops what
it held unacknowledged, for the broker to deliver again."""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any

import pytest

from energybus.worker.acks import AckQueue
from energybus.worker.bus import Received
from energybus.worker.config import MqttConfig
from energybus.worker.metrics import Metrics
from energybus.worker.sources import Delivery, mqtt as mqtt_source
from energybus.worker.sources.mqtt import MqttSource


class FakeGate:
    def __init__(self) -> None:
        self.open = asyncio.Event()

    def is_open(self) -> bool:
        return self.open.is_set()

    async def wait_open(self) -> None:
        await self.open.wait()


class FakeClient:
    """The parts of the bus client the source drives while it holds messages."""

    def __init__(self) -> None:
        self.reading = True
        self.pauses = 0
        self.acked: list[int] = []

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def ack(self, packet_id: int) -> None:
        self.acked.append(packet_id)


def _source(gate: FakeGate, delivered: list[Delivery]) -> tuple[MqttSource, FakeClient]:
    source = MqttSource(
        config=MqttConfig(receive_maximum=10),
        filters=["volttron/metering"],
        commands=[],
        status_topic="energybus/worker/t/status",
        metrics=Metrics(),
        deliver=delivered.append,
        gate=gate,
    )
    client = FakeClient()
    source._client = client  # type: ignore[assignment]
    source._acks = AckQueue(client.ack)
    return source, client


def _message(n: int) -> Received:
    return Received("volttron/metering", b'{"n": %d}' % n, 1, False, n)


def test_held_while_the_gate_is_closed_then_handed_over_in_order() -> None:
    async def main() -> tuple[list[Delivery], FakeClient, int, bool]:
        gate = FakeGate()
        delivered: list[Delivery] = []
        source, client = _source(gate, delivered)
        count = source._hold_max + 5  # past the bound: reading pauses
        for n in range(1, count + 1):
            source._received(_message(n))
        await asyncio.sleep(0.01)
        held_before = len(delivered)
        paused = not client.reading
        gate.open.set()
        for _ in range(100):
            if len(delivered) == count:
                break
            await asyncio.sleep(0.01)
        for delivery in delivered:
            delivery.entry.release()  # the handler's own hold: the work is done
        return delivered, client, held_before, paused

    delivered, client, held_before, paused = asyncio.run(main())
    assert held_before == 0
    assert paused and client.pauses >= 1
    assert client.reading  # resumed once the held messages were handed over
    assert [d.payload for d in delivered][:3] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    assert client.acked == list(range(1, len(delivered) + 1))  # each, in arrival order
    assert all(d.received_at.tzinfo is UTC for d in delivered)


def test_a_lost_connection_drops_what_it_held_without_acknowledging_it() -> None:
    async def main() -> tuple[list[Delivery], FakeClient]:
        gate = FakeGate()
        delivered: list[Delivery] = []
        source, client = _source(gate, delivered)
        for n in range(1, 4):
            source._received(_message(n))
        source._lost(client)  # type: ignore[arg-type]
        gate.open.set()
        await asyncio.sleep(0.05)
        return delivered, client

    delivered, client = asyncio.run(main())
    assert delivered == []
    assert client.acked == []  # the broker delivers them again on the next connection


def test_after_pause_nothing_is_taken_for_the_next_run() -> None:
    async def main() -> tuple[list[Delivery], FakeClient]:
        gate = FakeGate()
        gate.open.set()
        delivered: list[Delivery] = []
        source, client = _source(gate, delivered)
        source._received(_message(1))
        delivered[0].entry.release()
        source.pause()  # shutdown
        source._received(_message(2))
        return delivered, client

    delivered, client = asyncio.run(main())
    assert [d.payload for d in delivered] == [b'{"n": 1}']
    assert client.acked == [1]  # 2 was not taken: not acknowledged


def test_a_handled_message_the_broker_sends_again_as_dup_is_acknowledged_not_handled() -> None:
    """A broker that went down before reading an acknowledgement sends the message again
    on the next connection, marked DUP under its packet id: handling it again would make
    a signed message its own replay."""

    async def main() -> tuple[list[Delivery], FakeClient]:
        gate = FakeGate()
        gate.open.set()
        delivered: list[Delivery] = []
        source, _ = _source(gate, delivered)
        source._received(_message(1))
        source._received(_message(2))
        for delivery in delivered:
            delivery.entry.release()  # handled and acknowledged; the broker lost the acks
        second = FakeClient()
        source._client = second  # type: ignore[assignment]
        source._renew(AckQueue(second.ack))
        again = _message(2)
        again.dup = True
        source._received(again)
        # Not DUP: another message with the same bytes (a publisher sent it twice).
        source._received(_message(1))
        # DUP, but under another packet id than the one handled: not that message.
        other = Received("volttron/metering", b'{"n": 2}', 1, False, 7, dup=True)
        source._received(other)
        for delivery in delivered[2:]:
            delivery.entry.release()
        return delivered, second

    delivered, second = asyncio.run(main())
    assert [(d.payload, d.entry.packet_id) for d in delivered] == [
        (b'{"n": 1}', 1),
        (b'{"n": 2}', 2),
        (b'{"n": 1}', 1),
        (b'{"n": 2}', 7),
    ]
    assert second.acked == [2, 1, 7]  # each acknowledged, in arrival order


class EarlyBroker:
    """Fake bus clients, one per connection: each sends its ``early`` messages in the
    same read as its CONNACK, as Mosquitto does with what it redelivers."""

    def __init__(self, batches: list[list[Received]]) -> None:
        self.batches = batches
        self.clients: list[Any] = []

    def __call__(self, *, on_message: Any, on_puback: Any, max_inflight: int) -> Any:
        broker = self

        class Client:
            def __init__(self) -> None:
                self.acked: list[int] = []
                self.closed: asyncio.Future[BaseException | None] = (
                    asyncio.get_running_loop().create_future()
                )
                broker.clients.append(self)

            async def connect(self, **_: Any) -> None:
                for message in broker.batches[len(broker.clients) - 1]:
                    on_message(message)

            def publish(self, *_: Any) -> None:
                pass

            def flush(self) -> None:
                pass

            async def subscribe(self, *_: Any, **__: Any) -> None:
                pass

            def ack(self, packet_id: int) -> None:
                self.acked.append(packet_id)

            def abort(self) -> None:
                pass

        return Client()


def test_what_the_broker_sends_with_its_connack_waits_for_the_new_acknowledgements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A redelivery right behind the CONNACK came before the new connection's
    acknowledgements were in place: it was handled again and acknowledged on the old,
    dead connection, so the broker never had its acknowledgement."""
    again = _message(2)
    again.dup = True
    broker = EarlyBroker([[_message(1), _message(2)], [again, _message(3)]])
    monkeypatch.setattr(mqtt_source, "BusClient", broker)

    async def main() -> list[Delivery]:
        gate = FakeGate()
        gate.open.set()
        delivered: list[Delivery] = []

        def handled(delivery: Delivery) -> None:
            delivered.append(delivery)
            delivery.entry.release()

        source = MqttSource(
            config=MqttConfig(reconnect_min_s=0.01, reconnect_max_s=0.02),
            filters=["volttron/metering"],
            commands=[],
            status_topic="energybus/worker/t/status",
            metrics=Metrics(),
            deliver=handled,
            gate=gate,
        )
        task = asyncio.create_task(source.run())
        await asyncio.sleep(0.05)
        broker.clients[0].closed.set_result(None)  # the broker goes down
        for _ in range(100):
            if len(broker.clients) == 2 and broker.clients[1].acked:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return delivered

    delivered = asyncio.run(main())
    assert [d.payload for d in delivered] == [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    assert broker.clients[0].acked == [1, 2]
    assert broker.clients[1].acked == [2, 3]  # on the connection the broker listens to
