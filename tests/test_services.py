"""The service helper against a real Mosquitto, and the contract's messages through it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from energybus import CANONICAL_FILTERS, Renderer, decode_last, decode_meta, make_sample, matches
from tools import services


def test_start_records_pid_and_stop_kills_it(run_dir: Path) -> None:
    where = run_dir / "lifecycle"
    service = services.start("mosquitto", run_dir=where)
    try:
        assert services.running("mosquitto", where) == service
        # A plain service's record is what it was before the secure mode, and loads.
        assert "secure" not in json.loads(service.state_file().read_text())
        assert not service.secure
        # Starting again reuses the running instance.
        assert services.start("mosquitto", run_dir=where).pid == service.pid
        assert (
            (where / "mosquitto" / "mosquitto.conf")
            .read_text()
            .startswith(f"listener {service.port} 127.0.0.1\n")
        )
    finally:
        assert services.stop("mosquitto", run_dir=where)
    with pytest.raises(ProcessLookupError):
        os.kill(service.pid, 0)
    assert services.running("mosquitto", where) is None
    assert not services.stop("mosquitto", run_dir=where)


def test_unknown_service_is_an_error(run_dir: Path) -> None:
    with pytest.raises(services.ServiceError, match="unknown service"):
        services.start("redis", run_dir=run_dir)


def test_rendered_messages_reach_a_subscriber_with_their_flags(
    mosquitto: services.Service,
) -> None:
    asyncio.run(_round_trip(mosquitto.port))


async def _round_trip(port: int) -> None:
    sample = make_sample(
        "vad",
        "storage",
        "battery-main",
        "soc",
        85.5,
        observed_at=datetime(2026, 3, 8, 10, 15, 12, tzinfo=UTC),
        unit="%",
    )
    messages = Renderer(source="test").render(sample)
    async with aiomqtt.Client("127.0.0.1", port, identifier="eb-pub") as publisher:
        for m in messages:
            await publisher.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
    # A subscriber that arrives later gets the retained meta and last, not the value.
    received: dict[str, tuple[bytes, bool]] = {}
    async with aiomqtt.Client("127.0.0.1", port, identifier="eb-sub") as subscriber:
        for stream in ("value", "last", "meta"):
            await subscriber.subscribe(CANONICAL_FILTERS[stream], qos=1)
        async with asyncio.timeout(5):
            async for incoming in subscriber.messages:
                topic = str(incoming.topic)
                assert matches("+/energy/+/+/+/+", topic)
                assert isinstance(incoming.payload, bytes)
                if not topic.startswith("vad/energy/storage/battery-main/soc/"):
                    continue  # the shared test broker holds other tests' retained series
                received[topic.rsplit("/", 1)[1]] = (incoming.payload, incoming.retain)
                if {"meta", "last"} <= received.keys():
                    break
    assert "value" not in received
    assert decode_meta(received["meta"][0]).unit == "%"
    assert decode_last(received["last"][0]).value == 85.5
    assert received["last"][1] and received["meta"][1]


def test_postgres_starts_with_a_database_to_use(run_dir: Path) -> None:
    import asyncpg

    async def query(url: str) -> object:
        connection = await asyncpg.connect(url)
        try:
            return await connection.fetchval("SELECT current_database()")
        finally:
            await connection.close()

    with services.started("postgres", run_dir=run_dir / "pg") as service:
        assert asyncio.run(query(service.url)) == "energybus"
    assert services.running("postgres", run_dir / "pg") is None


def test_rabbitmq_starts_and_moves_a_message(run_dir: Path) -> None:
    import aio_pika

    async def round_trip(url: str) -> bytes:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("vcp.test.telemetry", auto_delete=True)
            await channel.default_exchange.publish(aio_pika.Message(b"hello"), queue.name)
            incoming = await queue.get(timeout=10)
            await incoming.ack()
            return incoming.body

    with services.started("rabbitmq", run_dir=run_dir / "amqp") as service:
        assert asyncio.run(round_trip(service.url)) == b"hello"
    assert services.running("rabbitmq", run_dir / "amqp") is None


def test_a_taken_port_is_an_error_not_a_false_start(run_dir: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(services.ServiceError, match="already in use"):
            services.start("mosquitto", run_dir=run_dir / "taken", port=port)
    assert services.running("mosquitto", run_dir / "taken") is None


def test_a_server_that_dies_at_start_is_reported_with_its_log(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = run_dir / "broken"
    (where / "mosquitto").mkdir(parents=True, exist_ok=True)

    def broken(run_dir: Path, port: int) -> tuple[object, str]:
        import subprocess
        import sys

        log = run_dir / "mosquitto" / "mosquitto.log"
        log.write_text("Error: unknown configuration variable 'nonsense'.\n")
        process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        services._wait_for_port(port, process, 10, log)
        raise AssertionError("unreachable")

    monkeypatch.setitem(services.SERVICES, "mosquitto", broken)
    with pytest.raises(services.ServiceError, match="exited with status 3") as info:
        services.start("mosquitto", run_dir=where)
    assert "unknown configuration variable" in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands servers to their own users")
def test_a_run_dir_the_server_user_cannot_reach_moves_its_data(run_dir: Path) -> None:
    private = run_dir / "private"
    private.mkdir(mode=0o700, exist_ok=True)
    private.chmod(0o700)
    where = private / "run"
    with services.started("mosquitto", run_dir=where) as service:
        assert services.running("mosquitto", where) == service
        assert not (where / "mosquitto" / "mosquitto.conf").exists()
        asyncio.run(_round_trip(service.port))


def test_stop_kills_a_server_that_ignores_sigterm(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    def stubborn(run_dir: Path, port: int) -> tuple[object, str]:
        code = (
            "import signal, socket, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
            "time.sleep(600)\n"
        )
        process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        services._wait_for_port(port, process, 10, run_dir / "none.log")
        return process, f"tcp://127.0.0.1:{port}"

    monkeypatch.setitem(services.SERVICES, "mosquitto", stubborn)
    where = run_dir / "stubborn"
    (where / "mosquitto").mkdir(parents=True, exist_ok=True)
    service = services.start("mosquitto", run_dir=where)
    # Killed, and said so: what followed the timeout was a crash, not a stop.
    with pytest.raises(services.ServiceError, match="SIGTERM, so it was killed with SIGKILL"):
        services.stop("mosquitto", run_dir=where, timeout=1)
    with pytest.raises(ProcessLookupError):
        os.kill(service.pid, 0)
    assert services.running("mosquitto", where) is None


# What PostgreSQL logs when it starts on a cluster that was not shut down cleanly.
CRASH_RECOVERY = ("was interrupted", "not properly shut down", "automatic recovery", "redo ")


def _cluster_state(where: Path) -> str:
    """The state pg_controldata reads from the control file: "shut down" after a clean
    shutdown, "in production" while running and after a crash."""
    data = services._data_dir(where.resolve(), "postgres", "postgres") / "data"
    report = subprocess.run(
        [str(services._postgres_bin() / "pg_controldata"), str(data)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LC_ALL": "C"},
    ).stdout
    return next(
        line.split(":", 1)[1].strip()
        for line in report.splitlines()
        if line.startswith("Database cluster state:")
    )


def _start_logging(where: Path) -> tuple[services.Service, str]:
    """Start PostgreSQL; the service and what its log gained from this start."""
    log = services._data_dir(where.resolve(), "postgres", "postgres") / "postgres.log"
    before = log.stat().st_size
    service = services.start("postgres", run_dir=where)
    return service, log.read_bytes()[before:].decode(errors="replace")


async def _count_kept(url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM kept"))
    finally:
        await connection.close()


async def _keep_a_row_then(url: str, action: Callable[[], object]) -> None:
    """Commit a row, then run ``action`` with the client still connected."""
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        await connection.execute(
            "DROP TABLE IF EXISTS kept; CREATE TABLE kept (n int); INSERT INTO kept VALUES (1)"
        )
        action()
    finally:
        connection.terminate()


def test_postgres_stop_with_a_client_connected_is_a_clean_fast_shutdown(run_dir: Path) -> None:
    # SIGTERM is PostgreSQL's smart shutdown, which waits for this client: the helper
    # then ended in a SIGKILL (runuser's, two seconds on, as root; its own at the
    # timeout otherwise), and the next start recovered from a crash.
    where = run_dir / "pg-stop"
    service = services.start("postgres", run_dir=where)
    took: list[float] = []

    def stop() -> None:
        began = time.monotonic()
        assert services.stop("postgres", run_dir=where)
        took.append(time.monotonic() - began)

    try:
        asyncio.run(_keep_a_row_then(service.url, stop))
        assert took[0] < 10
        assert services.running("postgres", where) is None
        assert _cluster_state(where) == "shut down"
        service, log = _start_logging(where)
        assert "database system was shut down at" in log
        assert [line for line in log.splitlines() if any(m in line for m in CRASH_RECOVERY)] == []
        assert asyncio.run(_count_kept(service.url)) == 1
    finally:
        services.stop("postgres", run_dir=where)


def test_crash_kills_postgres_and_its_next_start_recovers(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = run_dir / "pg-crash"
    service = services.start("postgres", run_dir=where)
    try:
        crash = ["crash", "postgres", "--run-dir", str(where)]
        asyncio.run(_keep_a_row_then(service.url, lambda: services.main(crash)))
        assert capsys.readouterr().out == "postgres: killed with SIGKILL\n"
        assert services.running("postgres", where) is None
        with pytest.raises(ProcessLookupError):
            os.kill(service.pid, 0)
        assert _cluster_state(where) == "in production"
        service, log = _start_logging(where)
        assert "database system was not properly shut down" in log
        # Committed before the crash, so recovery keeps it.
        assert asyncio.run(_count_kept(service.url)) == 1
    finally:
        services.stop("postgres", run_dir=where)
    assert not services.crash("postgres", run_dir=where)


# Locked down (secure=True): each service refuses what it must, with real clients, and
# accepts a client that has everything (a certificate of the run directory's CA where
# asked, and the password of services.credentials).


def _tls(service: services.Service, *, ca: Path | None = None, cert: bool = True) -> ssl.SSLContext:
    """A client's TLS context: trusting the run directory's CA (or ``ca``), with its client
    certificate unless ``cert`` is false."""
    made = services.pki_of(service)
    context = ssl.create_default_context(cafile=str(ca or made.ca))
    if cert:
        context.load_cert_chain(made.client_cert, made.client_key)
    return context


class _Mqtt:
    """An MQTT 5 client (paho, on its own network thread): the CONNACK's reason code
    (None when the broker closed the connection without one) and each PUBACK's."""

    def __init__(self, client: paho.Client) -> None:
        self.client = client
        self.connack: int | None = None
        self.refused: Exception | None = None  # by the client's own TLS handshake
        self.answered = threading.Event()
        self.pubacks: dict[int, int] = {}
        self.acked = threading.Condition()

    def on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, _: Any
    ) -> None:
        self.connack = reason.value
        self.answered.set()

    def on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, _: Any
    ) -> None:
        self.answered.set()

    def on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, _: Any) -> None:
        with self.acked:
            self.pubacks[mid] = reason.value
            self.acked.notify_all()

    def puback(self, topic: str) -> int:
        """The reason code of the broker's PUBACK for a QoS 1 publish on ``topic``."""
        mid = self.client.publish(topic, b"x", qos=1).mid
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.pubacks, timeout=10)
            return self.pubacks[mid]


