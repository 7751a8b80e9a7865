"""``energybus watch``: the view built from what it has seen (pure, cli/view.py), then the
command against a real Mosquitto, PostgreSQL and a metrics endpoint."""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from energybus.cli.login import Login
from energybus.cli.view import Board, CommandLine, format_value, render
from energybus.cli.watch import Where, parse_metrics
from tests.helpers import Output
from tests.workers import init_schema, publish
from tools import services

NOW = 1_800_000_000.0
ENERGYBUS = [sys.executable, "-m", "energybus.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _feed(board: Board, topic: str, payload: str, *, at: float, retain: bool = False) -> None:
    board.message(topic, payload.encode(), retain=retain, at=at)


def _battery(board: Board, *, at: float = NOW) -> None:
    base = "lab/energy/storage/battery-1"
    _feed(board, f"{base}/soc/meta", '{"unit":"%","source":"modbus"}', at=at, retain=True)
    _feed(board, f"{base}/active_power/meta", '{"unit":"W","source":"modbus"}', at=at)
    _feed(
        board,
        f"{base}/state/meta",
        '{"source":"modbus","attributes":{"states":"1=off, 4=charging"}}',
        at=at,
    )
    _feed(board, f"{base}/soc/value", "55.5", at=at - 1)
    _feed(board, f"{base}/active_power/value", "-2500.0", at=at - 1)
    _feed(board, f"{base}/state/value", "4", at=at - 1)
    _feed(board, f"{base}/soc/availability", "online", at=at, retain=True)


def _text(lines: list[str]) -> str:
    return "\n".join(lines)


# The pure part ----------------------------------------------------------------------------


def test_values_are_shown_with_their_units_scaled_for_people() -> None:
    assert format_value(-2500.0, "W") == "-2.5 kW"
    assert format_value(12_345_678.0, "Wh") == "12.35 MWh"
    assert format_value(230.04, "V") == "230 V"
    assert format_value(55.5, "%") == "55.5 %"
    assert format_value(True, None) == "on"
    assert format_value(4, None, {"4": "charging"}) == "charging"
    assert format_value(None, "W") == "-"
    assert format_value(0.5, None) == "0.5"


def test_an_entity_row_has_its_newest_values_age_and_rate() -> None:
    board = Board()
    _battery(board)
    for k in range(5):  # five more soc values within the rate window
        _feed(board, "lab/energy/storage/battery-1/soc/value", str(56 + k), at=NOW - 5 + k)
    lines = render(board, NOW, width=140)
    [row] = [line for line in lines if line.startswith("lab/storage/battery-1")]
    assert "modbus" in row
    assert "soc 60 %" in row  # the newest
    assert "active_power -2.5 kW" in row and "state charging" in row
    assert row.index("soc") < row.index("active_power")  # the most telling first
    assert row.split()[-2:] == ["1.0s", "0.8/s"]  # age; 8 live values in the last 10 s
    assert board.first_value_at == NOW - 1
    assert board.sources() == {"modbus"}


def test_retained_values_are_shown_with_their_age_but_are_not_live() -> None:
    board = Board()
    topic = "lab/energy/grid/meter/import_power"
    _feed(board, f"{topic}/meta", '{"unit":"W","source":"ven"}', at=NOW, retain=True)
    last = f'{{"value":1200.0,"unit":"W","observed_at":"{_iso(NOW - 7200)}"}}'
    _feed(board, f"{topic}/last", last, at=NOW, retain=True)
    _feed(board, f"{topic}/value", "999", at=NOW, retain=True)  # a retained value: skipped
    [row] = [line for line in render(board, NOW) if line.startswith("lab/grid/meter")]
    assert "import_power 1.2 kW" in row and "2h" in row and "0.0/s" in row
    assert board.first_value_at is None and board.sources() == set()
    assert not board.entities[("lab", "grid", "meter")].live()


def test_offline_entities_dead_letters_workers_and_faults_are_shown() -> None:
    board = Board()
    _battery(board)
    _feed(board, "lab/energy/storage/battery-1/soc/availability", "offline", at=NOW)
    letter = '{"reason":"malformed_json","topic":"volttron/metering","source":"ven"}'
    for _ in range(3):
        _feed(board, "energybus/dead_letter/ven", letter, at=NOW - 4)
    _feed(board, "energybus/dead_letter/router", "not json at all", at=NOW - 3)
    _feed(board, "energybus/dead_letter/router", '{"a": ' + "[" * 100_000, at=NOW - 2)  # deep
    _feed(board, "energybus/worker/w1/status", "online", at=NOW, retain=True)
    _feed(board, "not/a/canonical/topic", "1", at=NOW)
    _feed(board, "lab/energy/storage/battery-1/soc/value", '{"value":"nan"}', at=NOW)
    board.problem("database", "connection refused")
    text = _text(render(board, NOW, width=160))
    assert "offline" in next(line for line in text.splitlines() if "battery-1" in line)
    assert "dead letters  5 seen: ven malformed_json x3, router ? x2" in text
    assert "newest 2.0s ago, from" in text
    assert "worker w1 online" in text.splitlines()[0]
    assert "database: connection refused" in text


def test_source_rates_come_from_the_metrics_of_the_last_ten_seconds() -> None:
    board = Board()
    page = (
        "# TYPE energybus_messages_in_total counter\n"
        'energybus_messages_in_total{{adapter="ven"}} {ven}\n'
        'energybus_messages_in_total{{adapter="cpi"}} {cpi}\n'
        "# TYPE energybus_rejections_total counter\n"
        'energybus_rejections_total{{source="ven",reason="malformed_json"}} 2.0\n'
    )
    for k in range(13):  # one scrape a second; ven sends every 2 s, cpi every second
        samples = parse_metrics(page.format(ven=float(k // 2), cpi=float(3 * k)))
        board.set_metrics(samples, at=NOW + k)
    assert board.source_rates == {"ven": pytest.approx(0.5), "cpi": pytest.approx(3.0)}
    text = _text(render(board, NOW + 12))
    assert "cpi 3.0 msg/s (36 in)  ven 0.5 msg/s (6 in)" in text
    assert "2 refusals counted by the worker" in text


def test_commands_are_listed_newest_first_with_state_time_and_unit() -> None:
    board = Board()
    _battery(board)
    at = datetime.fromtimestamp(NOW, UTC)
    board.set_commands(
        [
            CommandLine(
                accepted_at=at - timedelta(seconds=30),
                adapter="modbus",
                series="lab/storage/battery-1/active_power",
                value=-2000,
                state="confirmed",
                updated_at=at - timedelta(seconds=29, milliseconds=400),
                response_status="read back",
            ),
            CommandLine(
                accepted_at=at - timedelta(seconds=10),
                adapter="cpi",
                series="lab/storage/other/power_setpoint",
                value=5,
                state="refused",
                updated_at=at - timedelta(seconds=10),
                why="interlock: above the PCS rating",
            ),
            CommandLine(
                accepted_at=at - timedelta(seconds=1),
                adapter="ven",
                series="lab/load/ven-1/shed_power",
                value=3000,
                state="sent",
            ),
        ]
    )
    board.set_rows({"measurement_samples": 12345, "counter_samples": 6, "command_logs": 3})
    lines = render(board, NOW)
    start = lines.index("commands (newest first)")
    ven, cpi, modbus = lines[start + 1 : start + 4]
    assert "ven" in ven and "sent" in ven and " in " not in ven
    assert "refused" in cpi and "interlock: above the PCS rating" in cpi
    assert "-2 kW" in modbus and "confirmed" in modbus and "in 0.6s" in modbus
    assert "read back" in modbus
    assert "measurement_samples 12,345  counter_samples 6  command_logs 3" in _text(lines)
    assert board.command_states() == {
        "lab/storage/battery-1/active_power": "confirmed",
        "lab/storage/other/power_setpoint": "refused",
        "lab/load/ven-1/shed_power": "sent",
    }


def test_the_view_keeps_to_its_width_and_colours_only_when_asked() -> None:
    board = Board()
    _battery(board)
    for metric in ("voltage_l1", "voltage_l2", "voltage_l3", "frequency", "temperature"):
        _feed(board, f"lab/energy/storage/battery-1/{metric}/value", "1", at=NOW)
    plain = render(board, NOW, width=80)
    assert all(len(line) <= 80 for line in plain)
    row = next(line for line in plain if line.startswith("lab/storage"))
    assert re.search(r"\+\d+ ", row)  # what did not fit is counted
    coloured = render(board, NOW, width=80, color=True)
    assert any("\x1b[" in line for line in coloured)
    assert [ANSI.sub("", line) for line in coloured] == plain
    assert not any("\x1b[" in line for line in plain)


# The command --------------------------------------------------------------------------------


@pytest.fixture
def metrics_url() -> Iterator[str]:
    """A real Prometheus endpoint (the worker's library) with a source's counter."""
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    registry = CollectorRegistry()
    counter = Counter("energybus_messages_in", "source messages", ["adapter"], registry=registry)
    counter.labels("ven").inc(7)
    port = services.free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield f"http://127.0.0.1:{port}/metrics"
    server.shutdown()
    thread.join(5)


@pytest.mark.services
def test_watch_once_shows_the_bus_the_historian_and_the_metrics(
    mosquitto: services.Service, postgres: services.Service, metrics_url: str
) -> None:
    init_schema(postgres.url)
    site = f"w{int(time.time() * 1000) % 10**9}"
    base = f"{site}/energy/storage/bat"
    publish(mosquitto, [(f"{base}/soc/meta", b'{"unit":"%","source":"cpi"}')], retain=True)
    last = f'{{"value":42.5,"unit":"%","observed_at":"{_iso(time.time() - 3)}"}}'
    publish(mosquitto, [(f"{base}/soc/last", last.encode())], retain=True)
    where = ["--mqtt", f"127.0.0.1:{mosquitto.port}", "--dsn", postgres.url]
    watch = Output(
        [*ENERGYBUS, "watch", "--once", "--settle", "2", *where, "--metrics", metrics_url]
    )
    assert watch.process.wait(60) == 0
    watch.stop()
    text = watch.text
    assert "\x1b[" not in text  # not a terminal: plain text
    row = next(line for line in watch.lines if line.startswith(f"{site}/storage/bat"))
    assert "cpi" in row and "soc 42.5 %" in row
    assert "historian  measurement_samples " in text
    assert "sources    ven 0.0 msg/s (7 in)" in text
    assert "Traceback" not in text + "\n".join(watch.errors)
    publish(mosquitto, [(f"{base}/soc/meta", b""), (f"{base}/soc/last", b"")], retain=True)


@pytest.mark.services
def test_watch_prints_whole_views_until_sigint(mosquitto: services.Service, tmp_path: Path) -> None:
    watch = Output([*ENERGYBUS, "watch", "--mqtt", f"127.0.0.1:{mosquitto.port}", "--every", "0.3"])
    try:
        watch.wait_for(lambda text: text.count("energybus watch") >= 2, 30, "two views")
        site = f"w{int(time.time() * 1000) % 10**9}"
        publish(mosquitto, [(f"{site}/energy/load/pump/active_power/value", b"1500")])
        watch.wait_for(lambda text: f"{site}/load/pump" in text, 30, "the live value")
    finally:
        status = watch.stop(signal.SIGINT)
    assert status == 0
    assert "Traceback" not in watch.text + "\n".join(watch.errors) and watch.errors == []
    row = next(line for line in watch.lines if line.startswith(f"{site}/load/pump"))
    assert "active_power 1500 " in row  # no unit: its meta never came


def test_watch_without_a_broker_is_one_line_and_status_1() -> None:
    port = services.free_port()
    watch = Output([*ENERGYBUS, "watch", "--once", "--mqtt", f"127.0.0.1:{port}"])
    assert watch.process.wait(30) == 1
    watch.stop()
    [error] = watch.errors
    assert error.startswith(f"error    cannot connect to 127.0.0.1:{port}")
    bad = Output([*ENERGYBUS, "watch", "--mqtt", "nowhere"])
    assert bad.process.wait(30) == 2
    bad.stop()


@pytest.mark.services
@pytest.mark.parametrize(
    ("dsn", "said"),
    [
        ("notadsn", "must start with postgresql://"),
        ("postgresql://u:secret-pw@[bad", "not a URL"),
    ],
)
def test_a_dsn_that_cannot_be_used_is_a_usage_error_not_a_traceback(
    mosquitto: services.Service, dsn: str, said: str
) -> None:
    """Checked before anything connects, as every command's --dsn is; never shown."""
    where = ["--mqtt", f"127.0.0.1:{mosquitto.port}", "--dsn", dsn]
    watch = Output([*ENERGYBUS, "watch", "--once", "--settle", "1", *where])
    assert watch.process.wait(60) == 2
    watch.stop()
    output = watch.text + "\n".join(watch.errors)
    assert "Traceback" not in output and "secret-pw" not in output
    assert f"Invalid value for --dsn: {said}" in output, output


def test_where_to_look_shows_no_password_in_its_repr() -> None:
    where = Where(dsn="postgresql://r:db-secret-pw@h/db", login=Login("w", "mqtt-secret-pw"))
    assert "secret" not in repr(where) and "w" in repr(where.login)
