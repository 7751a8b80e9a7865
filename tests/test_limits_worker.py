"""The input limits in the running worker, against a real Mosquitto and PostgreSQL: what
is past a limit is refused, counted and dead-lettered, and what is within goes on."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.workers import Collector, WorkerProcess, init_schema, publish, query, write_config
from tools import services
from tools.services import Service

pytestmark = pytest.mark.services

LETTERS = "energybus/dead_letter/#"


def _worker(
    tmp_path: Path, mosquitto: Service, postgres: Service, worker: str = ""
) -> tuple[str, int, WorkerProcess]:
    """A VEN worker on a site of its own, with its metrics endpoint (not yet started)."""
    init_schema(postgres.url)
    site = f"t-{uuid.uuid4().hex[:8]}"
    port = services.free_port()
    config = write_config(
        tmp_path / "site.toml",
        mqtt=mosquitto,
        dsn=postgres.url,
        client_id=f"w-{site}",
        worker=f"metrics_port = {port}\n{worker}",
        extra=f'[adapters.ven]\nsite = "{site}"\n',
    )
    return site, port, WorkerProcess(config, tmp_path / "worker.log")


def _metering(venid: str, at: int, circuits: list[str], **fields: Any) -> bytes:
    body = {
        "venId": venid,
        "timestamp": at,
        "usedPowerKw": 1.5,
        "circuits": [{"id": c, "currentKw": 0.5} for c in circuits],
        **fields,
    }
    return msgspec.json.encode(body)


def _rejections(port: int) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("energybus_rejections_total{"):
            labels, value = line.rsplit(" ", 1)
            parts = dict(p.split("=", 1) for p in labels[labels.index("{") + 1 : -1].split(","))
            found[(parts["source"].strip('"'), parts["reason"].strip('"'))] = float(value)
    return found


def _gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in the metrics")


def _letters(collector: Collector, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        letters = [json.loads(p) for t, p, _ in collector.messages if "dead_letter" in t]
        if len(letters) >= count:
            return letters
        time.sleep(0.05)
    raise AssertionError(f"{count} dead letters wanted; got {collector.topics()}")


def _rows(dsn: str, site: str, count: int, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = query(
            dsn,
            "SELECT device_id, metric_name, observed_at FROM energybus.measurements"
            " WHERE site = $1 ORDER BY observed_at, device_id",
            site,
        )
        if len(rows) >= count:
            return rows
        time.sleep(0.2)
    raise AssertionError(f"{count} rows wanted for {site}; got {len(rows)}")


def test_an_oversized_message_is_dead_lettered_with_its_size_and_without_its_body(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    site, port, worker = _worker(tmp_path, mosquitto, postgres)
    collector = Collector(mosquitto, [LETTERS])
    worker.start()
    try:
        big = _metering("ven-1", 1729700000, ["c-0"], note="secret-" + "n" * 300_000)
        canonical = b'{"value": 1.0, "unit": "W", "note": "' + b"n" * 20_000 + b'"}'
        publish(
            mosquitto,
            [
                ("volttron/metering", big),
                (f"{site}/energy/load/other/active_power/value", canonical),
                ("volttron/metering", _metering("ven-1", 1729700001, ["c-0"])),
            ],
        )
        letters = _letters(collector, 2)
        by_source = {x["source"]: x for x in letters}
        ven, bus = by_source["ven"], by_source["bus"]
        assert (ven["reason"], ven["size"], ven["topic"]) == (
            "too_large",
            len(big),
            "volttron/metering",
        )
        assert (bus["reason"], bus["size"]) == ("too_large", len(canonical))
        for letter in (ven, bus):
            assert "payload" not in letter and "payload_base64" not in letter
        assert "secret" not in json.dumps(letters)
        assert "adapters.ven.max_payload_bytes" in ven["message"]
        assert "worker.max_payload_bytes" in bus["message"]
        rows = _rows(postgres.url, site, 2)  # the valid message after it goes on
        assert {r[0] for r in rows} == {"load.ven-1", "load.c-0"}
        counts = _rejections(port)
        assert counts[("ven", "too_large")] == 1
        assert counts[("bus", "too_large")] == 1
    finally:
        collector.close()
        assert worker.stop() == 0
    assert "Traceback" not in worker.text()


def test_a_message_nested_past_max_depth_is_refused_as_too_deep(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    site, port, worker = _worker(tmp_path, mosquitto, postgres)
    config = worker.config
    config.write_text(config.read_text() + "max_depth = 8\n")  # under [adapters.ven]
    collector = Collector(mosquitto, [LETTERS])
    worker.start()
    try:
        nested: Any = 1
        for _ in range(8):  # in the root object: 9 levels
            nested = [nested]
        deep = _metering("ven-1", 1729700000, ["c-0"], extensions=nested)
        fits = _metering("ven-1", 1729700001, ["c-0"], extensions=nested[0])
        publish(mosquitto, [("volttron/metering", deep), ("volttron/metering", fits)])
        (letter,) = _letters(collector, 1)
        assert (letter["source"], letter["reason"]) == ("ven", "too_deep")
        assert "adapters.ven.max_depth" in letter["message"]
        assert letter["payload"] == deep.decode() and letter["size"] == len(deep)
        rows = _rows(postgres.url, site, 2)
        assert len(rows) == 2  # the message one level shallower is stored whole
        assert _rejections(port)[("ven", "too_deep")] == 1
    finally:
        collector.close()
        assert worker.stop() == 0
    assert "Traceback" not in worker.text()


def test_a_flood_of_new_entity_ids_is_bounded_and_known_series_keep_flowing(
    tmp_path: Path, mosquitto: Service, postgres: Service
) -> None:
    bound = 30
    site, port, worker = _worker(
        tmp_path, mosquitto, postgres, worker=f"max_series_per_site = {bound}\n"
    )
    collector = Collector(mosquitto, [LETTERS])
    worker.start()
    try:
        known = [f"c-{i}" for i in range(5)]
        first = _metering("ven-1", 1729700000, known)  # 6 series: ven-1 and 5 circuits
        flood = [
            _metering("ven-1", 1729700001 + n, [f"flood-{n}-{i}" for i in range(5)])
            for n in range(20)
        ]  # 100 new series: 24 fit, 76 are refused
        again = _metering("ven-1", 1729700100, known)
        publish(mosquitto, [("volttron/metering", m) for m in (first, *flood, again)])
        letters = _letters(collector, 16)
        assert {x["reason"] for x in letters} == {"too_many_series"}
        assert sum(len(x.get("refusals") or [x]) for x in letters) == 76
        assert "worker.max_series_per_site" in letters[0]["message"]
        # The known series of the first and last messages, and ven-1's value in every
        # flood message beside its refused circuits.
        rows = _rows(postgres.url, site, 6 + 20 + 24 + 6)
        # Other publishers on the bus ingest (after the VEN's messages: another
        # connection, so no order between the two) draw on a budget of their own, as
        # large: the site's full source budget does not stop them, and past theirs new
        # series are refused. A known series is one of them the first time (the ingest
        # keeps its own count).
        publish(
            mosquitto,
            [
                (
                    f"{site}/energy/load/c-0/active_power/value",
                    b'{"value": 250.0, "observed_at": "2026-01-01T00:00:00Z"}',
                )
            ]
            + [(f"{site}/energy/load/bus-{i}/active_power/value", b"7.0") for i in range(34)],
        )
        letters = _letters(collector, 16 + 5)
        assert [x["source"] for x in letters[16:]] == ["bus"] * 5
        assert {x["topic"] for x in letters[16:]} == {
            f"{site}/energy/load/bus-{i}/active_power/value" for i in range(29, 34)
        }
        rows = _rows(postgres.url, site, 6 + 20 + 24 + 6 + 1 + 29)
        assert len(rows) == 6 + 20 + 24 + 6 + 1 + 29
        assert sum(r[0] == "load.c-0" for r in rows) == 3
        assert sum(r[0] == "load.ven-1" for r in rows) == 22
        series = query(postgres.url, "SELECT count(*) FROM energybus.series WHERE site = $1", site)
        assert series[0][0] == bound + 29  # the sources' 30 and the ingest's 29 new ones
        counts = _rejections(port)
        assert counts[("ven", "too_many_series")] == 76
        assert counts[("bus", "too_many_series")] == 5
        assert _gauge(port, "energybus_series") == bound
        assert _gauge(port, "energybus_ingest_series") == bound
    finally:
        collector.close()
        assert worker.stop() == 0
    assert "Traceback" not in worker.text()