@contextlib.contextmanager
def _mqtt(
    service: services.Service,
    context: ssl.SSLContext | None,
    user: str | None = None,
    password: str | None = None,
) -> Iterator[_Mqtt]:
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
    )
    session = _Mqtt(client)
    client.on_connect = session.on_connect
    client.on_disconnect = session.on_disconnect
    client.on_publish = session.on_publish
    if context is not None:
        client.tls_set_context(context)
    if user is not None:
        client.username_pw_set(user, password)
    try:
        client.connect(service.host, service.port)
    except (ssl.SSLError, OSError) as exc:
        session.refused = exc
        yield session
        return
    client.loop_start()
    try:
        # TLS 1.3: a client certificate is refused after the client's handshake ended.
        assert session.answered.wait(10), "no CONNACK and no disconnection within 10 s"
        yield session
    finally:
        client.disconnect()
        client.loop_stop()


def _connack(
    service: services.Service,
    context: ssl.SSLContext | None,
    user: str | None = None,
    password: str | None = None,
) -> int | None:
    with _mqtt(service, context, user, password) as session:
        return session.connack


SUCCESS, NOT_AUTHORIZED = 0x00, 0x87
"""MQTT 5 reason codes. Mosquitto 2.0 answers a wrong password, an unknown user and an
anonymous client with 0x87 (Not authorized) rather than 0x86 (Bad user name or
password), and a publish outside a client's ACL with a PUBACK of 0x87."""


