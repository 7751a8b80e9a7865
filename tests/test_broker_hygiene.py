"""A worker that is gone does not leave the broker hoarding the bus for it.

The bus session (``<client_id>-bus``, other publishers' canonical values) expires after
``mqtt.ingest_session_expiry_s``, the source session keeps ``session_expiry_s``; without
bus ingest the bus session is not kept at all; ``energybus retire`` drops both sessions
of a stopped worker and refuses a running one. Against the real Mosquitto the tests
start: a session's existence is read from CONNACK's session-present flag.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from benchmarks.adapters import ven_messages
from energybus.cli.app import main
from energybus.errors import MappingError
from energybus.worker import load_config
from energybus.worker.bus import BusClient, Received
from tests.workers import (
    ENERGYBUS,
    Collector,
    WorkerProcess,
    init_schema,
    publish,
    wait_rows,
    write_config,
)
from tools import services
from tools.services import Service

INGEST_EXPIRY = 8
"""Seconds: long enough to restart a worker inside it, short enough to wait out."""


def _site() -> str:
    return f"h-{uuid.uuid4().hex[:8]}"


def _value(site: str, meter: str, value: float, minute: int) -> tuple[str, bytes]:
    """A canonical value from another publisher (Profile B: its own observation time)."""
    body = {"value": value, "unit": "W", "observed_at": f"2026-11-01T00:{minute:02d}:00Z"}
    return f"{site}/energy/grid/{meter}/active_power/value", json.dumps(body).encode()


def _ven_worker(tmp_path: Path, mosquitto: Service, site: str, dsn: str | None = None) -> Path:
    """The configuration of a worker with the VEN adapter on ``site``, client id ``w-<site>``."""
    return write_config(
        tmp_path / "site.toml",
        mqtt=mosquitto,
        dsn=dsn,
        client_id=f"w-{site}",
        extra=f'[adapters.ven]\nsite = "{site}"\n',
    )


def _set(config: Path, section: str, key: str, value: str) -> None:
    """Set ``key`` in ``[section]`` of a file that write_config wrote, whatever it held."""
    lines = [x for x in config.read_text().splitlines() if not x.startswith(f"{key} =")]
    lines.insert(lines.index(f"[{section}]") + 1, f"{key} = {value}")
    config.write_text("\n".join(lines) + "\n")


def _resume(mqtt: Service, client_id: str) -> tuple[bool, list[str]]:
    """Connect as ``client_id`` with Clean Start 0: whether the broker had a session, and
    the topics of everything it held for it (a marker this connection publishes to
    itself arrives after all of that). Session Expiry 0: the session ends here."""

    async def main() -> tuple[bool, list[str]]:
        marker = f"hygiene/marker/{uuid.uuid4().hex}"
        marked = asyncio.Event()
        topics: list[str] = []

        def on_message(received: Received) -> None:
            if received.topic == marker:
                marked.set()
            else:
                topics.append(received.topic)

        def on_puback(token: Any, reason: int) -> None:
            pass

        client = BusClient(on_message=on_message, on_puback=on_puback, max_inflight=10)
        await client.connect(host=mqtt.host, port=mqtt.port, client_id=client_id, clean_start=False)
        present = client.session_present
        await client.subscribe([marker], no_local=False)
        client.publish(marker, b"", 1, False, None)
        client.flush()
        await asyncio.wait_for(marked.wait(), 10)
        await client.disconnect()
        return present, topics

    return asyncio.run(main())


def _broker_log(mqtt: Service) -> Path:
    """The broker's log file, from the configuration its command line names."""
    args = Path(f"/proc/{mqtt.pid}/cmdline").read_bytes().split(b"\0")
    conf = Path(args[args.index(b"-c") + 1].decode())
    for line in conf.read_text().splitlines():
        if line.startswith("log_dest file "):
            return Path(line.removeprefix("log_dest file "))
    raise AssertionError(f"no log file in {conf}")


