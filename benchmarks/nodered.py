"""Node-RED beside the worker: the benchmark's flow, its deployment, and a check that it
publishes what energybus publishes.

The flow (``benchmarks/nodered/flow.json``) is what a Node-RED user would write by hand
to do the VEN adapter's job: ``mqtt in`` on ``volttron/metering`` (QoS 1), ONE
``function`` node, ``mqtt out`` at QoS 1 (retain as each message says), all on one MQTT 5
connection. The function node hard-codes the VEN field table of ``mappings/ven.toml``
and energybus's rules, set up once in its *On Start* code:

- site from configuration, entity ids (``{ven}``, ``{ven}-battery``, ``{ven}-panel``,
  kebab-case circuit and load ids), metric names, kW → W through the decimal text (as
  ``energybus.units`` does), the plausible ranges per unit;
- for every sample its ``value`` (Profile A, not retained) with dedupe and the 60 s
  heartbeat, and its retained ``last`` (the Profile B envelope, only moving forward in
  observation time), numbers and times written as msgspec writes them (``1075.0``,
  ``1.5e16``, ``"2024-10-23T16:13:20.123457Z"``), in energybus's order;
- a message seen twice from one VEN (same timestamp, among its last 16) is translated
  once; a message without ``timestamp`` gets the receive time and quality ``degraded``;
- a broken message (not JSON, a wrong type, a missing ``venId`` or item key, a bad
  timestamp or id) publishes nothing and is dead-lettered on
  ``energybus/dead_letter/ven`` with energybus's reason code and path; an implausible
  value is refused alone.
- The connection announces itself on ``energybus/worker/<client id>/status`` (retained
  ``online``; ``offline`` on close and as the will), as the worker does.

What it does not do: no ``meta`` and no ``availability`` streams, no historian; the MQTT
session is clean (nothing queues for Node-RED while it is away), and Node-RED
acknowledges a source message when it arrives, not once its publishes are acknowledged,
so a crash can lose what was in flight (the worker acknowledges only once its
publishes are safe, so the broker redelivers to it). A dead letter's
``message`` text is the flow's own wording and its ``received_at`` is to the
millisecond. Without a ``timestamp`` the receive time is Node-RED's, to the millisecond.
Dedupe state lives in the function's context, so a deploy starts it afresh (as a worker
restart does).

:func:`deploy` posts the flow to Node-RED's Admin API and returns once its MQTT
connection is up (the status message above: it is published after the connection's
subscriptions, so once it is seen the flow receives what is published next).
:func:`check_equivalence` publishes a handful of VEN messages chosen to exercise those
rules and compares, message by message, what Node-RED publishes under
``<site>/energy/#`` (topic, payload bytes, retain flag, QoS, order) and on the dead-letter
topic with what :class:`energybus.adapters.Pipeline` gives for the same messages;
:func:`check_burst` does the same for ~2,000 benchmark-shaped messages published at once.
Both raise :class:`NotEquivalent` with a diff when anything differs. Node-RED itself is
installed and started by ``tools/nodered.py``.
"""

from __future__ import annotations

import difflib
import json
import random
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from benchmarks.adapters import ven_messages
from energybus.adapters import Pipeline, create_adapter
from energybus.adapters.ven import VenOptions
from energybus.errors import TopicError
from energybus.topics import build_topic

__all__ = [
    "FLOW",
    "Equivalence",
    "NotEquivalent",
    "check_burst",
    "check_equivalence",
    "deploy",
    "flow",
    "status_topic",
]

FLOW = Path(__file__).with_name("nodered") / "flow.json"
HOST = "127.0.0.1"
METERING = "volttron/metering"
DEAD_LETTERS = "energybus/dead_letter/ven"
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_PORT = "@@MQTT_PORT@@"
_VALUE = re.compile(r"[^\s\"'\\]+")
# Loopback needs no proxy, whatever http_proxy says.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NotEquivalent(AssertionError):
    """Node-RED published something other than energybus would; the message shows how."""


def status_topic(client_id: str) -> str:
    """Where the flow's MQTT connection says ``online`` and ``offline`` (as the worker)."""
    return f"energybus/worker/{client_id}/status"


