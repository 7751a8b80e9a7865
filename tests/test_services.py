"""The service helper against a real Mosquitto, and the contract's messages through it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from energybus import CANONICAL_FILTERS, Renderer, decode_last, decode_meta, make_sample, matches
from tools import services


def test_start_records_pid_and_stop_kills_it(run_dir: Path) -> None:
    where = run_dir / "lifecycle"
    service = services.start("mosquitto", run_dir=where)
    try:
        assert services.running("mosquitto", where) == service
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
