"""The worker consuming Voke's queues on a real RabbitMQ, publishing on a real Mosquitto
and storing in a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.voke import VokeOptions
from tests.voke import Org, Responder, declare_org, new_orgs, publish, queue_depth
from tests.workers import (
    Collector,
    WorkerProcess,
    init_schema,
    publish as mqtt_publish,
    query,
    wait_rows,
    write_config,
)
from tools import services
from tools.services import Service

pytestmark = pytest.mark.services

PLANT = """[adapters.voke.orgs.{slug}.plants.P-1]
site = "{site}"
[adapters.voke.orgs.{slug}.plants.P-1.targets]
B1 = {{ template = "battery" }}
"""


def _site() -> str:
    return f"v-{uuid.uuid4().hex[:8]}"


class VokeWorker:
    """A worker on ``orgs`` (one plant each, on a site of its own) with its config."""

    def __init__(
        self,
        tmp_path: Path,
        mosquitto: Service,
        postgres: Service,
        orgs: list[Org],
        extra: str = "",
    ) -> None:
        init_schema(postgres.url)
        self.sites = {org.slug: _site() for org in orgs}
        tables = "".join(
            org.config(PLANT.format(slug=org.slug, site=self.sites[org.slug])) for org in orgs
        )
        self.config = write_config(
            tmp_path / "site.toml",
            mqtt=mosquitto,
            dsn=postgres.url,
            client_id=f"w-{uuid.uuid4().hex[:8]}",
            extra=f"[adapters.voke]\n{extra}{tables}",
        )
        self.log = tmp_path / "worker.log"
        self.environ = {k: v for org in orgs for k, v in org.environ().items()}
        self.orgs = orgs
        self.secrets = [s for org in orgs for s in (org.api_key, org.signing_key)]

    def start(self, *, connected: bool = True) -> WorkerProcess:
        """Start the worker; unless told otherwise, wait until every org is connected."""
        os.environ.update(self.environ)
        before = self.log.read_text().count("consuming 4 queues") if self.log.exists() else 0
        worker = WorkerProcess(self.config, self.log).start()
        if connected:
            worker.wait_for_log("consuming 4 queues", count=before + len(self.orgs), timeout=40)
        return worker

    def expected(self, org: Org, bodies: list[bytes]) -> int:
        """Samples the messages hold, through the same translation."""
        options = msgspec.convert(
            {
                "orgs": {
                    org.slug: {
                        "api_key": "x",
                        "signing_keys": [org.signing_key],
                        "plants": {
                            "P-1": {
                                "site": self.sites[org.slug],
                                "targets": {"B1": {"template": "battery"}},
                            }
                        },
                    }
                }
            },
            VokeOptions,
        )
        pipeline = Pipeline(create_adapter("voke", options=options))
        now = datetime.now(UTC)
        topic = f"vcp.{org.slug}.event.telemetry"
        return sum(len(pipeline.feed(topic, b, received_at=now).samples) for b in bodies)

    def rows(self, org: Org) -> str:
        return f"SELECT count(*) FROM energybus.measurements WHERE site = '{self.sites[org.slug]}'"


def _telemetry(org: Org, count: int, start_ms: int | None = None, *, pad: int = 0) -> list[bytes]:
    """``pad``: a field the adapter does not read, of that many bytes (a large message)."""
    start = start_ms if start_ms is not None else int(time.time() * 1000) - count
    extra = {"pad": "x" * pad} if pad else {}
    return [
        org.envelope(
            "telemetry",
            "P-1",
            "B1",
            start + i,
            kind="realtime",
            values={"socPct": 20 + i % 60, "powerKw": (i % 40) - 20.0, "voltageV": 700 + i % 9},
            **extra,
        )
        for i in range(count)
    ]


def test_two_orgs_on_their_vhosts_reach_the_bus_and_the_historian_and_poison_is_acked(
    tmp_path: Path, mosquitto: Service, postgres: Service, rabbitmq: Service
) -> None:
    acme, beta = new_orgs(rabbitmq, 2)
    setup = VokeWorker(tmp_path, mosquitto, postgres, [acme, beta])
    worker = setup.start()
    site = setup.sites[acme.slug]
    collector = Collector(
        mosquitto, [f"{site}/energy/storage/+/soc/last", "energybus/dead_letter/voke"]
    )
    try:
        bodies = {org.slug: _telemetry(org, 200) for org in (acme, beta)}
        for org in (acme, beta):
            assert publish(org, "telemetry", bodies[org.slug]) == 200
        publish(acme, "telemetry", [b'{"v": 1, "type": "telemetry", "broken'])
        for org in (acme, beta):
            expected = setup.expected(org, bodies[org.slug])
            assert expected == 600
            assert wait_rows(postgres.url, setup.rows(org), expected) == expected
        soc = f"{site}/energy/storage/p-1-b1/soc/last"
        collector.wait_for(lambda topics: soc in topics)
        collector.wait_for(lambda topics: "energybus/dead_letter/voke" in topics)
        letters = collector.payloads("energybus/dead_letter/voke")
        assert len(letters) == 1
        letter = msgspec.json.decode(letters[0])
        assert letter["reason"] == "malformed_json"
        assert letter["topic"] == f"vcp.{acme.slug}.event.telemetry"
        # Everything acknowledged, the poison message too: nothing waits, nothing loops.
        deadline = time.monotonic() + 10
        while queue_depth(acme, f"vcp.{acme.slug}.event.telemetry") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue_depth(acme, f"vcp.{acme.slug}.event.telemetry") == 0
        assert worker.alive()
        assert worker.stop() == 0
        log = setup.log.read_text()
        assert "Traceback" not in log
        assert not [s for s in setup.secrets if s in log]
    finally:
        collector.close()
        if worker.alive():
            worker.stop(signal.SIGKILL)


def test_commands_are_confirmed_rejected_and_expired_through_voke(
    tmp_path: Path, mosquitto: Service, postgres: Service, rabbitmq: Service
) -> None:
    (org,) = new_orgs(rabbitmq, 1)

    def answer(command: dict[str, Any]) -> dict[str, Any] | None:
        kw = command["payload"]["kw"]
        if kw > 0:
            return {"cmdId": command["cmdId"], "status": "ACK"}
        if kw < 0:
            return {"cmdId": command["cmdId"], "status": "NACK", "reason": "SoC too low"}
        return None  # silence: energybus expires it

    setup = VokeWorker(tmp_path, mosquitto, postgres, [org], extra="command_timeout_s = 2\n")
    responder = Responder(org, answer)
    worker = setup.start()
    site = setup.sites[org.slug]
    topic = f"{site}/energy/storage/p-1-b1/power_setpoint/set"
    sql = (
        "SELECT value::text, state, response_status, reason, sent_at IS NOT NULL"
        f" FROM energybus.command_logs WHERE site = '{site}' ORDER BY accepted_at"
    )
    try:
        for value in (1500, -800, 0):
            mqtt_publish(mosquitto, [(topic, str(value).encode())])
            time.sleep(0.3)
        deadline = time.monotonic() + 30
        rows: list[Any] = []
        while time.monotonic() < deadline:
            rows = query(postgres.url, sql)
            if len(rows) == 3 and all(r[1] != "sent" and r[1] != "accepted" for r in rows):
                break
            time.sleep(0.2)
        assert [tuple(r)[:4] for r in rows] == [
            ("1500", "confirmed", "ACK", None),
            ("-800", "rejected", "NACK", "the source answered 'NACK': SoC too low"),
            ("0", "expired", None, "no answer within 0:00:02"),
        ]
        # The broker confirmed the unanswered command (an answer may overtake the
        # confirmation, so the others may have an outcome without a sent_at).
        assert rows[2][4] is True
        assert [c["payload"] for c in responder.commands] == [
            {"kw": 1.5},
            {"kw": -0.8},
            {"kw": 0},
        ]
        confirmed = query(
            postgres.url,
            "SELECT value FROM energybus.measurements WHERE site = $1"
            " AND metric_name = 'power_setpoint'",
            site,
        )
        assert [r[0] for r in confirmed] == [1500.0]
        assert worker.stop() == 0
    finally:
        responder.close()
        if worker.alive():
            worker.stop(signal.SIGKILL)


def test_an_unroutable_command_is_rejected_with_the_reason(
    tmp_path: Path, mosquitto: Service, postgres: Service, rabbitmq: Service
) -> None:
    (org,) = new_orgs(rabbitmq, 1)
    setup = VokeWorker(tmp_path, mosquitto, postgres, [org])
    worker = setup.start()

    async def unbind() -> None:
        connection = await org.connect()
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(f"vcp.{org.slug}.command")

    asyncio.run(unbind())
    site = setup.sites[org.slug]
    try:
        mqtt_publish(mosquitto, [(f"{site}/energy/storage/p-1-b1/stop/set", b"true")])
        sql = f"SELECT state, reason FROM energybus.command_logs WHERE site = '{site}'"
        deadline = time.monotonic() + 20
        rows: list[Any] = []
        while time.monotonic() < deadline and not (rows and rows[0][0] == "rejected"):
            rows = query(postgres.url, sql)
            time.sleep(0.2)
        assert rows and rows[0][0] == "rejected"
        assert "could not route it" in rows[0][1]
        assert worker.alive()
        assert worker.stop() == 0
    finally:
        if worker.alive():
            worker.stop(signal.SIGKILL)


def test_wrong_credentials_and_a_missing_queue_are_clear_and_retried(
    tmp_path: Path, mosquitto: Service, postgres: Service, rabbitmq: Service
) -> None:
    good, missing = new_orgs(rabbitmq, 2, declared=False)
    real_key = good.api_key
    good.api_key = "wrong-" + uuid.uuid4().hex
    setup = VokeWorker(tmp_path, mosquitto, postgres, [good, missing])
    worker = setup.start(connected=False)
    try:
        worker.wait_for_log(f"voke org {good.slug}: cannot connect", timeout=30)
        worker.wait_for_log(f"voke org {missing.slug}: cannot connect", timeout=30)
        log = setup.log.read_text()
        assert f"the broker refused user '{good.slug}'" in log
        assert f"queue vcp.{missing.slug}.event.telemetry is missing" in log
        assert "enable Voke ESM (or trading) for the organisation in Voke" in log
        # Voke enables ESM for the org: the worker finds the queues at its next try.
        asyncio.run(declare_org(missing))
        worker.wait_for_log(f"voke org {missing.slug}: connected", timeout=60)
        # Voke declares the org's queues (with the key it knows), then the key is rotated
        # to what the configuration holds: the next try succeeds.
        asyncio.run(declare_org(Org(good.slug, real_key, good.signing_key, good.vhost, rabbitmq)))
        services.rabbitmq_tenants(rabbitmq, {good.slug: (good.api_key, good.vhost)})
        worker.wait_for_log(f"voke org {good.slug}: connected", timeout=60)
        assert worker.stop() == 0
        log = setup.log.read_text()
        # Tried again and again with backoff, and each state said once.
        assert log.count(f"voke org {good.slug}: cannot connect") == 1
        assert log.count(f"voke org {missing.slug}: cannot connect") == 1
        assert "Traceback" not in log
        assert real_key not in log
        assert not [s for s in setup.secrets if s in log]
    finally:
        if worker.alive():
            worker.stop(signal.SIGKILL)


def test_rabbitmq_restart_and_worker_sigkill_under_load_store_every_sample_once(
    tmp_path: Path, mosquitto: Service, postgres: Service, rabbitmq: Service
) -> None:
    (org,) = new_orgs(rabbitmq, 1)
    setup = VokeWorker(tmp_path, mosquitto, postgres, [org])
    worker = setup.start()
    bodies = _telemetry(org, 3000)
    expected = setup.expected(org, bodies)
    sent: list[int] = []

    def load() -> None:
        for start in range(0, len(bodies), 100):
            sent.append(publish(org, "telemetry", bodies[start : start + 100], retry_s=60))
            time.sleep(0.05)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.0)
        services.stop("rabbitmq", run_dir=Path(rabbitmq.run_dir))
        time.sleep(1.0)
        services.start("rabbitmq", run_dir=Path(rabbitmq.run_dir), port=rabbitmq.port)
        worker.wait_for_log("connected to", count=2, timeout=60)
        time.sleep(1.0)
        assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
        worker = setup.start()
        thread.join(180)
        assert sum(sent) >= len(bodies)
        assert wait_rows(postgres.url, setup.rows(org), expected, timeout=90) == expected
        time.sleep(1.0)
        assert query(postgres.url, setup.rows(org))[0][0] == expected
        assert worker.stop() == 0
        assert "Traceback" not in setup.log.read_text()
    finally:
        thread.join(1)
        if worker.alive():
            worker.stop(signal.SIGKILL)
        if services.running("rabbitmq", Path(rabbitmq.run_dir).resolve()) is None:
            services.start("rabbitmq", run_dir=Path(rabbitmq.run_dir), port=rabbitmq.port)


@pytest.mark.parametrize("pad", [0, 4000], ids=["small", "large"])
def test_a_redelivery_of_a_message_still_in_hand_is_not_handled_twice(
    tmp_path: Path, mosquitto: Service, postgres: Service, rabbitmq: Service, pad: int
) -> None:
    """The AMQP connection drops while messages are handled but not yet acknowledged
    (the bus holds their PUBACKs); the broker redelivers them. They are acknowledged once
    the first handling is done, not handled again (which the replay guard would refuse as
    ``replayed``), and every sample is stored once. A large message is recognized by its
    digest, a small one by its body."""
    (org,) = new_orgs(rabbitmq, 1)
    setup = VokeWorker(tmp_path, mosquitto, postgres, [org])
    worker = setup.start()
    letters = Collector(mosquitto, ["energybus/dead_letter/#"])
    bodies = _telemetry(org, 50, pad=pad)
    expected = setup.expected(org, bodies)
    try:
        os.kill(mosquitto.pid, signal.SIGSTOP)  # no PUBACKs: nothing can be acknowledged
        try:
            assert publish(org, "telemetry", bodies) == 50
            time.sleep(1.0)  # handed over, waiting for the bus
            services.rabbitmqctl(rabbitmq, "close_all_connections", "--vhost", org.vhost, "test")
            worker.wait_for_log("connection lost", timeout=20)
            worker.wait_for_log("consuming 4 queues", count=2, timeout=30)
            time.sleep(1.0)  # the redeliveries arrive
        finally:
            os.kill(mosquitto.pid, signal.SIGCONT)
        assert wait_rows(postgres.url, setup.rows(org), expected) == expected
        deadline = time.monotonic() + 10
        while queue_depth(org, f"vcp.{org.slug}.event.telemetry") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert queue_depth(org, f"vcp.{org.slug}.event.telemetry") == 0
        time.sleep(0.5)
        assert letters.messages == []
        assert query(postgres.url, setup.rows(org))[0][0] == expected
        assert worker.stop() == 0
    finally:
        letters.close()
        if worker.alive():
            worker.stop(signal.SIGKILL)


def test_a_vhost_the_key_may_not_use_and_a_missing_exchange_are_clear_errors(
    tmp_path: Path, mosquitto: Service, postgres: Service, rabbitmq: Service
) -> None:
    """Two more ways a bundle can be wrong, each one line naming the org and what to
    check, retried, and the worker going on with its other sources."""
    elsewhere, bare = new_orgs(rabbitmq, 2)
    other_vhost = new_orgs(rabbitmq, 1, declared=False)[0].vhost
    elsewhere.vhost = other_vhost  # its key has no permission there

    async def without_exchange() -> None:
        connection = await bare.connect()
        async with connection:
            await (await connection.channel()).exchange_delete("vcp")

    asyncio.run(without_exchange())
    setup = VokeWorker(tmp_path, mosquitto, postgres, [elsewhere, bare])
    worker = setup.start(connected=False)
    try:
        worker.wait_for_log(f"voke org {elsewhere.slug}: cannot connect", timeout=30)
        worker.wait_for_log(f"voke org {bare.slug}: cannot connect", timeout=30)
        assert worker.alive()
        assert worker.stop() == 0
        log = setup.log.read_text()
        assert (
            f"the broker refused vhost '{other_vhost}' to user '{elsewhere.slug}':"
            " check the key's vhost" in log
        )
        assert f"exchange 'vcp' does not exist on vhost {bare.vhost}" in log
        assert "Traceback" not in log
        assert not [s for s in setup.secrets if s in log]
    finally:
        if worker.alive():
            worker.stop(signal.SIGKILL)
