"""One MQTT connection for the commands that talk to a broker without being the worker:
the simulators of MQTT platforms and ``energybus watch``.

It is the worker's own MQTT 5 client (:class:`~energybus.worker.bus.BusClient`, which
the worker uses for speed; see docs/worker.md), with what a command needs on top: a
publish that returns once the broker took the message, and every message that arrives
handed to a callback. A session of its own, gone when the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable
from typing import Any

from energybus.cli.login import Login
from energybus.worker.bus import BusClient, BusError, Received, reason_text

__all__ = ["MqttLink"]


class MqttLink:
    """``on_message(topic, payload, retain)`` gets every message that arrives."""

    def __init__(self, on_message: Callable[[str, bytes, bool], None] | None = None) -> None:
        self.on_message = on_message
        self._client: BusClient | None = None

    @property
    def closed(self) -> asyncio.Future[Any]:
        """Completes when the connection ends."""
        assert self._client is not None, "not connected"
        return self._client.closed

    async def connect(
        self,
        host: str,
        port: int,
        *,
        name: str,
        login: Login | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Connect as ``<name>-<pid>-<random>``; ConnectionError with the reason, in words,
        when the broker cannot be reached or refuses."""
        client = BusClient(on_message=self._received, on_puback=_settle, max_inflight=1000)
        client_id = f"{name}-{os.getpid()}-{secrets.token_hex(3)}"
        login = login or Login()
        try:
            await client.connect(
                host=host,
                port=port,
                client_id=client_id,
                clean_start=True,
                timeout=timeout,
                username=login.username,
                password=login.password,
                tls=login.tls,
            )
        except TimeoutError:
            raise ConnectionError(f"no answer from {host}:{port} within {timeout:g} s") from None
        except (OSError, BusError) as error:
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            raise ConnectionError(f"cannot connect to {host}:{port}: {reason}") from None
        self._client = client

    async def subscribe(self, filters: list[str]) -> None:
        """Subscribe at QoS 1; retained messages arrive first, as the broker holds them."""
        assert self._client is not None, "not connected"
        try:
            await self._client.subscribe(filters, no_local=False)
        except (BusError, TimeoutError) as error:
            raise ConnectionError(str(error) or "no SUBACK") from None

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK; ConnectionError if the
        connection ends first."""
        client = self._client
        assert client is not None, "not connected"
        try:
            await client.wait_room()
        except BusError:
            raise ConnectionError("the broker closed the connection") from None
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        client.publish(topic, payload, 1, retain, acked)
        client.flush_soon()
        ended: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(client.closed))
        try:
            await asyncio.wait([acked, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if not acked.done():
            raise ConnectionError("the broker closed the connection")
        if acked.result() >= 0x80:
            raise ConnectionError(
                f"the broker refused a publish on {topic}: {reason_text(acked.result())}"
            )

    async def close(self) -> None:
        client = self._client
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)
            client.abort()

    def _received(self, message: Received) -> None:
        if message.qos and self._client is not None:
            self._client.ack(message.packet_id)
        if self.on_message is not None:
            self.on_message(message.topic, message.payload, message.retain)


def _settle(token: Any, reason: int) -> None:
    if isinstance(token, asyncio.Future) and not token.done():
        token.set_result(reason)
