"""The same corpus of broken bytes through every adapter and through ``energybus
normalize``: each input becomes a documented rejection, never an exception, and a
stream goes on after it."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from energybus.adapters import BUILTIN, Pipeline, create_adapter
from energybus.adapters.cpi import CpiOptions
from energybus.adapters.engine import decode
from energybus.adapters.modbus import ModbusOptions
from energybus.adapters.signing import Signer
from energybus.adapters.voke import VokeOptions
from energybus.errors import SourceError
from energybus.payloads import explain
from tests.test_cli import energybus_exe

ROOT = Path(__file__).resolve().parent.parent
AT = datetime(2024, 10, 23, 16, 13, 21, tzinfo=UTC)
MS = int(AT.timestamp() * 1000)

CORPUS: list[bytes] = [
    b'{"venId":"ven-1\xff"}',
    b'{"ts": %d, "target": "B1", "values": {"soc\xff": 1}}' % MS,
    b"\xff\xfe\x00",
    b"",
    b"{",
    b"null",
    b"[]",
    b'"text"',
    b"1e400",
    b"NaN",
    b'{"venId": "v", "timestamp": 1e400}',
    b'{"venId": "v", "batterySOC": 1e400}',
    b'{"venId": "v", "timestamp": 1%s}' % (b"0" * 5000),
    b'{"venId": "\\ud800"}',
    b'{"venId": "v", "circuits": [{"id": "\\udfff", "currentKw": 1}]}',
    b"[" * 100_000,
    b'{"venId": "' + b"a" * 1_000_000 + b'"}',
    b"\x00" * 64,
    b'{"ts": %d, "values": {"p_total": 1%s}}' % (MS, b"0" * 400),
    b'{"ts": %d, "values": {"status": -1}}' % MS,
    b'{"ts": %d, "values": {"status": 1e30}}' % MS,
    b'{"ts": %d, "target": "B1", "values": {"soc": "high"}}' % MS,
    b'{"ts": %d, "cmdId": "\\ud800", "status": "ok"}' % MS,
    b'{"op": "event", "status": "ok", "correlationId": "\\ud800", "actual_shed_kw": 1e308}',
    b"1" + b"0" * 400,
    b'{"value": 1%s, "observed_at": "2026-03-08T10:15:12Z"}' % (b"0" * 400),
    b'{"venId": "%s", "usedPowerKw": 1}' % (b"a" * 32750),
    b'{"venId": "v", "circuits": [{"id": "%s", "currentKw": 1}]}' % (b"c" * 70000),
    b'{"venId": "v", "circuits": [{"id": "c", "currentKw": 1, "breakerAmps": 1%s}]}' % (b"0" * 400),
    b'{"ts": %d, "target": "B1", "code": "%s", "active": true}' % (MS, b"A" * 70000),
]


def documented_codes() -> set[str]:
    text = (ROOT / "docs" / "errors.md").read_text()
    return set(re.findall(r"^\| `([a-z_0-9]+)`", text, re.M)) | set(
        re.findall(r"`([a-z_0-9]+)`", text)
    )


def _pipelines() -> dict[str, tuple[Pipeline, list[str]]]:
    cpi = msgspec.convert(
        {"plants": {"p1": {"targets": {"B1": {"template": "battery"}}}}}, CpiOptions
    )
    voke = msgspec.convert(
        {
            "orgs": {
                "acme": {
                    "api_key": "k",
                    "signing_keys": [VOKE_KEY],
                    "plants": {"P-1": {"targets": {"B1": {"template": "battery"}}}},
                }
            }
        },
        VokeOptions,
    )
    modbus = msgspec.convert(
        {"site": "s1", "devices": {"bat": {"map": "sunspec_battery"}}}, ModbusOptions
    )
    ven = Pipeline(create_adapter("ven"))
    ven.feed("volttron/metering", b'{"venId": "v1", "timestamp": 1}', received_at=AT)
    return {
        "ven": (
            ven,
            [
                "volttron/metering",
                "ven/ack/v1",
                "v1/energy/load/v1/shed_power/set",
                "v1/energy/load/v1/shed_power/set",
            ],
        ),
        "cpi": (
            Pipeline(create_adapter("cpi", options=cpi)),
            [
                "cpi/p1/telemetry",
                "cpi/p1/alarm",
                "cpi/p1/commands/ack",
                "p1/energy/storage/p1-b1/power_setpoint/set",
            ],
        ),
        "modbus": (
            Pipeline(create_adapter("modbus", options=modbus)),
            ["bat", "no-such-device", "s1/energy/storage/bat/max_charge_power/set"],
        ),
        "voke": (
            Pipeline(create_adapter("voke", options=voke)),
            [
                "vcp.acme.event.telemetry",
                "vcp.acme.event.status",
                "vcp.acme.event.alarm",
                "vcp.acme.event.execution",
                "p-1/energy/storage/p-1-b1/power_setpoint/set",
            ],
        ),
    }


VOKE_KEY = "bad-input-key"


def _voke_envelopes() -> list[bytes]:
    """Signed VCP envelopes with broken fields: the signature passes, what follows must
    still refuse them cleanly."""
    signer = Signer([VOKE_KEY])
    base = {"v": 1, "org": "acme", "plant": "P-1", "ts": MS}
    broken: list[dict[str, Any]] = [
        {"device": ["B1"], "kind": "realtime", "values": {"socPct": 1}},
        {"device": "B1", "kind": "realtime", "values": {"socPct": 1e308, "state": 2.5}},
        {"device": "B1", "kind": "meter", "values": {"chargedKwh": "lots", "socPct": None}},
        {"device": {"x": 1}, "code": ["A"], "active": "yes"},
        {"cmdId": ["x"], "status": "ACK", "state": None},
        {"cmdId": "x", "status": "NACK", "reason": {"deep": [1]}},
        {"event": "mode_change", "mode": 7},
        {"event": ["mode_change"]},
        {"plant": {"P-1": 1}, "kind": "realtime", "values": {}},
        {"ts": 1e300, "kind": "realtime", "values": {}},
        {"ts": -1, "kind": "realtime", "values": {}},
        {"id": "", "kind": "realtime", "values": {}},
        {"org": None, "kind": "realtime", "values": {}},
    ]
    out = []
    for kind in ("telemetry", "status", "alarm", "execution"):
        for n, fields in enumerate(broken):
            body = {**base, "type": kind, "id": f"{kind}-{n}", **fields}
            body["sig"] = signer.sign(body)
            out.append(msgspec.json.encode(body))
    return out


def _modbus_deliveries() -> list[bytes]:
    """What the poller hands over, broken: short, of another length, of an unknown kind,
    at a time that is none, a write result that is no JSON or names no command."""
    header = struct.Struct(">cQH")
    return [
        header.pack(b"P", MS, 2)[:5],
        header.pack(b"P", MS, 2) + b"\x00" * 10,
        header.pack(b"P", MS, 200) + b"\x00" * 600,
        header.pack(b"P", 2**63, 2) + b"\x00" * 311,
        header.pack(b"Z", MS, 0),
        header.pack(b"W", MS, 0) + b"{",
        header.pack(b"W", MS, 0) + b'{"command": "nope", "ok": true, "words": [1]}',
        header.pack(b"W", MS, 0) + b'{"command": 1}',
        header.pack(b"F", MS, 0) + b"\xff\xfe",
    ]


def test_every_builtin_adapter_is_in_the_corpus_test() -> None:
    assert set(_pipelines()) == set(BUILTIN)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_adapter_rejects_broken_bytes_with_a_documented_code(name: str) -> None:
    pipeline, topics = _pipelines()[name]
    documented = documented_codes()
    corpus = CORPUS + (_voke_envelopes() if name == "voke" else [])
    corpus += _modbus_deliveries() if name == "modbus" else []
    for topic in topics:
        for payload in corpus:
            out = pipeline.feed(topic, payload, received_at=AT)  # raises nothing
            codes = {r.code for r in out.rejections}
            assert codes <= documented, (topic, payload[:60], codes - documented)
            for message in out.messages:
                message.payload.decode("utf-8")  # whatever came out is valid text


def test_invalid_utf8_is_one_code_whatever_msgspec_raises() -> None:
    """msgspec 0.22 raises UnicodeDecodeError for invalid UTF-8 inside a string, 0.23
    a DecodeError; both are the rejection ``invalid_utf8``."""

    class Old:
        def decode(self, payload: bytes) -> Any:
            return payload.decode("utf-8")  # raises UnicodeDecodeError, as 0.22 does

    with pytest.raises(SourceError) as old:
        decode(Old(), b'{"venId":"ven-1\xff"}')  # type: ignore[arg-type]
    with pytest.raises(SourceError) as new:
        decode(msgspec.json.Decoder(), b'{"venId":"ven-1\xff"}')
    assert old.value.code == new.value.code == "invalid_utf8"
    assert explain(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"))[0] == "invalid_utf8"


def _stream(adapter: str, lines: list[bytes], *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [energybus_exe(), "normalize", "--adapter", adapter, "--stream", *args],
        input=b"\n".join(lines) + b"\n",
        capture_output=True,
        timeout=60,
    )


def test_normalize_stream_survives_the_corpus_and_goes_on() -> None:
    good = json.dumps(
        {"topic": "volttron/metering", "payload": {"venId": "after", "batterySOC": 1}}
    ).encode()
    lines = [
        json.dumps({"topic": "volttron/metering", "payload": p.decode("latin-1")}).encode()
        for p in CORPUS
        if b"\n" not in p
    ]
    lines += [
        b"\xff\xfe not json",
        b'{"topic": "volttron/metering", "payload": "\\ud800"}',
        b'{"topic": "volttron/\\ud800", "payload": "{}"}',
        b'{"topic": "volttron/metering", "payload": {"venId": "\\udc80"}}',
        b'{"topic": 1, "payload": 2}',
        b"x" * 1_000_000,
        good,
    ]
    result = _stream("ven", lines)
    assert result.returncode == 0, result.stderr[-2000:]
    assert b"Traceback" not in result.stderr
    assert b"after/energy/storage/after-battery/soc/value" in result.stdout
    for line in result.stderr.decode("utf-8", "replace").splitlines():
        assert line.startswith("error: line "), line[:200]


def test_normalize_one_shot_with_broken_bytes_exits_1_without_a_traceback() -> None:
    for payload in (b'{"venId":"ven-1\xff"}', b"\xff", b"[" * 100_000):
        result = subprocess.run(
            [energybus_exe(), "normalize", "--adapter", "ven", "--topic", "volttron/metering"],
            input=payload,
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 1, result.stderr[-2000:]
        assert b"Traceback" not in result.stderr
        assert result.stderr.startswith(b"error: ")
