"""Running the worker as a subprocess against real services, and talking to it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tools.services import Service

ENERGYBUS = [sys.executable, "-m", "energybus.cli"]


@dataclass(frozen=True)
class Login:
    """How a test client logs in to a locked-down broker (tests/security)."""

    username: str
    password: str
    ca: Path
    cert: Path
    key: Path

    def apply(self, client: paho.Client) -> None:
        client.username_pw_set(self.username, self.password)
        client.tls_set(ca_certs=str(self.ca), certfile=str(self.cert), keyfile=str(self.key))


def write_config(
    path: Path,
    *,
    mqtt: Service,
    dsn: str | None,
    client_id: str,
    extra: str = "",
    worker: str = "",
) -> Path:
    historian = (
        f'[historian]\ndsn = "{dsn}"\nbatch_interval_s = 0.05\nretry_s = 0.5\n' if dsn else ""
    )
    path.write_text(
        f'[worker]\ndata_dir = "{path.parent / "data"}"\nshutdown_timeout_s = 20\n{worker}'
        f'[mqtt]\nhost = "{mqtt.host}"\nport = {mqtt.port}\nclient_id = "{client_id}"\n'
        # Sessions outlive a worker by two minutes, not a week: a worker a test is done
        # with must not leave the shared broker queuing canonical values for the rest of
        # the run (restarts inside a test take seconds).
        f"reconnect_min_s = 0.2\nreconnect_max_s = 2\nsession_expiry_s = 120\n"
        "ingest_session_expiry_s = 120\n"
        f"{historian}{extra}"
    )
    return path


class WorkerProcess:
    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.args = list(args)
        """More options of ``energybus run`` (``--shared-group NAME``)."""
        self.env = dict(env) if env is not None else None
        """The worker's whole environment (default: the test's)."""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*ENERGYBUS, "run", "--config", str(self.config), *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self.wait_for_log("source: connected", count=self.text().count("source: connected") + 1)
        return self

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_for_log(self, needle: str, *, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.text().count(needle) >= count:
                return
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited {self.process.returncode}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} in the worker's log:\n{self.text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Its exit status; a worker that ``sig`` does not end within ``timeout`` is
        killed, so that none outlives its test, and the test fails on the timeout."""
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def publish(
    mqtt: Service,
    messages: Iterable[tuple[str, bytes]],
    *,
    qos: int = 1,
    pace: float = 0,
    retain: bool = False,
    expiry_s: int | None = None,
    login: Login | None = None,
) -> int:
    """Publish and wait for every PUBACK; the count published. ``expiry_s`` sets the
    MQTT 5 Message Expiry Interval (the client then speaks MQTT 5)."""
    client_id = f"pub-{os.getpid()}-{time.time()}"
    properties = None
    if expiry_s is not None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.MessageExpiryInterval = expiry_s
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    if login is not None:
        login.apply(client)
    client.connect(mqtt.host, mqtt.port)
    client.loop_start()
    infos = []
    try:
        for topic, payload in messages:
            infos.append(
                client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
            )
            if pace:
                time.sleep(pace)
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
    finally:
        client.loop_stop()
        client.disconnect()
    return len(infos)


class Collector:
    """Subscribes in a thread and keeps every message."""

    def __init__(self, mqtt: Service, filters: list[str], *, login: Login | None = None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"col-{time.time()}")
        if login is not None:
            login.apply(self.client)
        self.client.on_message = self._on_message
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.connect(mqtt.host, mqtt.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert ready.wait(10)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def topics(self) -> list[str]:
        with self._lock:
            return [m[0] for m in self.messages]

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [m[1] for m in self.messages if m[0] == topic]

    def wait_for_payload(self, topic: str, payload: bytes, timeout: float = 20) -> None:
        """Until the last message seen on ``topic`` is ``payload``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.payloads(topic)
            if seen and seen[-1] == payload:
                return
            time.sleep(0.05)
        raise AssertionError(f"{topic} never ended on {payload!r}; got {self.payloads(topic)}")

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.topics()):
                return
            time.sleep(0.05)
        raise AssertionError(f"not seen in time; got {self.topics()[:20]}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def execute(dsn: str, sql: str) -> None:
    """Run ``sql``, one or several statements, without parameters."""

    async def main() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(main())


def query(dsn: str, sql: str, *args: Any) -> list[Any]:
    async def main() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(main())


def wait_rows(dsn: str, sql: str, expected: int, *, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        count = int(query(dsn, sql)[0][0])
        if count >= expected:
            return count
        time.sleep(0.2)
    return count


def init_schema(dsn: str) -> None:
    result = subprocess.run(
        [*ENERGYBUS, "historian", "init", "--dsn", dsn], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
