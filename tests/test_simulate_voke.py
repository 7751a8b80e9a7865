"""``energybus simulate voke``: Voke ESM played over RabbitMQ in the VCP format
(docs/adapters.md), checked against a real broker and the templates in mappings/voke.toml."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from click.testing import CliRunner

from energybus.adapters.signing import Signer
from energybus.cli import main
from energybus.errors import SourceError
from energybus.simulators.voke import (
    DEVICES,
    Stats,
    VokeMessages,
    VokeSimulator,
    declare,
    queue_names,
    routing_key,
)
from tools import services

ROOT = Path(__file__).resolve().parent.parent
KEY = "voke-test-signing-key-4f1d"
KEY_ENV = "ENERGYBUS_VOKE_SIGNING_KEY"
TEMPLATES: dict[str, Any] = tomllib.loads((ROOT / "mappings" / "voke.toml").read_text())[
    "templates"
]
COUNTERS = {"importEnergyKwh", "exportEnergyKwh", "chargedKwh", "dischargedKwh", "energyKwh"}
T0 = 1_700_000_000_000


def fields(template: str) -> set[str]:
    """The fields a device of ``template`` may send (mappings/voke.toml)."""
    return set(TEMPLATES[template]["signals"])


def energybus_exe() -> str:
    beside = Path(sys.executable).with_name("energybus")
    found = str(beside) if beside.exists() else shutil.which("energybus")
    assert found, "the energybus console script is not installed"
    return found


def decode(body: bytes) -> dict[str, Any]:
    message = json.loads(body)
    assert isinstance(message, dict)
    Signer([KEY]).verify(message)  # raises unless signed with the org's key
    return message


def command(
    *,
    org: str,
    key: str = KEY,
    plant: str = "P-1",
    device: str | None = "B1",
    action: str = "set_power",
    payload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A command as energybus sends it on vcp.{org}.command."""
    now = time.time_ns() // 1_000_000
    body: dict[str, Any] = {
        "v": 1,
        "type": "command",
        "id": str(uuid.uuid4()),
        "org": org,
        "plant": plant,
        "device": device,
        "ts": now,
        "cmdId": str(uuid.uuid4()),
        "action": action,
        "payload": {"kw": -2.5} if payload is None else payload,
        "expires_at": now + 30_000,
    }
    body["sig"] = Signer([key]).sign(body)
    return body


async def drain(channel: AbstractChannel, name: str) -> list[AbstractIncomingMessage]:
    """Every message waiting in queue ``name``, acknowledged."""
    queue = await channel.get_queue(name)
    out = []
    while (message := await queue.get(fail=False, timeout=5)) is not None:
        await message.ack()
        out.append(message)
    return out


