"""The retained ``last`` values a worker reads before it starts (worker/lasts.py), from a
real Mosquitto: which floors it keeps, and what it does when the broker refuses or does
not answer its marker."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from energybus.samples import SeriesKey
from energybus.worker.config import MqttConfig
from energybus.worker.lasts import SKEW, read_lasts
from tests.workers import publish
from tools import services
from tools.services import Service

pytestmark = pytest.mark.services

PAST = datetime(2026, 1, 1, tzinfo=UTC)


def _last(site: str, entity: str, at: datetime) -> tuple[str, bytes]:
    stamp = at.isoformat().replace("+00:00", "Z")
    return (
        f"{site}/energy/grid/{entity}/active_power/last",
        f'{{"value": 1, "unit": "W", "observed_at": "{stamp}", "quality": "good"}}'.encode(),
    )


def _read(
    broker: Service,
    *,
    member: tuple[int, int] | None = None,
    limit: int | None = None,
    timeout: float = 30.0,
) -> dict[SeriesKey, datetime]:
    config = MqttConfig(host=broker.host, port=broker.port)
    return asyncio.run(
        read_lasts(
            config,
            client_id=f"t-{uuid.uuid4().hex[:8]}",
            marker_prefix="energybus/worker/t/lasts",
            member=member,
            limit=limit,
            timeout=timeout,
        )
    )


def _sites(tag: str) -> tuple[str, str]:
    """Two sites of ``tag``, the first hashing to member 0 of 2, the second to 1."""
    sites = [f"{tag}-{n}" for n in range(20)]
    mine = next(s for s in sites if zlib.crc32(s.encode()) % 2 == 0)
    other = next(s for s in sites if zlib.crc32(s.encode()) % 2 == 1)
    return mine, other


def test_a_member_keeps_its_own_sites_floors_and_none_beyond_the_clock_skew(
    mosquitto: Service,
) -> None:
    mine, other = _sites(f"l{uuid.uuid4().hex[:8]}")
    future = datetime(2099, 1, 1, tzinfo=UTC)  # a publisher's broken clock
    publish(
        mosquitto,
        [_last(mine, "past", PAST), _last(mine, "ahead", future), _last(other, "past", PAST)],
        retain=True,
    )
    before = datetime.now(UTC)
    floors = _read(mosquitto, member=(0, 2))
    after = datetime.now(UTC)
    assert floors[(mine, "grid", "past", "active_power")] == PAST
    ahead = floors[(mine, "grid", "ahead", "active_power")]
    assert before + SKEW <= ahead <= after + SKEW  # not 2099: the series moves on
    assert {key[0] for key in floors} & {mine, other} == {mine}
    # A worker that is no member keeps every site's.
    assert floors.keys() < _read(mosquitto).keys()
    assert _read(mosquitto)[(other, "grid", "past", "active_power")] == PAST


@pytest.fixture
def acl_broker(run_dir: Path, request: pytest.FixtureRequest) -> Iterator[Service]:
    """A Mosquitto whose ACL (the test's parameter) governs the worker's topics."""
    where = run_dir / f"acl-{uuid.uuid4().hex[:8]}"
    acl = f"topic readwrite +/energy/#\n{request.param}\n"
    with services.started("mosquitto", run_dir=where, acl=acl) as broker:
        yield broker


@pytest.mark.parametrize("acl_broker", ["topic read energybus/#"], indirect=True)
def test_a_refused_marker_starts_at_once_with_what_was_read(
    acl_broker: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """No permission to publish the marker: the broker's PUBACK says so (0x87), and the
    worker starts with the floors it has instead of waiting for a marker that never
    comes."""
    publish(acl_broker, [_last("a", f"m{n}", PAST) for n in range(5)], retain=True)
    timeout = 60.0
    started = time.monotonic()
    with caplog.at_level("WARNING", "energybus.worker"):
        floors = _read(acl_broker, timeout=timeout)
    assert time.monotonic() - started < timeout
    assert len(floors) == 5
    assert "refused the publish on energybus/worker/t/lasts/" in caplog.text
    assert "(reason 0x87 not authorized)" in caplog.text


@pytest.mark.parametrize("acl_broker", ["topic write energybus/#"], indirect=True)
def test_a_marker_that_never_comes_keeps_the_floors_read(
    acl_broker: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """The marker may be published but not read back: the read times out, and each
    floor that did arrive is still a valid lower bound."""
    publish(acl_broker, [_last("a", f"m{n}", PAST) for n in range(5)], retain=True)
    with caplog.at_level("WARNING", "energybus.worker"):
        floors = _read(acl_broker, timeout=2.0)
    assert floors == {("a", "grid", f"m{n}", "active_power"): PAST for n in range(5)}
    assert "not all read (TimeoutError; 5 were)" in caplog.text


def test_no_more_floors_are_kept_than_the_worker_keeps_series(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who may publish on the bus can retain a ``last`` for an invented series:
    the worker reads at most ``worker.max_series`` of them."""
    with services.started("mosquitto", run_dir=run_dir / f"n-{uuid.uuid4().hex[:8]}") as broker:
        publish(broker, [_last("flood", f"e{n}", PAST) for n in range(7)], retain=True)
        with caplog.at_level(logging.WARNING, logger="energybus.worker"):
            floors = _read(broker, limit=4)
    assert len(floors) == 4
    assert "(worker.max_series, 4): 3 were not read" in caplog.text


def test_a_last_nested_past_what_the_decoder_follows_is_passed_over(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who may publish on the bus can retain it: raised out of the message
    callback, it would drop the connection and end the reading at every start."""
    deep = b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b', "observed_at": "2026-01-01T00:00:00Z"}'
    with services.started("mosquitto", run_dir=run_dir / f"d-{uuid.uuid4().hex[:8]}") as broker:
        publish(broker, [("deep/energy/grid/e/active_power/last", deep)], retain=True)
        publish(broker, [_last("fine", f"e{n}", PAST) for n in range(3)], retain=True)
        with caplog.at_level(logging.WARNING):
            floors = _read(broker, timeout=10)
    assert floors == {("fine", "grid", f"e{n}", "active_power"): PAST for n in range(3)}
    assert "not all read" not in caplog.text and "Fatal error" not in caplog.text
