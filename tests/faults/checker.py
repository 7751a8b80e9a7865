"""What the fault suite reads back: historian rows, the dead-letter stream, the worker's
metrics, and the retained ``last`` of every series."""

from __future__ import annotations

import base64
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from energybus.payloads import decode_last
from tests.faults.ledger import Key
from tests.faults.malformed import letter_key
from tests.workers import query
from tools.services import Service

_ROWS = """
SELECT site, device_id, metric_name, observed_at, value FROM energybus.measurements
 WHERE site = ANY($1::text[]) AND observed_at > $2 AND observed_at <= $3
UNION ALL
SELECT site, device_id, metric_name, observed_at, value FROM energybus.counter_readings
 WHERE site = ANY($1::text[]) AND observed_at > $2 AND observed_at <= $3
"""
_COUNTS = f"SELECT site, count(*) FROM ({_ROWS}) AS rows GROUP BY site"
_NEWEST = """
SELECT DISTINCT ON (device_id, metric_name) device_id, metric_name, observed_at, value
  FROM (SELECT device_id, metric_name, observed_at, value FROM energybus.measurements
         WHERE site = $1
        UNION ALL
        SELECT device_id, metric_name, observed_at, value FROM energybus.counter_readings
         WHERE site = $1) AS rows
 ORDER BY device_id, metric_name, observed_at DESC
"""


class Historian:
    """The historian's rows of the suite's sites, read through the views users read."""

    def __init__(self, dsn: str, sites: list[str]) -> None:
        self.dsn = dsn
        self.sites = sites

    def counts(self, low: datetime, high: datetime) -> Counter[str]:
        """Rows per site observed in (``low``, ``high``]."""
        return Counter({r[0]: int(r[1]) for r in query(self.dsn, _COUNTS, self.sites, low, high)})

    def rows(self, low: datetime, high: datetime) -> dict[Key, list[float]]:
        """Every row observed in (``low``, ``high``], by key (a key stored twice would show
        two values)."""
        found: dict[Key, list[float]] = {}
        for site, device, metric, at, value in query(self.dsn, _ROWS, self.sites, low, high):
            found.setdefault((site, device, metric, at), []).append(value)
        return found

    def refused(self, site: str, since: datetime) -> Counter[str]:
        """Commands to ``site`` refused since ``since`` (their records), by code."""
        rows = query(
            self.dsn,
            "SELECT code, count(*) FROM energybus.command_logs"
            " WHERE site = $1 AND state = 'refused' AND accepted_at > $2 GROUP BY code",
            site,
            since,
        )
        return Counter({r[0]: int(r[1]) for r in rows})

    def newest(self, site: str) -> dict[tuple[str, str], tuple[datetime, float]]:
        """The newest row of each series of ``site``."""
        return {(r[0], r[1]): (r[2], r[3]) for r in query(self.dsn, _NEWEST, site)}


class Letter(NamedTuple):
    source: str
    reason: str
    topic: str
    digest: str


class DeadLetters:
    """Everything on the dead-letter stream, from a persistent session that outlives a
    broker restart (so nothing published meanwhile is missed)."""

    def __init__(self, mqtt: Service, prefix: str = "energybus/dead_letter") -> None:
        self.letters: list[Letter] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._filter = f"{prefix}/#"
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"faults-letters-{uuid.uuid4().hex[:8]}",
            clean_session=False,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.reconnect_delay_set(1, 2)
        self.client.connect(mqtt.host, mqtt.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the dead-letter subscription was not confirmed"

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(self._filter, 1)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        letter = msgspec.json.decode(message.payload)
        text, raw = letter.get("payload"), letter.get("payload_base64")
        body = text.encode() if text is not None else None if raw is None else base64.b64decode(raw)
        key = letter_key(letter["topic"], body, letter["size"])
        with self._lock:
            self.letters.append(Letter(letter["source"], letter["reason"], letter["topic"], key))

    def count(self) -> int:
        with self._lock:
            return len(self.letters)

    def since(self, start: int) -> list[Letter]:
        with self._lock:
            return self.letters[start:]

    def have(self, digests: Iterable[str], start: int) -> bool:
        """Whether every one of ``digests`` has a dead letter (after the first ``start``)."""
        return set(digests) <= {letter.digest for letter in self.since(start)}

    def wait_for(self, digests: Iterable[str], start: int, timeout: float) -> bool:
        wanted = set(digests)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.have(wanted, start):
                return True
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def scrape(url: str) -> dict[str, Counter[tuple[str, ...]]]:
    """The worker's counters by name, each by its labels' values (sorted by label name)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counters: dict[str, Counter[tuple[str, ...]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = tuple(v for _, v in sorted(sample.labels.items()))
                counters.setdefault(sample.name, Counter())[labels] += int(sample.value)
    return counters


def retained_last(mqtt: Service, topics: set[str], timeout: float = 30) -> dict[str, bytes]:
    """The retained ``last`` of each of ``topics``, as a new subscriber gets it."""
    found: dict[str, bytes] = {}
    lock = threading.Lock()
    sites = {topic.split("/", 1)[0] for topic in topics}

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if message.retain:
            with lock:
                found[message.topic] = message.payload

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"faults-last-{uuid.uuid4().hex}")
    client.on_message = on_message
    client.connect(mqtt.host, mqtt.port)
    client.loop_start()
    try:
        client.subscribe([(f"{site}/energy/+/+/+/last", 1) for site in sorted(sites)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if topics <= set(found):
                    break
            time.sleep(0.1)
        time.sleep(0.3)  # the rest of the retained burst, if any series is unexpected
    finally:
        client.loop_stop()
        client.disconnect()
    with lock:
        return dict(found)


def last_mismatches(
    newest: dict[tuple[str, str, str], tuple[datetime, float]], retained: dict[str, bytes]
) -> list[str]:
    """Series whose retained ``last`` is not their newest sample."""
    wrong = []
    for (site, device, metric), (at, value) in sorted(newest.items()):
        entity_type, _, entity_id = device.partition(".")
        topic = f"{site}/energy/{entity_type}/{entity_id}/{metric}/last"
        payload = retained.get(topic)
        if payload is None:
            wrong.append(f"{topic}: no retained last")
            continue
        last = decode_last(payload)
        if last.observed_at != at or float(last.value) != value:
            wrong.append(
                f"{topic}: last is {last.value} at {last.observed_at}, newest {value} at {at}"
            )
    return wrong
