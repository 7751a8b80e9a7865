"""The bus connection against a real Mosquitto: publishes, PUBACKs, resend, refusal."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from energybus.worker.bus import BusClient, Received
from tests.workers import Collector
from tools import services
from tools.services import Service

pytestmark = pytest.mark.services


def test_publishes_without_puback_are_resent_on_the_next_connection(mosquitto: Service) -> None:
    topic = f"bustest/{uuid.uuid4().hex[:8]}"
    collector = Collector(mosquitto, [f"{topic}/#"])
    acked: list[Any] = []

    async def main() -> tuple[int, int]:
        def on_puback(token: Any, reason: int) -> None:
            acked.append((token, reason))

        def ignore(message: Received) -> None:
            pass

        first = BusClient(on_message=ignore, on_puback=on_puback, max_inflight=100)
        await first.connect(host=mosquitto.host, port=mosquitto.port, client_id=f"{topic}-a")
        for i in range(50):
            first.publish(f"{topic}/{i}", str(i).encode(), 1, False, i)
        pending = first.inflight
        first.abort()  # never flushed: the broker has none of them
        await asyncio.shield(first.closed)
        second = BusClient(on_message=ignore, on_puback=on_puback, max_inflight=100)
        await second.connect(host=mosquitto.host, port=mosquitto.port, client_id=f"{topic}-b")
        resent = second.resend(first)
        for _ in range(200):
            if len(acked) == 50:
                break
            await asyncio.sleep(0.01)
        assert second.inflight == 0
        await second.disconnect()
        return pending, resent

    try:
        pending, resent = asyncio.run(main())
        collector.wait_for(lambda t: len(t) >= 50)
    finally:
        collector.close()
    assert pending == resent == 50
    assert sorted(token for token, _ in acked) == list(range(50))
    assert all(reason < 0x80 for _, reason in acked)
    assert sorted(collector.topics()) == sorted(f"{topic}/{i}" for i in range(50))


def test_a_broker_that_is_not_there_refuses_the_connection() -> None:
    async def main() -> None:
        client = BusClient(on_message=lambda m: None, on_puback=lambda t, r: None)
        await client.connect(host="127.0.0.1", port=services.free_port(), client_id="x")

    with pytest.raises(ConnectionRefusedError):
        asyncio.run(main())


class _Transport(asyncio.Transport):
    """Records each write: how many syscalls the client would make."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def test_publishes_leave_together_and_a_long_burst_does_not_wait_for_its_end() -> None:
    async def main() -> list[int]:
        client = BusClient(on_message=lambda _: None, on_puback=lambda *_: None)
        transport = _Transport()
        client.connection_made(transport)
        for message in range(10):  # ten source messages of five publishes each
            for i in range(5):
                client.publish(f"s/energy/load/x{message}/m{i}/value", b"1", 1, False, None)
            client.flush_soon()
        assert transport.writes == []  # not at once
        await asyncio.sleep(0.05)
        small = len(transport.writes)
        for message in range(4000):
            client.publish(f"s/energy/load/y{message}/m/value", b"2", 1, False, None)
            client.flush_soon()
        assert len(transport.writes) > small  # flushed before the long burst's end
        await asyncio.sleep(0.05)
        sizes = [w.count(b"s/energy/load/") for w in transport.writes]
        assert sum(sizes) == 4050
        return [small, *sizes]

    small, *sizes = asyncio.run(main())
    assert small == 1 and sizes[0] == 50
    assert all(size <= 1600 for size in sizes)
