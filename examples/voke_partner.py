"""Be a Voke ESM partner with the library: verify and translate Voke's signed telemetry,
answer a canonical set with a signed command, and take Voke's ACK, as the worker does
with the messages it consumes from RabbitMQ (docs/adapters.md, "Voke ESM partner")."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.signing import Signer
from energybus.adapters.voke import VokeOptions

SIGNING_KEY = "example-signing-key"  # in a site file: "${VOKE_ACME_SIGNING_KEY}"
options = msgspec.convert(
    {
        "orgs": {
            "acme": {
                "api_key": "example-api-key",  # in a site file: "${VOKE_ACME_API_KEY}"
                "signing_keys": [SIGNING_KEY],
                "site": "acme-hq",
                "plants": {"P-17": {"targets": {"B1": {"template": "battery"}}}},
            }
        }
    },
    VokeOptions,
)
pipeline = Pipeline(create_adapter("voke", options=options))
voke = Signer([SIGNING_KEY])  # Voke's side of the same key
now = datetime(2024, 10, 23, 16, 13, 21, tzinfo=UTC)
ts = int(now.timestamp() * 1000) - 1000


def from_voke(message_type: str, **fields: object) -> bytes:
    """A VCP envelope as Voke sends it, signed with the org's key."""
    body = {"v": 1, "type": message_type, "id": f"{message_type}-{ts}", "org": "acme"}
    body["plant"] = "P-17"
    body.update(fields)
    body["sig"] = voke.sign(body)
    return msgspec.json.encode(body)


telemetry = from_voke(
    "telemetry",
    device="B1",
    ts=ts,
    seq=1,
    kind="realtime",
    values={"socPct": 55.5, "powerKw": -2.5},
)
out = pipeline.feed("vcp.acme.event.telemetry", telemetry, received_at=now)
for message in out.messages:
    if message.topic.endswith("/value"):
        print(message.topic, message.payload.decode())

forged = telemetry.replace(b"55.5", b"95.5")  # changed after signing
print(
    "forged:", pipeline.feed("vcp.acme.event.telemetry", forged, received_at=now).rejections[0].code
)

command = pipeline.feed(
    "acme-hq/energy/storage/p-17-b1/power_setpoint/set", b"3000", received_at=now
)
sent = msgspec.json.decode(command.messages[0].payload)
print(command.messages[0].topic, sent["action"], sent["payload"], command.commands[0].state)

ack = from_voke("status", device="B1", ts=ts + 1000, seq=2, cmdId=sent["cmdId"], status="ACK")
answered = pipeline.feed("vcp.acme.event.status", ack, received_at=now)
print("answer:", answered.commands[0].state, [m.topic for m in answered.messages][-1])