@pytest.fixture
def fresh_secure_mosquitto(run_dir: Path) -> Iterator[services.Service]:
    """A secure Mosquitto of this test's own: the session's has served the whole suite
    (persistent sessions expiring, reloads), and Mosquitto 2.0.11 has died once, of a
    plain connection refused on its TLS port, after such a history."""
    where = run_dir / f"secure-{uuid.uuid4().hex[:8]}"
    with services.started("mosquitto", run_dir=where, secure=True) as broker:
        yield broker


def test_secure_mosquitto_wants_tls_a_client_certificate_and_a_password(
    fresh_secure_mosquitto: services.Service,
) -> None:
    broker = fresh_secure_mosquitto
    password = services.credentials(broker)["admin"]
    made = services.pki_of(broker)
    expired = _tls(broker, cert=False)
    expired.load_cert_chain(made.expired_client_cert, made.expired_client_key)
    assert broker.url == f"mqtts://127.0.0.1:{broker.port}"
    # Codes first, then asserted: a failure shows the code, never the password.
    codes = {
        "everything": _connack(broker, _tls(broker), "admin", password),
        "plain TCP": _connack(broker, None, "admin", password),
        "no client certificate": _connack(broker, _tls(broker, cert=False), "admin", password),
        "expired client certificate": _connack(broker, expired, "admin", password),
        "wrong password": _connack(broker, _tls(broker), "admin", "not-" + password),
        "anonymous": _connack(broker, _tls(broker)),
    }
    # A refused login is a CONNACK of 0x87 and then the broker closes the connection;
    # on a busy machine the close can reach paho first, so no CONNACK is seen.
    refused = {NOT_AUTHORIZED, None}
    assert codes["wrong password"] in refused and codes["anonymous"] in refused, codes
    assert {k: v for k, v in codes.items() if k not in ("wrong password", "anonymous")} == {
        "everything": SUCCESS,
        "plain TCP": None,  # closed: no CONNACK
        "no client certificate": None,
        "expired client certificate": None,
    }
    with _mqtt(broker, _tls(broker, ca=made.other_ca), "admin", password) as session:
        assert isinstance(session.refused, ssl.SSLCertVerificationError)
        assert session.connack is None