async def delete_queues(url: str, org: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in queue_names(org=org):
            await channel.queue_delete(name)


@pytest.fixture
def org(rabbitmq: services.Service) -> Iterator[str]:
    """An organisation of its own; its queues are deleted afterwards."""
    slug = f"t-{uuid.uuid4().hex[:10]}"
    yield slug
    asyncio.run(delete_queues(rabbitmq.url, slug))


# Without a broker --------------------------------------------------------------------------


def test_every_builder_makes_a_signed_envelope_with_seq_per_plant() -> None:
    m = VokeMessages(org="acme", signing_key=KEY, plants=2, seed=1)
    built = [
        m.telemetry(plant="P-1", device=None, ts_ms=T0),
        m.telemetry(plant="P-2", device="P1", ts_ms=T0),
        m.status_answer(plant="P-1", device="B1", cmd_id="c1", ack=True, ts_ms=T0),
        m.status_answer(plant="P-1", device="B1", cmd_id="c2", ack=False, reason="no", ts_ms=T0),
        m.mode_change(plant="P-2", mode="BACKUP", ts_ms=T0),
        m.alarm(
            plant="P-1",
            device="B1",
            code="OVERTEMP",
            severity="critical",
            active=True,
            message="hot",
            ts_ms=T0,
        ),
        m.execution(plant="P-1", device="B1", cmd_id="c1", state="COMPLETED", ts_ms=T0),
    ]
    bodies = [decode(b.body) for b in built]
    for b, body in zip(built, bodies, strict=True):
        assert b.id == body["id"] and b.type == body["type"]
        assert b.routing_key == routing_key(org="acme", type=b.type)
        assert (body["v"], body["org"], body["ts"]) == (1, "acme", T0)
    assert [(x["plant"], x["seq"]) for x in bodies] == [
        ("P-1", 1),
        ("P-2", 1),
        ("P-1", 2),
        ("P-1", 3),
        ("P-2", 2),
        ("P-1", 4),
        ("P-1", 5),
    ]
    extra = [{k: v for k, v in x.items() if k not in {"id", "sig", "seq", "ts"}} for x in bodies]
    common = {"v": 1, "org": "acme"}
    assert extra[2:] == [
        {
            **common,
            "type": "status",
            "plant": "P-1",
            "device": "B1",
            "cmdId": "c1",
            "status": "ACK",
        },
        {
            **common,
            "type": "status",
            "plant": "P-1",
            "device": "B1",
            "cmdId": "c2",
            "status": "NACK",
            "reason": "no",
        },
        {
            **common,
            "type": "status",
            "plant": "P-2",
            "device": None,
            "event": "mode_change",
            "mode": "BACKUP",
        },
        {
            **common,
            "type": "alarm",
            "plant": "P-1",
            "device": "B1",
            "code": "OVERTEMP",
            "severity": "critical",
            "active": True,
            "message": "hot",
        },
        {
            **common,
            "type": "execution",
            "plant": "P-1",
            "device": "B1",
            "cmdId": "c1",
            "state": "COMPLETED",
        },
    ]
    assert bodies[0]["device"] is None and set(bodies[0]["values"]) <= fields("plant")
    assert set(bodies[1]["values"]) <= fields("pv")
    with pytest.raises(SourceError):
        Signer(["another key"]).verify(bodies[0])
    assert KEY not in repr(m) and all(KEY.encode() not in b.body for b in built)


def test_the_battery_follows_its_setpoint_and_counters_only_grow() -> None:
    m = VokeMessages(org="acme", signing_key=KEY, plants=1, seed=3)

    def values(minute: float, device: str | None = "B1", kind: Any = "realtime") -> Any:
        ts = T0 + int(minute * 60_000)
        return decode(m.telemetry(plant="P-1", device=device, ts_ms=ts, kind=kind).body)["values"]

    assert m.apply(plant="P-1", device="B1", action="set_power", payload={"kw": -2.5}) is None
    before = values(0, kind="meter")
    charging = [values(minute) for minute in range(1, 31)]
    after = values(30, kind="meter")
    assert all(abs(v["powerKw"] + 2.5) < 0.3 and v["state"] == 1 for v in charging)
    socs = [v["socPct"] for v in charging]
    assert socs == sorted(socs) and socs[-1] > socs[0]  # SoC follows the charging power
    assert abs(after["chargedKwh"] - before["chargedKwh"] - 2.5 * 29 / 60) < 0.15
    assert after["dischargedKwh"] == before["dischargedKwh"]

    assert m.apply(plant="P-1", device="B1", action="set_power", payload={"kw": 2.0}) is None
    discharging = [values(minute)["socPct"] for minute in range(31, 50)]
    assert discharging == sorted(discharging, reverse=True) and discharging[-1] < socs[-1]
    assert m.apply(plant="P-1", device="B1", action="stop", payload=None) is None
    stopped = values(51)
    assert (stopped["powerKw"], stopped["state"]) == (0, 0)

    meters = [values(60 * hour, device="M1", kind="meter")["energyKwh"] for hour in range(1, 6)]
    assert all(b > a for a, b in itertools.pairwise(meters))
    loads = {values(60 * 6 + minute, device="M1")["activePowerKw"] for minute in range(10)}
    assert len(loads) > 5  # power moves

    reasons = [
        m.apply(plant="P-1", device="B1", action="fly", payload=None),
        m.apply(plant="P-1", device="B1", action="set_power", payload={"watts": 1}),
        m.apply(plant="P-1", device="B1", action="set_power", payload={"kw": 1e6}),
        m.apply(plant="P-9", device="B1", action="stop", payload=None),
        m.apply(plant="P-1", device="X7", action="stop", payload=None),
    ]
    assert [str(r).split(":")[0] for r in reasons] == [
        "COMMAND_ACTION_NOT_IN_TEMPLATE",
        "bad_payload",
        "out_of_range",
        "unknown_plant",
        "unknown_target",
    ]


def test_print_config_is_the_site_configuration_of_the_plants() -> None:
    runner = CliRunner(env={KEY_ENV: None})  # needs no key
    result = runner.invoke(
        main, ["simulate", "voke", "--org", "acme", "--plants", "3", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    plants = tomllib.loads(result.stdout)["adapters"]["voke"]["orgs"]["acme"]["plants"]
    assert sorted(plants) == ["P-1", "P-2", "P-3"]
    for plant in plants.values():
        assert "template" not in plant  # the default, "plant"
        assert plant["targets"] == {
            "B1": {"template": "battery"},
            "M1": {"template": "meter"},
            "P1": {"template": "pv"},
        }
    assert {t["template"] for t in plants["P-1"]["targets"].values()} | {"plant"} <= set(TEMPLATES)


def test_without_a_signing_key_it_says_which_variable_and_exits_2() -> None:
    runner = CliRunner(env={KEY_ENV: None})
    result = runner.invoke(main, ["simulate", "voke", "--org", "acme"])
    assert result.exit_code == 2
    assert KEY_ENV in result.stderr and "signing key" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    other = runner.invoke(main, ["simulate", "voke", "--org", "acme", "--signing-key-env", "MY_K"])
    assert other.exit_code == 2 and "MY_K" in other.stderr
    bad = runner.invoke(main, ["simulate", "voke", "--org", "a.b"], env={KEY_ENV: KEY})
    assert bad.exit_code == 2 and "--org" in bad.output


def test_an_unreachable_broker_is_one_line_with_the_password_masked() -> None:
    port = services.free_port()
    url = f"amqp://guest:s3cret-pw@127.0.0.1:{port}/"
    result = CliRunner(env={KEY_ENV: KEY}).invoke(
        main, ["simulate", "voke", "--org", "acme", "--url", url]
    )
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error    cannot connect to amqp://guest:***@127.0.0.1:{port}/: ")
    assert "s3cret-pw" not in result.output and KEY not in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "password",
    [
        "s3cret/pw",  # the rest of the host part is "s3cret": no port yarl can read
        "7/s3cret-pw",  # "7" is a port: the rest would be the vhost, shown unmasked
        "7?s3cret-pw",
        "s3cret#pw",
        "s3cret@pw",
    ],
)
def test_a_password_not_percent_encoded_is_a_usage_error_that_shows_none_of_it(
    password: str,
) -> None:
    url = f"amqp://guest:{password}@127.0.0.1:{services.free_port()}/"
    result = CliRunner(env={KEY_ENV: KEY}).invoke(
        main, ["simulate", "voke", "--org", "acme", "--url", url]
    )
    assert result.exit_code == 2, result.output
    assert "must be percent-encoded" in result.stderr and "guest:***@" in result.stderr
    assert "s3cret" not in result.output and "Traceback" not in result.output


# Against RabbitMQ --------------------------------------------------------------------------


@pytest.mark.services
def test_a_wrong_password_is_one_line_and_exit_1(rabbitmq: services.Service) -> None:
    url = f"amqp://guest:not-the-password@{rabbitmq.host}:{rabbitmq.port}/"
    result = CliRunner(env={KEY_ENV: KEY}).invoke(
        main, ["simulate", "voke", "--org", "acme", "--url", url]
    )
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error    cannot connect to amqp://guest:***@{rabbitmq.host}:")
    assert "ACCESS_REFUSED" in line and "not-the-password" not in result.output


@pytest.mark.services
def test_declare_asserts_the_exchange_and_the_seven_bound_durable_queues(
    rabbitmq: services.Service, org: str
) -> None:
    names = queue_names(org=org)
    assert names == [
        f"vcp.{org}.event.telemetry",
        f"vcp.{org}.event.status",
        f"vcp.{org}.event.alarm",
        f"vcp.{org}.event.execution",
        f"vcp.{org}.command",
        f"vcp.{org}.config",
        f"vcp.{org}.schedule",
    ]

    async def scenario() -> None:
        connection = await aio_pika.connect(rabbitmq.url)
        async with connection:
            channel = await connection.channel()
            exchange = await declare(channel, org=org)
            await declare(channel, org=org)  # again: nothing changes
            for name in names:
                queue = await channel.get_queue(name, ensure=True)  # passive: it exists
                await exchange.publish(aio_pika.Message(name.encode()), routing_key=name)
                got = await queue.get(timeout=5)  # bound under its own name
                await got.ack()
                assert got.body == name.encode()
            # Durable: declaring it otherwise is refused by the broker.
            other = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await other.declare_queue(names[0], durable=False)
            other = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
                await other.declare_exchange("vcp", aio_pika.ExchangeType.DIRECT, durable=True)

    asyncio.run(scenario())


@pytest.mark.services
def test_a_counted_run_publishes_exactly_that_many_valid_telemetry_messages(
    rabbitmq: services.Service, org: str
) -> None:
    count, rate = 64, 400.0
    simulator = VokeSimulator(
        url=rabbitmq.url,
        org=org,
        signing_key=KEY,
        plants=2,
        rate=rate,
        meter_interval_s=0.05,
        alarm_every_s=None,
        mode_every_s=None,
        seed=11,
    )
    started = time.monotonic()
    stats = asyncio.run(simulator.run(count=count, duration_s=20))
    elapsed = time.monotonic() - started
    assert stats.published == {"telemetry": count, "status": 0, "alarm": 0, "execution": 0}
    assert elapsed >= (count - 1) / rate  # a steady schedule, not one burst

    async def collect() -> dict[str, list[AbstractIncomingMessage]]:
        connection = await aio_pika.connect(rabbitmq.url)
        async with connection:
            channel = await connection.channel()
            return {name: await drain(channel, name) for name in queue_names(org=org)}

    queues = asyncio.run(collect())
    telemetry = queues.pop(f"vcp.{org}.event.telemetry")
    assert len(telemetry) == count  # what was counted is what the broker holds
    assert all(messages == [] for messages in queues.values())
    seqs: dict[str, list[int]] = defaultdict(list)
    counters: dict[tuple[str, str | None, str], list[float]] = defaultdict(list)
    seen: set[tuple[str, str | None, str]] = set()
    now_ms = time.time_ns() // 1_000_000
    for message in telemetry:
        assert message.content_type == "application/json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        body = decode(message.body)
        assert message.message_id == body["id"] and uuid.UUID(body["id"]).version == 4
        assert (body["v"], body["type"], body["org"]) == (1, "telemetry", org)
        assert body["plant"] in ("P-1", "P-2") and body["device"] in DEVICES
        assert isinstance(body["ts"], int) and abs(body["ts"] - now_ms) < 60_000
        values = body["values"]
        assert values and set(values) <= fields(DEVICES[body["device"]])
        assert all(isinstance(v, int | float | bool | str) for v in values.values())
        if body["kind"] == "meter":
            assert set(values) <= COUNTERS
            assert all(isinstance(values[f], float) for f in values)  # kWh floats
            for name, value in values.items():
                counters[body["plant"], body["device"], name].append(value)
        else:
            assert body["kind"] == "realtime" and not set(values) & COUNTERS
        seqs[body["plant"]].append(body["seq"])
        seen.add((body["plant"], body["device"], body["kind"]))
    assert {k: v == list(range(1, len(v) + 1)) for k, v in seqs.items()} == {
        "P-1": True,
        "P-2": True,
    }
    devices = {(p, d) for p in ("P-1", "P-2") for d in DEVICES}
    assert {(p, d) for p, d, kind in seen if kind == "realtime"} == devices
    assert counters and {(p, d) for p, d, _ in counters} == devices  # one meter round at least
    assert all(v == sorted(v) for v in counters.values())


Answer = Literal["ack", "nack", "none"]


async def _answers(
    url: str, org: str, answer: Answer
) -> tuple[Stats, dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], int]:
    """Run a simulator, send it a forged and a valid command; its stats, the valid command,
    what came back on the status and execution queues, and the commands left queued."""
    stop, ready = asyncio.Event(), asyncio.Event()
    simulator = VokeSimulator(
        url=url,
        org=org,
        signing_key=KEY,
        rate=5.0,
        answer=answer,
        answer_delay_s=0.05,
        alarm_every_s=None,
        mode_every_s=None,
    )
    run = asyncio.create_task(simulator.run(stop=stop, duration_s=20, on_ready=ready.set))
    await asyncio.wait_for(ready.wait(), 10)
    good = command(org=org)
    forged = command(org=org, key="a key that is not the org's")
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange("vcp")
        for body in (forged, good):
            message = aio_pika.Message(
                json.dumps(body).encode(), content_type="application/json", message_id=body["id"]
            )
            await exchange.publish(message, routing_key=f"vcp.{org}.command")
        stats = simulator.stats
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            stats.commands == 2 and stats.acked + stats.nacked + stats.unanswered == 1
        ):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # anything else it would publish
        stop.set()
        stats = await run
        status = [decode(m.body) for m in await drain(channel, f"vcp.{org}.event.status")]
        execution = [decode(m.body) for m in await drain(channel, f"vcp.{org}.event.execution")]
        left = len(await drain(channel, f"vcp.{org}.command"))
    return stats, good, status, execution, left


