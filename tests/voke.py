"""Playing Voke in the tests: orgs on their own vhosts, signed envelopes, and the answers
to commands, against the real RabbitMQ of the test session."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import msgspec

from energybus.adapters.signing import Signer
from energybus.simulators.voke import declare
from tools import services
from tools.services import Service


@dataclass
class Org:
    slug: str
    api_key: str
    signing_key: str
    vhost: str
    rabbitmq: Service
    seq: int = 0
    signer: Signer = field(init=False)

    def __post_init__(self) -> None:
        self.signer = Signer([self.signing_key])

    @property
    def uri(self) -> str:
        return f"amqp://{self.rabbitmq.host}:{self.rabbitmq.port}"

    def config(self, plants: str) -> str:
        """This org's ``[adapters.voke.orgs.<slug>]`` table, secrets from the environment."""
        env = self.slug.upper().replace("-", "_")
        return (
            f'[adapters.voke.orgs.{self.slug}]\nuri = "{self.uri}"\nvhost = "{self.vhost}"\n'
            f'api_key = "${{VOKE_{env}_KEY}}"\nsigning_keys = ["${{VOKE_{env}_SIGNING}}"]\n'
            f"prefetch = 200\n{plants}"
        )

    def environ(self) -> dict[str, str]:
        env = self.slug.upper().replace("-", "_")
        return {f"VOKE_{env}_KEY": self.api_key, f"VOKE_{env}_SIGNING": self.signing_key}

    def envelope(
        self, message_type: str, plant: str, device: str | None, ts_ms: int, **rest: Any
    ) -> bytes:
        self.seq += 1
        body: dict[str, Any] = {
            "v": 1,
            "type": message_type,
            "id": str(uuid.uuid4()),
            "org": self.slug,
            "plant": plant,
            "device": device,
            "ts": ts_ms,
            "seq": self.seq,
            **rest,
        }
        body["sig"] = self.signer.sign(body)
        return msgspec.json.encode(body)

    async def connect(self) -> aio_pika.abc.AbstractConnection:
        return await aio_pika.connect(
            host=self.rabbitmq.host,
            port=self.rabbitmq.port,
            login=self.slug,
            password=self.api_key,
            virtualhost=self.vhost,
        )


def new_orgs(rabbitmq: Service, count: int, *, declared: bool = True) -> list[Org]:
    """``count`` orgs, each with its own user and vhost, and (unless ``declared`` is
    false) Voke's exchange and queues declared as Voke does when ESM is enabled."""
    orgs = []
    for _ in range(count):
        slug = f"org-{uuid.uuid4().hex[:8]}"
        orgs.append(Org(slug, f"key-{uuid.uuid4().hex}", f"sig-{uuid.uuid4().hex}", slug, rabbitmq))
    services.rabbitmq_tenants(rabbitmq, {o.slug: (o.api_key, o.vhost) for o in orgs})
    if declared:
        for org in orgs:
            asyncio.run(declare_org(org))
    return orgs


async def declare_org(org: Org) -> None:
    connection = await org.connect()
    async with connection:
        await declare(await connection.channel(), org=org.slug)


def publish(org: Org, kind: str, bodies: Iterable[bytes], *, retry_s: float = 0) -> int:
    """Publish to ``vcp.{org}.event.<kind>`` with publisher confirms; with ``retry_s``,
    a message the broker did not confirm (it is down) is sent again until it is, for that
    long. The count confirmed."""

    async def main() -> int:
        pending = list(bodies)
        confirmed = 0
        deadline = time.monotonic() + retry_s
        while pending:
            try:
                connection = await org.connect()
                async with connection:
                    channel = await connection.channel(publisher_confirms=True)
                    exchange = await channel.get_exchange("vcp")
                    while pending:
                        message = aio_pika.Message(
                            pending[0], delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                        )
                        await exchange.publish(message, f"vcp.{org.slug}.event.{kind}")
                        pending.pop(0)
                        confirmed += 1
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        return confirmed

    return asyncio.run(main())


def queue_depth(org: Org, queue: str) -> int:
    async def main() -> int:
        connection = await org.connect()
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(queue, passive=True)
            count = declared.declaration_result.message_count
            return int(count or 0)

    return asyncio.run(main())


class Responder:
    """Voke's side of commands: reads ``vcp.{org}.command`` in a thread and answers each
    with ``answer(command)`` (an ACK or NACK status body, or None for silence)."""

    def __init__(self, org: Org, answer: Callable[[dict[str, Any]], dict[str, Any] | None]):
        self.org = org
        self.answer = answer
        self.commands: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(20)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connection = await self.org.connect()
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange("vcp")
            queue = await channel.get_queue(f"vcp.{self.org.slug}.command")

            async def on_command(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                command = msgspec.json.decode(message.body)
                self.commands.append(command)
                self.org.signer.verify(command)
                reply = self.answer(command)
                if reply is not None:
                    ts = int(time.time() * 1000)
                    body = self.org.envelope(
                        "status", command["plant"], command["device"], ts, **reply
                    )
                    key = f"vcp.{self.org.slug}.event.status"
                    await exchange.publish(aio_pika.Message(body), key)
                await message.ack()

            await queue.consume(on_command)
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