def test_secure_mosquitto_users_and_acl_are_replaced_and_reloaded(run_dir: Path) -> None:
    where = run_dir / "secure-acl"
    with services.started("mosquitto", run_dir=where, secure=True) as broker:
        admin = services.credentials(broker)["admin"]
        with _mqtt(broker, _tls(broker), "admin", admin) as session:
            assert session.puback("site-b/energy/grid/m/p/value") != NOT_AUTHORIZED
        users = {"admin": admin, "worker": "worker-password"}
        services.mosquitto_users(
            broker,
            users,
            "user admin\ntopic readwrite #\n\nuser worker\ntopic write site-a/energy/#\n",
        )
        assert services.credentials(broker) == users
        with _mqtt(broker, _tls(broker), "worker", "worker-password") as session:
            assert session.connack == SUCCESS
            assert session.puback("site-a/energy/grid/m/p/value") < 0x80
            assert session.puback("site-b/energy/grid/m/p/value") == NOT_AUTHORIZED
        # Exactly these users: a user left out is refused.
        services.mosquitto_users(broker, {"worker": "worker-password"}, "user worker\n")
        refused = _connack(broker, _tls(broker), "admin", admin)
        assert refused == NOT_AUTHORIZED
        with pytest.raises(services.ServiceError, match="cannot go in a password file"):
            services.mosquitto_users(broker, {"a:b": "x"}, "")
    # A later start in the run directory keeps them.
    with services.started("mosquitto", run_dir=where, secure=True) as broker:
        assert services.credentials(broker) == {"worker": "worker-password"}
        with _mqtt(broker, _tls(broker), "worker", "worker-password") as session:
            assert session.puback("site-a/energy/grid/m/p/value") == NOT_AUTHORIZED