@pytest.mark.services
@pytest.mark.parametrize("answer", ["ack", "nack", "none"])
def test_commands_are_answered_by_policy_and_forgeries_are_not(
    rabbitmq: services.Service, org: str, answer: Answer
) -> None:
    stats, good, status, execution, left = asyncio.run(_answers(rabbitmq.url, org, answer))
    assert (stats.commands, stats.bad_signatures, left) == (2, 1, 0)  # both taken off
    cmd = good["cmdId"]
    assert all(
        (m["org"], m["plant"], m["device"], m["cmdId"]) == (org, "P-1", "B1", cmd)
        for m in status + execution
    )
    if answer == "none":
        assert (stats.acked, stats.nacked, stats.unanswered) == (0, 0, 1)
        assert status == [] and execution == []
        return
    states = [m["state"] for m in execution]
    if answer == "ack":
        assert (stats.acked, stats.nacked) == (1, 0)
        assert [m["status"] for m in status] == ["ACK"] and "reason" not in status[0]
        assert states == ["RECEIVED", "COMPLETED"]
    else:
        assert (stats.acked, stats.nacked) == (0, 1)
        assert [m["status"] for m in status] == ["NACK"] and status[0]["reason"]
        assert states == ["RECEIVED", "FAILED"] and execution[1]["reason"] == status[0]["reason"]
    assert stats.published["status"] == 1 and stats.published["execution"] == 2