def flow(
    *,
    mqtt_port: int,
    site: str,
    client_id: str,
    path: Path = FLOW,
    values: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """A flow file (by default the benchmark's) with its placeholders filled in: Node-RED's
    flow, ready to deploy.

    ``@@MQTT_PORT@@``, ``@@SITE@@`` and ``@@CLIENT_ID@@`` come from the arguments,
    ``@@NAME@@`` from ``values["NAME"]`` (the examples' ``CONFIG``). A value may hold no
    white space, quote or backslash: it lands in JavaScript strings and in ``exec``
    commands, which Node-RED splits at white space.
    """
    if not 0 < mqtt_port < 65536:
        raise ValueError(f"mqtt_port must be a TCP port, not {mqtt_port}")
    try:
        build_topic(site, "load", "entity", "metric")
    except TopicError as error:
        raise ValueError(f"site: {error.message}") from None
    if _CLIENT_ID.fullmatch(client_id) is None:
        raise ValueError(f"client_id must match {_CLIENT_ID.pattern}, not {client_id!r}")
    for name, value in (values or {}).items():
        if _VALUE.fullmatch(value) is None:
            raise ValueError(f"{name} must match {_VALUE.pattern}, not {value!r}")
    filling = {f"@@{name}@@": value for name, value in (values or {}).items()}
    filling.update({"@@SITE@@": site, "@@CLIENT_ID@@": client_id})

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list):
            return [fill(value) for value in node]
        if node == _PORT:
            return mqtt_port
        if isinstance(node, str):
            for placeholder, value in filling.items():
                node = node.replace(placeholder, value)
            if "@@" in node:
                raise ValueError(f"{path}: unknown placeholder in {node[:80]!r}")
        return node

    filled = fill(json.loads(path.read_text()))
    assert isinstance(filled, list)
    return filled


def deploy(
    url: str,
    *,
    mqtt_port: int,
    site: str,
    client_id: str,
    timeout: float = 30.0,
    path: Path = FLOW,
    values: Mapping[str, str] | None = None,
) -> None:
    """Deploy a flow (:func:`flow` of ``path`` and ``values``, by default the benchmark's)
    to the Node-RED at ``url`` (a full deployment, replacing any flow there) and wait
    until its MQTT connection is up.

    ``client_id`` is the flow's MQTT client id, used by no other client (a worker's
    connections are ``<client_id>-src`` and ``-bus``, so a worker's ``client_id`` may be
    the same); the flow's status topic is :func:`status_topic` of it.
    """
    filled = flow(mqtt_port=mqtt_port, site=site, client_id=client_id, path=path, values=values)
    body = json.dumps(filled).encode()
    request = urllib.request.Request(
        f"{url.rstrip('/')}/flows",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Node-RED-API-Version": "v1",
            "Node-RED-Deployment-Type": "full",
        },
    )
    status = status_topic(client_id)
    with _listening(mqtt_port, [status], f"{client_id}-deploy") as listener:
        try:
            with _LOCAL.open(request, timeout=timeout) as response:
                response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            raise RuntimeError(f"Node-RED refused the flow: HTTP {error.code} {detail}") from None
        except OSError as error:
            raise RuntimeError(f"Node-RED's Admin API at {url} did not answer: {error}") from None
        if not listener.wait(lambda got: any(m.payload == b"online" for m in got), timeout):
            raise RuntimeError(
                f"the flow was deployed, but its MQTT connection did not come up within"
                f" {timeout:.0f}s (no 'online' on {status}); see Node-RED's log"
            )


# Comparing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int

    def line(self) -> str:
        flags = f"{'retained' if self.retain else 'not retained'}, QoS {self.qos}"
        return f"{self.topic} {self.payload.decode(errors='replace')} ({flags})"


@dataclass(frozen=True)
class Equivalence:
    """What a check compared; every one of these was equal."""

    source_messages: int
    messages: int
    """``value`` and ``last`` messages, each equal in topic, payload, retain flag, QoS and place."""
    values: int
    lasts: int
    payload_bytes: int
    dead_letters: int
    """Refusals, each with energybus's reason code, path and the original payload."""
    omitted: dict[str, int]
    """energybus's messages the flow does not publish, by stream (``meta``)."""
    seconds: float
    """From the first publish to the last message received (a functional figure only)."""