def test_a_secure_record_keeps_its_mode_and_no_secret(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = run_dir / "secure-cli"
    assert services.main(["up", "--secure", "mosquitto", "--run-dir", str(where)]) == 0
    shown = json.loads(capsys.readouterr().out)
    try:
        service = services.running("mosquitto", where)
        assert service is not None and service.secure
        assert shown == json.loads(service.state_file().read_text())
        assert shown["secure"] is True
        stored = where / "mosquitto" / "credentials.json"
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
        (password,) = services.credentials(service).values()
        assert password not in service.state_file().read_text()
        assert password not in service.url
        # The same run directory cannot hold a plain one beside it.
        with pytest.raises(services.ServiceError, match="a secure mosquitto already runs"):
            services.start("mosquitto", run_dir=where)
    finally:
        assert services.main(["down", "mosquitto", "--run-dir", str(where)]) == 0
    assert capsys.readouterr().out == "mosquitto: stopped\n"


def test_a_run_directory_keeps_the_mode_of_its_data(tmp_path: Path) -> None:
    """PostgreSQL's and RabbitMQ's data outlive their configuration (roles, password
    method, users): a start in the other mode is refused, not half applied."""
    data = tmp_path / "postgres" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    with pytest.raises(services.ServiceError, match="holds a plain postgres"):
        services._check_mode(tmp_path, "postgres", True, data / "PG_VERSION")
    services._check_mode(tmp_path, "postgres", False, data / "PG_VERSION")
    services._save_credentials(tmp_path, "postgres", {"energybus": "x"})
    with pytest.raises(services.ServiceError, match="start it with secure=True"):
        services._check_mode(tmp_path, "postgres", False, data / "PG_VERSION")
    services._check_mode(tmp_path, "postgres", True, data / "PG_VERSION")
    with pytest.raises(services.ServiceError, match="nodered has no secure mode"):
        services.start("nodered", run_dir=tmp_path, secure=True)
    with pytest.raises(services.ServiceError, match="not postgres's"):
        services.start("postgres", run_dir=tmp_path, acl="topic read #")


async def _pg(url: str, **options: Any) -> tuple[object, ...]:
    import asyncpg

    connection = await asyncpg.connect(url, **options)
    try:
        row = await connection.fetchrow(
            "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
        assert row is not None
        return tuple(row)
    finally:
        await connection.close()


def test_secure_postgres_wants_tls_and_the_password(secure_postgres: services.Service) -> None:
    import asyncpg

    password = services.credentials(secure_postgres)["energybus"]
    made = services.pki_of(secure_postgres)
    verified = f"{secure_postgres.url}?sslmode=verify-full&sslrootcert={made.ca}"
    assert asyncio.run(_pg(verified, password=password)) == ("energybus", True)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        asyncio.run(_pg(secure_postgres.url, password=password, ssl=False))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        asyncio.run(_pg(f"{secure_postgres.url}?sslmode=disable", password=password))
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(_pg(verified, password="not-" + password))
    other = f"{secure_postgres.url}?sslmode=verify-full&sslrootcert={made.other_ca}"
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(_pg(other, password=password))
    # A restart keeps the cluster, its password and its lock-down.
    where = Path(secure_postgres.run_dir)
    with pytest.raises(services.ServiceError, match="a secure postgres already runs"):
        services.start("postgres", run_dir=where)
    assert services.stop("postgres", run_dir=where)
    services.start("postgres", run_dir=where, port=secure_postgres.port, secure=True)
    assert services.credentials(secure_postgres)["energybus"] == password
    assert asyncio.run(_pg(verified, password=password)) == ("energybus", True)
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        asyncio.run(_pg(secure_postgres.url, password=password, ssl=False))


async def _amqp(url: str, context: ssl.SSLContext | None, queue: str | None = None) -> None:
    """Connect; with ``queue``, declare it and move a message through it."""
    import aio_pika

    connection = await aio_pika.connect(url, ssl_context=context, timeout=20)
    async with connection:
        if queue is None:
            return
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, auto_delete=True)
        await channel.default_exchange.publish(aio_pika.Message(b"hello"), declared.name)
        incoming = await declared.get(timeout=10)
        await incoming.ack()
        assert incoming.body == b"hello"


def test_secure_rabbitmq_wants_tls_and_a_tenant(secure_rabbitmq: services.Service) -> None:
    import aio_pika
    from aio_pika.exceptions import AMQPConnectionError, ChannelClosed

    broker = secure_rabbitmq
    assert broker.url == f"amqps://127.0.0.1:{broker.port}/"
    assert services.credentials(broker) == {}
    services.rabbitmq_tenants(
        broker,
        {"full": ("full-password", "full-org"), "narrow": ("narrow-password", "narrow-org")},
        permissions={"narrow": ("^$", ".*", ".*")},  # may declare nothing
    )
    host = f"{broker.host}:{broker.port}"
    context = _tls(broker, cert=False)
    asyncio.run(_amqp(f"amqps://full:full-password@{host}/full-org", context, "telemetry"))
    with pytest.raises(ChannelClosed, match="ACCESS_REFUSED"):
        asyncio.run(_amqp(f"amqps://narrow:narrow-password@{host}/narrow-org", context, "q"))
    # A client certificate, when shown, must be of the CA.
    asyncio.run(_amqp(f"amqps://full:full-password@{host}/full-org", _tls(broker)))
    with pytest.raises(AMQPConnectionError):  # plain TCP
        asyncio.run(_amqp(f"amqp://full:full-password@{host}/full-org", None))
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        asyncio.run(_amqp(f"amqps://guest:guest@{host}/", context))
    other = _tls(broker, ca=services.pki_of(broker).other_ca, cert=False)
    with pytest.raises(AMQPConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(_amqp(f"amqps://full:full-password@{host}/full-org", other))
    assert "guest" not in services.rabbitmqctl(broker, "list_users")
