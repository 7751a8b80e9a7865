"""The AMQP source's command publishing without a broker: every outcome of a publish
reaches the command's token, whatever aio-pika raises (the integration tests in
test_voke_worker.py cover the rest against a real RabbitMQ)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aio_pika.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic

from energybus.adapters import AmqpEndpoint
from energybus.messages import Message
from energybus.worker.metrics import Metrics
from energybus.worker.sources import AmqpSource


class Token:
    def __init__(self) -> None:
        self.outcome: tuple[str, str] | None = None

    def release(self) -> None:
        self.outcome = ("sent", "")

    def fail(self, reason: str) -> None:
        self.outcome = ("failed", reason)

    def uncertain(self, reason: str) -> None:
        self.outcome = ("uncertain", reason)


class Exchange:
    def __init__(self, result: Any) -> None:
        self.result = result

    async def publish(self, message: Any, routing_key: str, **kwargs: Any) -> Any:
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


class Gate:
    def is_open(self) -> bool:
        return True

    async def wait_open(self) -> None:
        return None


def _source() -> AmqpSource:
    endpoint = AmqpEndpoint(
        name="voke org acme",
        uri="amqp://127.0.0.1:5672",
        username="acme",
        password="secret-key",
        exchange="vcp",
    )
    return AmqpSource(
        name="voke:acme",
        endpoint=endpoint,
        queues=["vcp.acme.event.telemetry"],
        metrics=Metrics(),
        deliver=lambda delivery: None,
        gate=Gate(),
    )


@pytest.mark.parametrize(
    ("result", "outcome"),
    [
        (Basic.Ack(), "sent"),
        (Basic.Nack(), "failed"),
        (ChannelInvalidStateError("closed"), "failed"),  # never left: surely not sent
        (ConnectionError("reset"), "uncertain"),  # may have left: the record waits
        (TimeoutError(), "uncertain"),
        (RuntimeError("anything else"), "uncertain"),
    ],
)
def test_every_publish_outcome_reaches_the_token(result: Any, outcome: str) -> None:
    token = Token()
    message = Message("vcp.acme.command", b'{"cmdId": "c-1"}', 1, False)
    asyncio.run(_source()._publish(Exchange(result), message, token))  # type: ignore[arg-type]
    assert token.outcome is not None and token.outcome[0] == outcome
    assert "secret-key" not in token.outcome[1]


def test_a_command_while_disconnected_fails_at_once() -> None:
    token = Token()
    _source().publish(Message("vcp.acme.command", b"{}", 1, False), token)
    assert token.outcome == ("failed", "voke org acme is not connected; the command was not sent")