def _wait_for_line(log: Path, needle: str, *, since: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log.read_bytes()[since:].decode(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"no {needle!r} in the broker's log within {timeout:g} s")


def _retire(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ENERGYBUS, "retire", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.services
def test_the_bus_session_outlives_a_restart_but_expires_after_the_ingest_expiry(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    init_schema(postgres.url)
    site = _site()
    client_id = f"w-{site}"
    config = _ven_worker(tmp_path, mosquitto, site, postgres.url)
    _set(config, "mqtt", "ingest_session_expiry_s", str(INGEST_EXPIRY))
    log = tmp_path / "worker.log"
    count_sql = f"SELECT count(*) FROM energybus.measurements WHERE site = '{site}'"
    worker = WorkerProcess(config, log).start()
    try:
        worker.wait_for_log("bus: connected")
        # A restart inside the ingest expiry: what others published meanwhile waited in
        # the bus session and is ingested when the worker is back.
        assert worker.stop() == 0
        publish(mosquitto, [_value(site, "meter-1", 1.0, 0)])
        worker = WorkerProcess(config, log).start()
        assert wait_rows(postgres.url, count_sql, 1, timeout=30) == 1
        broker_log = _broker_log(mosquitto)
        mark = broker_log.stat().st_size
        assert worker.stop() == 0
        stopped = time.monotonic()
        # Gone for longer: values published now wait only until the ingest expiry.
        publish(mosquitto, [_value(site, "meter-1", 2.0, 1), _value(site, "meter-2", 3.0, 1)])
        _wait_for_line(
            broker_log,
            f"Expiring client {client_id}-bus due to timeout.",
            since=mark,
            timeout=INGEST_EXPIRY + 30,
        )
        # The broker checks expiries every second, on whole seconds.
        assert time.monotonic() - stopped >= INGEST_EXPIRY - 1
        after = broker_log.read_bytes()[mark:].decode(errors="replace")
        assert f"Expiring client {client_id}-src" not in after
        assert _resume(mosquitto, f"{client_id}-bus") == (False, [])
        # The source session keeps its own, longer expiry (and this drops it).
        assert _resume(mosquitto, f"{client_id}-src")[0] is True
    finally:
        if worker.alive():
            worker.stop()


@pytest.mark.services
def test_retire_drops_both_sessions_of_a_stopped_worker_and_refuses_a_running_one(
    tmp_path: Path, mosquitto: Service
) -> None:
    site = _site()
    client_id = f"w-{site}"
    config = _ven_worker(tmp_path, mosquitto, site)
    status = f"energybus/worker/{client_id}/status"
    collector = Collector(mosquitto, [f"{site}/energy/#"])
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        worker.wait_for_log("bus: connected")
        refused = _retire(config)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.splitlines() == [
            f"refused  worker {client_id} is online ({status} is 'online'): stop it first"
        ]
        # Nothing connected under the worker's ids: it runs on, undisturbed.
        assert worker.alive()
        assert "connection lost" not in worker.text()
        body = json.loads(ven_messages(1, circuits=1)[0])
        body["venId"] = "hygiene"
        publish(mosquitto, [("volttron/metering", json.dumps(body).encode())])
        collector.wait_for(lambda topics: any("hygiene" in t for t in topics))
        assert "connection lost" not in worker.text()
        assert worker.stop() == 0
        # Gone: what is published now is queued for its sessions, until retire.
        publish(mosquitto, [("volttron/metering", json.dumps(body).encode())])
        publish(mosquitto, [_value(site, "meter-1", 1.0, 0), _value(site, "meter-1", 2.0, 1)])
        retired = _retire(config)
        assert retired.returncode == 0, retired.stdout + retired.stderr
        assert retired.stdout.splitlines() == [
            f"worker   {client_id}: offline ({status})",
            f"dropped  session {client_id}-src (it held 1 queued message)",
            f"dropped  session {client_id}-bus (it held 2 queued messages)",
        ]
        assert _resume(mosquitto, f"{client_id}-src") == (False, [])
        assert _resume(mosquitto, f"{client_id}-bus") == (False, [])
        again = _retire(config)
        assert again.returncode == 0
        assert again.stdout.splitlines()[1:] == [
            f"none     no session {client_id}-src on the broker",
            f"none     no session {client_id}-bus on the broker",
        ]
    finally:
        collector.close()
        if worker.alive():
            worker.stop()


@pytest.mark.services
def test_without_bus_ingest_the_bus_session_is_not_kept(tmp_path: Path, mosquitto: Service) -> None:
    site = _site()
    client_id = f"w-{site}"
    config = _ven_worker(tmp_path, mosquitto, site)
    _set(config, "worker", "bus_ingest", "[]")
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        worker.wait_for_log("bus: connected")
        assert worker.stop() == 0
        publish(mosquitto, [_value(site, "meter-1", 1.0, 0)])
        assert _resume(mosquitto, f"{client_id}-bus") == (False, [])
        assert _resume(mosquitto, f"{client_id}-src")[0] is True  # the source's is kept
    finally:
        if worker.alive():
            worker.stop()


def test_retire_with_no_broker_is_one_line_and_exit_2(tmp_path: Path) -> None:
    port = services.free_port()
    config = tmp_path / "site.toml"
    config.write_text(f'[mqtt]\nport = {port}\nclient_id = "gone"\n[adapters.ven]\nsite = "s"\n')
    result = CliRunner().invoke(main, ["retire", "--config", str(config)])
    assert result.exit_code == 2
    assert result.output.startswith(
        f"error    cannot connect to the broker 127.0.0.1:{port} as gone-retire-"
    )
    assert len(result.output.splitlines()) == 1
    assert "Traceback" not in result.output


CONFIG = """\
[worker]
bus_ingest = ["+/energy/+/+/+/value"]
[mqtt]
client_id = "w1"
ingest_session_expiry_s = 600
[adapters.ven]
site = "vad"
"""


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_each_connection_has_its_own_session_expiry(tmp_path: Path) -> None:
    config = load_config(_file(tmp_path, CONFIG))
    assert config.mqtt.session_expiry_s == 7 * 86400  # the source: unchanged
    assert config.mqtt.ingest_session_expiry_s == 600
    assert config.bus_session_expiry_s == 600
    default = load_config(_file(tmp_path, CONFIG.replace("ingest_session_expiry_s = 600\n", "")))
    assert default.bus_session_expiry_s == 3600
    off = load_config(_file(tmp_path, CONFIG.replace('["+/energy/+/+/+/value"]', "[]")))
    assert off.bus_session_expiry_s == 0  # it subscribes to nothing: nothing to keep
    result = CliRunner().invoke(main, ["check", "--config", str(_file(tmp_path, CONFIG))])
    assert result.exit_code == 0, result.output
    assert "session expiry 604800 s (source), 600 s (bus ingest)" in result.output


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("ingest_session_expiry_s = -1", "invalid_value"),
        ("ingest_session_expiry_s = 4294967296", "invalid_value"),
        ('ingest_session_expiry_s = "1h"', "wrong_type"),
        ("ingest_session_expiry = 60", "unknown_field"),
    ],
)
def test_a_bad_ingest_session_expiry_names_file_line_and_key(
    tmp_path: Path, value: str, code: str
) -> None:
    source = _file(tmp_path, CONFIG.replace("ingest_session_expiry_s = 600", value))
    with pytest.raises(MappingError) as caught:
        load_config(source)
    error = caught.value
    assert (error.file, error.line, error.code) == (str(source), 5, code)
    assert error.path == f"$.mqtt.{value.split(' = ')[0]}"
    result = CliRunner().invoke(main, ["check", "--config", str(source)])
    assert result.exit_code == 2
    assert result.output.startswith(f"invalid  {source}:5:")
