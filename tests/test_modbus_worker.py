"""The worker polling simulated Modbus devices (real pymodbus servers on loopback),
publishing on a real Mosquitto and storing in a real PostgreSQL."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from energybus.adapters.registers import encode_registers
from tests.helpers import wait_until
from tests.modbus import Devices, device_config, devices
from tests.workers import (
    Collector,
    WorkerProcess,
    init_schema,
    publish,
    query,
    wait_rows,
    write_config,
)
from tools import services
from tools.services import Service

pytestmark = pytest.mark.services

MAPS = Path(__file__).resolve().parent / "maps"


@pytest.fixture
def served() -> Iterator[Devices]:
    with devices() as found:
        yield found


class ModbusWorker:
    def __init__(
        self,
        tmp_path: Path,
        mosquitto: Service,
        postgres: Service,
        served: Devices,
        *,
        interval_s: float = 0.2,
        extra: str = "",
    ) -> None:
        init_schema(postgres.url)
        self.site = f"m-{uuid.uuid4().hex[:8]}"
        self.served = served
        self.simulator = served.add("bat", "tests/maps/test_battery.toml")
        body = device_config(
            "bat",
            self.simulator,
            interval_s=interval_s,
            timeout_s=0.3,
            retries=0,
            offline_after=2,
        )
        self.config = write_config(
            tmp_path / "site.toml",
            mqtt=mosquitto,
            dsn=postgres.url,
            client_id=f"w-{uuid.uuid4().hex[:8]}",
            extra=(
                f'[adapters.modbus]\nsite = "{self.site}"\nmapping = "{MAPS}"\n'
                f"command_max_age_s = 30\n{extra}{body}"
            ),
        )
        self.log = tmp_path / "worker.log"
        self.dsn = postgres.url
        self.mosquitto = mosquitto

    def start(self) -> WorkerProcess:
        return WorkerProcess(self.config, self.log).start()

    def topic(self, metric: str, stream: str = "value") -> str:
        return f"{self.site}/energy/storage/bat/{metric}/{stream}"

    def set(self, value: float, **fields: object) -> None:
        body = json.dumps({"value": value, **fields}).encode()
        publish(self.mosquitto, [(self.topic("power_setpoint", "set"), body)])

    def rows(self, metric: str) -> int:
        return int(
            query(
                self.dsn,
                "SELECT count(*) FROM energybus.measurements WHERE site = $1 AND metric_name = $2",
                self.site,
                metric,
            )[0][0]
        )

    def commands(self) -> list[tuple[str, str | None, str | None]]:
        return [
            (r["state"], r["reason"], r["code"])
            for r in query(
                self.dsn,
                "SELECT state, reason, code FROM energybus.command_logs WHERE site = $1"
                " ORDER BY accepted_at",
                self.site,
            )
        ]


def _words(value: int) -> list[int]:
    return encode_registers("s32", value)


def test_setpoints_written_read_back_and_refused_by_interlocks_and_priority(
    tmp_path: Path, mosquitto: Service, postgres: Service, served: Devices
) -> None:
    w = ModbusWorker(tmp_path, mosquitto, postgres, served)
    sim = w.simulator
    served.call(lambda: sim.set_value("soc", 50.0))
    served.call(lambda: sim.set_value("temperature", 25.0))
    collector = Collector(mosquitto, [f"{w.site}/#", "energybus/dead_letter/#"])
    worker = w.start()
    try:
        collector.wait_for(lambda topics: w.topic("soc") in topics)
        # Accepted: within the limits, manual class, held for a minute.
        w.set(2000, priority="manual", duration_s=60)
        wait_until(
            lambda: (200, _words(2000)) in served.call(lambda: list(sim.writes)), 20, "2000 written"
        )
        collector.wait_for_payload(w.topic("power_setpoint"), b"2000")
        wait_until(lambda: [s for s, _, _ in w.commands()] == ["confirmed"], 20, "confirmed")
        # A lower class may not override the held manual setpoint.
        w.set(1000, priority="optimization")
        # Above the device's rated maximum, whatever the class.
        w.set(9000, priority="safety")
        # Discharging at a state of charge below the floor (10 %).
        served.call(lambda: sim.set_value("soc", 5.0))
        time.sleep(0.6)  # a poll or two brings the new state of charge
        w.set(1500, priority="safety")
        # Charging is still allowed there, and safety overrides manual.
        w.set(-1500, priority="safety")
        wait_until(
            lambda: (200, _words(-1500)) in served.call(lambda: list(sim.writes)),
            20,
            "-1500 written",
        )
        wait_until(lambda: len(w.commands()) == 5, 20, "five commands recorded")
        states = w.commands()
        assert [s for s, _, _ in states] == [
            "confirmed",
            "refused",
            "refused",
            "refused",
            "confirmed",
        ]
        assert [c for _, _, c in states[1:4]] == ["priority", "interlock", "interlock"]
        assert "above the maximum 5000" in (states[2][1] or "")
        assert "floor" in (states[3][1] or "")
        # Only the two accepted setpoints ever reached the device.
        assert served.call(lambda: list(sim.writes)) == [(200, _words(2000)), (200, _words(-1500))]
        letters = [json.loads(p) for p in collector.payloads("energybus/dead_letter/modbus")]
        codes = sorted(letter["reason"] for letter in letters)
        assert codes == ["interlock", "interlock", "priority"]
    finally:
        collector.close()
        assert worker.stop() == 0
    assert "Traceback" not in worker.text()


def test_not_implemented_is_bad_quality_and_a_scale_factor_change_keeps_the_value(
    tmp_path: Path, mosquitto: Service, postgres: Service, served: Devices
) -> None:
    w = ModbusWorker(tmp_path, mosquitto, postgres, served)
    sim = w.simulator
    served.call(lambda: sim.set_value("power", 1200.0))
    collector = Collector(mosquitto, [f"{w.site}/#"])
    worker = w.start()
    try:
        collector.wait_for_payload(w.topic("active_power"), b"1200")
        assert served.call(lambda: sim.memory["holding"][102]) == 1200
        served.call(lambda: sim.set_scale("power_sf", 2))
        assert served.call(lambda: sim.memory["holding"][102]) == 12
        time.sleep(1.0)
        values = collector.payloads(w.topic("active_power"))
        # The raw words changed with the scale factor read in the same poll; the value
        # did not (a value read with a stale scale factor would show 12 or 120000).
        assert set(values) == {b"1200"}, values
        served.call(lambda: sim.not_implemented("power"))
        wait_until(
            lambda: any(
                b'"quality":"bad"' in p for p in collector.payloads(w.topic("active_power"))
            ),
            20,
            "a value of quality bad",
        )
        bad = json.loads(collector.payloads(w.topic("active_power"))[-1])
        assert bad["value"] is None and bad["quality"] == "bad"
        # Never a number: nothing stored for it, and last keeps the last good value.
        last = json.loads(collector.payloads(w.topic("active_power", "last"))[-1])
        assert last["value"] == 1200
        # The energy counter (acc32, 10 Wh a count) is declared with its register width,
        # so the counter historian recognises a rollover.
        declared = query(
            w.dsn,
            "SELECT device_id, metric_name, wrap_at FROM energybus.counter_series WHERE site = $1",
            w.site,
        )
        assert [tuple(r) for r in declared] == [
            ("storage.bat", "charge_energy_total", float(2**32 * 10))
        ]
    finally:
        collector.close()
        assert worker.stop() == 0


def test_a_device_that_stops_answering_goes_offline_and_comes_back(
    tmp_path: Path, mosquitto: Service, postgres: Service, served: Devices
) -> None:
    w = ModbusWorker(tmp_path, mosquitto, postgres, served)
    collector = Collector(mosquitto, [f"{w.site}/#"])
    worker = w.start()
    availability = w.topic("soc", "availability")
    try:
        collector.wait_for_payload(availability, b"online")
        served.call(lambda: setattr(w.simulator, "silent", True))
        collector.wait_for_payload(availability, b"offline")
        worker.wait_for_log("polls in a row failed")
        served.call(lambda: setattr(w.simulator, "silent", False))
        collector.wait_for_payload(availability, b"online")
        worker.wait_for_log("answers again")
        # Gone altogether (the port closes) and back on the same port.
        served.stop("bat")
        collector.wait_for_payload(availability, b"offline")
        served.start("bat")
        collector.wait_for_payload(availability, b"online")
    finally:
        collector.close()
        assert worker.stop() == 0
    assert "Traceback" not in worker.text()
    # The state changes, each in one line: not pymodbus's error and dump of every read.
    assert "pymodbus" not in worker.text()
    assert "poll outbox takes polls again" not in worker.text()  # it never stopped


def _stored_once(w: ModbusWorker) -> tuple[int, int]:
    row = query(
        w.dsn,
        "SELECT count(*), count(DISTINCT observed_at) FROM energybus.measurements"
        " WHERE site = $1 AND metric_name = 'temperature'",
        w.site,
    )[0]
    return int(row[0]), int(row[1])


def _polls(w: ModbusWorker) -> int:
    return int(w.served.call(lambda: w.simulator.read_log[("holding", 100)]))


def test_polls_wait_in_the_outbox_while_broker_and_database_are_down(
    tmp_path: Path, served: Devices
) -> None:
    # A broker and a database of this test's own: it stops and starts them.
    run_dir = tmp_path / "services"
    with (
        services.started("mosquitto", run_dir=run_dir) as mosquitto,
        services.started("postgres", run_dir=run_dir) as postgres,
    ):
        _outage(tmp_path, mosquitto, postgres, served, run_dir)


def _outage(
    tmp_path: Path, mosquitto: Service, postgres: Service, served: Devices, run_dir: Path
) -> None:
    w = ModbusWorker(tmp_path, mosquitto, postgres, served)
    worker = w.start()
    try:
        wait_rows(w.dsn, f"SELECT count(*) FROM energybus.measurements WHERE site = '{w.site}'", 1)
        services.stop("mosquitto", run_dir=run_dir)
        services.stop("postgres", run_dir=run_dir)
        before = _polls(w)
        time.sleep(3)
        during = _polls(w) - before
        assert during >= 5, "polling went on during the outage"
        services.start("postgres", run_dir=run_dir, port=postgres.port)
        services.start("mosquitto", run_dir=run_dir, port=mosquitto.port)
        worker.wait_for_log("source: connected", count=2, timeout=60)
        # The device stops; then every poll it answered must be stored, once.
        served.stop("bat")
        polls = _polls(w)
        stored = wait_rows(
            w.dsn,
            "SELECT count(*) FROM energybus.measurements"
            f" WHERE site = '{w.site}' AND metric_name = 'temperature'",
            polls,
        )
        assert stored == polls
        assert _stored_once(w) == (polls, polls)
    finally:
        assert worker.stop() == 0
    assert "Traceback" not in worker.text()


def test_worker_killed_mid_poll_loses_and_repeats_nothing(
    tmp_path: Path, mosquitto: Service, postgres: Service, served: Devices
) -> None:
    w = ModbusWorker(tmp_path, mosquitto, postgres, served, interval_s=0.05)
    worker = w.start()
    wait_rows(w.dsn, f"SELECT count(*) FROM energybus.measurements WHERE site = '{w.site}'", 1)
    time.sleep(0.7)
    worker.stop(signal.SIGKILL)
    worker = w.start()
    try:
        time.sleep(1.0)
        served.stop("bat")
        polls = _polls(w)
        wait_rows(
            w.dsn,
            "SELECT count(*) FROM energybus.measurements"
            f" WHERE site = '{w.site}' AND metric_name = 'temperature'",
            polls,
        )
        stored, distinct = _stored_once(w)
        # A poll whose reads were answered when the kill came was never written to the
        # outbox: at most the one poll in flight is missing.
        assert polls - 1 <= stored <= polls
        assert stored == distinct
    finally:
        assert worker.stop() == 0