def check_equivalence(
    mqtt_port: int, site: str, client_id: str, *, idle_timeout: float = 15.0
) -> Equivalence:
    """Publish a few VEN messages to the deployed flow and compare what it publishes with
    energybus's output for them; :class:`NotEquivalent` with a diff if they differ.

    The messages are the benchmark's (10 circuits, 10 loads) with ids of their own, so
    no earlier traffic on the site changes the outcome: a first message, a second one
    5 s later with new circuit readings (dedupe), the same 61.5 s later (heartbeat), that
    one again (translated once), one with an implausible value (refused alone), one
    older than the rest (``last`` does not go back), and a broken one (dead-lettered).
    """
    return _compare(mqtt_port, site, client_id, _check_messages(), idle_timeout)


def check_burst(
    mqtt_port: int,
    site: str,
    client_id: str,
    *,
    messages: int = 2000,
    idle_timeout: float = 15.0,
) -> Equivalence:
    """Publish ``messages`` benchmark-shaped VEN messages at once (200 VENs, new circuit
    readings in each) and compare everything the flow publishes, as
    :func:`check_equivalence` does."""
    return _compare(mqtt_port, site, client_id, _burst_messages(messages), idle_timeout)


def _template() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(ven_messages(1, circuits=10)[0])
    return body


def _check_messages() -> list[bytes]:
    token = secrets.token_hex(3)
    rnd = random.Random(token)
    body = _template()
    body["venId"] = f"ven-check-{token}"
    for c, (circuit, load) in enumerate(zip(body["circuits"], body["loads"], strict=True)):
        circuit["id"] = load["loadId"] = f"check_{token}_{c}"
    t0 = time.time()
    out: list[bytes] = []

    def send(timestamp: float, **changes: Any) -> None:
        body.update(timestamp=timestamp, **changes)
        out.append(json.dumps(body).encode())

    send(t0)
    for circuit in body["circuits"]:
        circuit["currentKw"] = round(rnd.uniform(0, 8), 3)
    send(t0 + 5.000001)
    send(t0 + 66.5)
    out.append(out[-1])
    send(t0 + 70.25, usedPowerKw=2e7, batterySOC=55.5)  # 2e10 W: implausible
    send(t0 + 3.5, usedPowerKw=0.001, panelVoltage=239.9)
    out.append(json.dumps({"venId": body["venId"], "timestamp": "soon"}).encode())
    return out


def _burst_messages(count: int) -> list[bytes]:
    """As ``benchmarks.worker._publish_at`` sends them, with ids of their own."""
    token = secrets.token_hex(3)
    rnd = random.Random(token)
    body = _template()
    for c, (circuit, load) in enumerate(zip(body["circuits"], body["loads"], strict=True)):
        circuit["id"] = load["loadId"] = f"circuit_{token}_{c}"
    out = []
    for sent in range(count):
        body["venId"] = f"ven-{token}-{sent % 200}"
        body["timestamp"] = time.time()
        for circuit in body["circuits"]:
            circuit["currentKw"] = round(rnd.uniform(0, 8), 3)
        out.append(json.dumps(body).encode())
    return out


def _compare(
    mqtt_port: int, site: str, client_id: str, payloads: Sequence[bytes], idle_timeout: float
) -> Equivalence:
    pipeline = Pipeline(create_adapter("ven", options=VenOptions(site=site)))
    expected: list[Received] = []
    omitted: Counter[str] = Counter()
    expected_dead: list[tuple[str, str | None, str]] = []
    for payload in payloads:
        out = pipeline.feed(METERING, payload, received_at=datetime.now(UTC))
        for message in out.messages:
            stream = message.topic.rsplit("/", 1)[1]
            if stream in ("value", "last"):
                expected.append(
                    Received(message.topic, message.payload, message.retain, message.qos)
                )
            else:
                omitted[stream] += 1
        if out.rejections:
            first = out.rejections[0]
            expected_dead.append((first.code, first.path, payload.decode()))
    filters = [f"{site}/energy/#", DEAD_LETTERS]
    with _listening(mqtt_port, filters, f"{client_id}-check") as listener:
        started = time.monotonic()
        _publish(mqtt_port, payloads, f"{client_id}-feed")

        def done(got: list[Received]) -> bool:
            return len(got) >= len(expected) + len(expected_dead)

        listener.wait(done, idle_timeout, idle=True)
        seconds = time.monotonic() - started
        time.sleep(0.5)  # anything beyond what energybus published shows up too
        got = listener.received()
    bus = [m for m in got if m.topic != DEAD_LETTERS]
    dead: list[tuple[str, str | None, str]] = []
    for m in got:
        if m.topic == DEAD_LETTERS:
            letter = json.loads(m.payload)
            if letter.get("worker") == client_id:  # not a worker's, on the same broker
                dead.append((letter["reason"], letter.get("path"), letter.get("payload")))
    problems = []
    if bus != expected:
        problems.append(_diff([m.line() for m in expected], [m.line() for m in bus]))
    if dead != expected_dead:
        problems.append(
            _diff(
                [f"{r} at {p}: {t}" for r, p, t in expected_dead],
                [f"{r} at {p}: {t}" for r, p, t in dead],
                what="dead letters",
            )
        )
    if problems:
        raise NotEquivalent(
            f"Node-RED's flow and energybus differ for {len(payloads)} VEN messages on"
            f" site {site!r}:\n" + "\n".join(problems)
        )
    values = sum(1 for m in expected if m.topic.endswith("/value"))
    return Equivalence(
        source_messages=len(payloads),
        messages=len(expected),
        values=values,
        lasts=len(expected) - values,
        payload_bytes=sum(len(m.payload) for m in expected),
        dead_letters=len(dead),
        omitted=dict(omitted),
        seconds=round(seconds, 3),
    )