@pytest.mark.services
def test_a_tenant_vhost_gets_its_own_queues(rabbitmq: services.Service, org: str) -> None:
    vhost, password = f"voke-{org}", uuid.uuid4().hex
    services.rabbitmq_tenants(rabbitmq, {org: (password, vhost)})
    url = f"amqp://{org}:{password}@{rabbitmq.host}:{rabbitmq.port}/"
    try:
        simulator = VokeSimulator(
            url=url, org=org, signing_key=KEY, vhost=vhost, rate=200.0, alarm_every_s=None
        )
        assert password not in repr(simulator) and simulator.vhost == vhost
        stats = asyncio.run(simulator.run(count=5, duration_s=20))
        assert stats.published["telemetry"] == 5

        async def held() -> int | None:
            connection = await aio_pika.connect(f"{url}{vhost}")
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue(f"vcp.{org}.event.telemetry")
                return queue.declaration_result.message_count

        assert asyncio.run(held()) == 5
    finally:
        services.rabbitmqctl(rabbitmq, "delete_vhost", vhost)
        services.rabbitmqctl(rabbitmq, "delete_user", org)


def _read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not selector.select(deadline - time.monotonic()):
                break
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(marker):
                return lines
    process.kill()
    raise AssertionError(f"no {marker!r} line; got {lines} and {process.communicate()}")


@pytest.mark.services
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_command_cleanly_with_a_summary(
    rabbitmq: services.Service, org: str, signum: signal.Signals
) -> None:
    process = subprocess.Popen(
        [energybus_exe(), "simulate", "voke", "--org", org, "--url", rabbitmq.url, "--rate", "100"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_environ(), KEY_ENV: KEY},
    )
    try:
        head = _read_until(process, "ready", timeout=20)
        time.sleep(0.3)
        process.send_signal(signum)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    output = "".join(head) + out
    assert "Traceback" not in output + err and err == ""
    assert "guest:guest" not in output and KEY not in output
    assert "amqp://guest:***@" in head[-1]
    last = output.splitlines()[-1]
    assert last.startswith("stopped  published ") and "ACK" in last
    published = int(last.split()[2])
    assert published > 0

    async def held() -> int | None:
        connection = await aio_pika.connect(rabbitmq.url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(f"vcp.{org}.event.telemetry")
            return queue.declaration_result.message_count

    assert asyncio.run(held()) == published  # what it reports is what the broker took


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "ENERGYBUS_VOKE_URL"}