def _diff(expected: list[str], got: list[str], *, what: str = "value/last messages") -> str:
    """How two message lists differ: counts, then the first place they part."""
    missing = Counter(expected) - Counter(got)
    extra = Counter(got) - Counter(expected)
    lines = [
        f"{what}: energybus {len(expected)}, Node-RED {len(got)};"
        f" {missing.total()} missing from Node-RED's, {extra.total()} only in Node-RED's"
        + ("" if missing or extra else " (the same messages in another order)")
    ]
    first = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    start = max(first - 2, 0)
    window = difflib.unified_diff(
        expected[start : first + 20],
        got[start : first + 20],
        "energybus",
        "node-red",
        lineterm="",
        n=2,
    )
    lines.append(f"first difference at message {first}:")
    lines.extend(list(window)[2:])
    return "\n".join(lines)


# MQTT ------------------------------------------------------------------------------------


class _Listener:
    """What arrives on some filters, with the publisher's QoS and retain flag (MQTT 5:
    Retain As Published; retained messages already stored are not sent)."""

    def __init__(self) -> None:
        self._got: list[Received] = []
        self._changed = threading.Condition()

    def on_message(self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage) -> None:
        item = Received(message.topic, bytes(message.payload), bool(message.retain), message.qos)
        with self._changed:
            self._got.append(item)
            self._changed.notify_all()

    def received(self) -> list[Received]:
        with self._changed:
            return list(self._got)

    def wait(
        self, predicate: Callable[[list[Received]], bool], timeout: float, *, idle: bool = False
    ) -> bool:
        """Until ``predicate`` holds; False after ``timeout`` seconds (with ``idle``:
        seconds without a new message)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            seen = len(self._got)
            while not predicate(self._got):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
                if idle and len(self._got) != seen:
                    seen = len(self._got)
                    deadline = time.monotonic() + timeout
            return True


@contextmanager
def _listening(port: int, filters: list[str], client_id: str) -> Iterator[_Listener]:
    listener = _Listener()
    subscribed = threading.Event()
    failures: list[str] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.on_message = listener.on_message

    def on_subscribe(
        _client: paho.Client,
        _userdata: Any,
        _mid: int,
        codes: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        failures.extend(str(code) for code in codes if code.is_failure)
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.connect(HOST, port, clean_start=True)
    client.loop_start()
    try:
        options = SubscribeOptions(
            qos=2, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
        )
        client.subscribe([(f, options) for f in filters])
        if not subscribed.wait(10) or failures:
            raise RuntimeError(f"could not subscribe to {filters} on {HOST}:{port}: {failures}")
        yield listener
    finally:
        client.disconnect()
        client.loop_stop()


def _publish(port: int, payloads: Sequence[bytes], client_id: str) -> None:
    """Publish ``payloads`` on ``volttron/metering`` at QoS 1, as the benchmark does."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect(HOST, port)
    client.loop_start()
    try:
        infos = [client.publish(METERING, payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        client.disconnect()
        client.loop_stop()
