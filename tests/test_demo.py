"""The demo (``./dev demo``, tools/demo.py): run whole, non-interactively, on free ports:
every source reports, every command is confirmed, the view shows it, and SIGINT stops
everything it started without a traceback; a failure stops it all too, in one line. The
same on locked-down services (``--secure``), with no password it made ever printed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from energybus.worker import load_config
from tests.docs.markdown import ROOT
from tests.helpers import Output
from tests.security.secrets import assert_no_secret, no_traceback
from tools import services
from tools.demo import COMMANDS, EXAMPLE, SECRETS, SECURE_SECRETS, Locked, Ports, site_config
from tools.pki import make_pki

SOURCES = ("ven", "cpi", "voke", "modbus")
SERVICES = ("mosquitto", "postgres", "rabbitmq")
ENV = {
    "ENERGYBUS_DSN": "postgresql://energybus@127.0.0.1:1/energybus",
    "ENERGYBUS_CPI_SECRET": "c",
    "ENERGYBUS_VOKE_API_KEY": "k",
    "ENERGYBUS_VOKE_SIGNING_KEY": "s",
}


def test_the_example_is_what_the_default_ports_run(tmp_path: Path) -> None:
    assert site_config(Ports(), Path(".run/demo")) == EXAMPLE.read_text()
    ports = Ports(
        mqtt=1883, postgres=5432, rabbitmq=5672, metrics=9100, modbus_meter=502,
        modbus_battery=1502,
    )  # fmt: skip
    path = tmp_path / "site.toml"
    path.write_text(site_config(ports, tmp_path / "run"))
    config = load_config(path, environ=ENV)
    assert (config.mqtt.port, config.worker.metrics_port) == (1883, 9100)
    assert config.worker.data_dir == tmp_path / "run" / "worker"
    adapters = config.built
    modbus = adapters["modbus"].options.devices
    assert (modbus["modbus-meter"].port, modbus["modbus-battery"].port) == (502, 1502)
    assert adapters["voke"].options.orgs["acme"].uri == "amqp://127.0.0.1:5672"
    assert set(adapters) == set(SOURCES)
    # Every command the demo sends is one the configuration takes.
    for command in COMMANDS:
        adapter = adapters[command.adapter]
        assert any(re.fullmatch(_regex(f), command.topic) for f in adapter.command_filters)
    # --secure: the same site, its broker and Voke over TLS, the worker logged in.
    make_pki(tmp_path / "pki")  # the configuration's TLS files are read as it loads
    locked = Locked(tmp_path, ports, dict.fromkeys(SECRETS + SECURE_SECRETS, "x"))
    path.write_text(locked.config(site_config(ports, tmp_path / "run")))
    secure = load_config(path, environ={**ENV, "DEMO_WORKER_MQTT_PASSWORD": "p"})
    assert secure.mqtt.username == "energybus-worker" and secure.mqtt.tls is not None
    assert secure.mqtt.tls.cert_file == tmp_path / "pki" / "client.pem"
    assert secure.built["voke"].options.orgs["acme"].uri == "amqps://127.0.0.1:5672"


def _regex(topic_filter: str) -> str:
    return topic_filter.replace("+", "[^/]+")


def _demo(run_dir: Path, *args: str) -> Output:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENERGYBUS_")}
    return Output(
        [sys.executable, "-m", "tools.demo", "--run-dir", str(run_dir), "--free-ports", *args],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _view(text: str) -> str:
    """The newest whole view the demo printed."""
    return text.rsplit("energybus demo  ", 1)[-1]


def _shown(text: str) -> bool:
    view = _view(text)
    rows = [line.split() for line in view.splitlines() if line.startswith("demo/")]
    sources = {row[1] for row in rows if len(row) > 2}
    confirmed = all(re.search(rf"{re.escape(c.series)}\s.*\sconfirmed\s", view) for c in COMMANDS)
    return set(SOURCES) <= sources and confirmed and "commands (newest first)" in view


@pytest.mark.services
def test_the_demo_shows_every_source_and_command_and_stops_what_it_started(
    run_dir: Path,
) -> None:
    where = run_dir / "demo-whole"
    demo = _demo(where, "--plain", "--every", "2", "--stop-services")
    try:
        demo.wait_for(_shown, 240, "every source's values and every command confirmed")
        children = json.loads((where / "demo.json").read_text())
        second = _demo(where, "--plain")  # the same run directory: refused, nothing touched
        assert second.process.wait(60) == 1
        second.stop()
        assert second.errors == [
            f"error    a demo already runs in {where} (pid {demo.process.pid}): "
            "stop it (Ctrl-C) first"
        ]
        assert json.loads((where / "demo.json").read_text()) == children
        servers = [
            json.loads((where / name / "service.json").read_text())["pid"] for name in SERVICES
        ]
    finally:
        status = demo.stop(signal.SIGINT, timeout=120)
    output = demo.text + "\n" + "\n".join(demo.errors)
    assert status == 0, output
    assert "Traceback" not in output and demo.errors == []
    view = _view(demo.text)
    for command in COMMANDS:
        line = next(line for line in view.splitlines() if command.series in line)
        assert command.adapter in line.split()  # each through its own adapter
    first = re.search(r"first canonical value after (\d+\.\d) s", demo.text)
    assert first is not None and float(first.group(1)) > 0
    assert "stopped   the simulators and the worker and the services." in demo.text
    # Everything the demo started is gone: the worker, the five simulators, the services.
    assert children.pop("demo") == demo.process.pid
    assert set(children) == {"worker", "ven", "cpi", "voke", "modbus-meter", "modbus-battery"}
    assert [pid for pid in [*children.values(), *servers] if _alive(pid)] == []
    assert not (where / "demo.json").exists()
    assert [name for name in SERVICES if services.running(name, where)] == []


@pytest.mark.services
@pytest.mark.parametrize(
    ("taken", "error"),
    [
        ("modbus-meter", "modbus-meter exited with status 1; the end of its log:"),
        ("postgres", "postgres: 127.0.0.1:{port} is already in use by another process"),
    ],
)
def test_a_failure_stops_what_the_demo_started_in_one_line(
    run_dir: Path, taken: str, error: str
) -> None:
    """A port the demo needs is taken: by the Modbus meter's simulator, which cannot
    start, or by PostgreSQL. The demo says so (with the end of the simulator's log),
    stops everything else it started, and exits 1."""
    where = run_dir / f"demo-failure-{taken}"
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        demo = _demo(where, "--plain", "--stop-services", f"--{taken}-port", str(port))
        try:
            assert demo.process.wait(180) == 1
        finally:
            demo.stop()
    errors = "\n".join(demo.errors)
    assert errors.startswith("error    " + error.format(port=port))
    if taken == "modbus-meter":
        assert f"cannot serve on 127.0.0.1:{port}" in errors
    assert "Traceback" not in demo.text + errors
    assert not (where / "demo.json").exists()  # every process stopped
    assert [name for name in SERVICES if services.running(name, where)] == []


@pytest.mark.services
def test_the_secure_demo_runs_locked_down_and_prints_no_secret(run_dir: Path) -> None:
    """What it prints at the end works against the locked-down services (its last
    command stops them), and none of the passwords it made is in anything printed."""
    where = run_dir / "demo-secure"
    demo = _demo(where, "--secure", "--plain", "--every", "2")
    try:
        demo.wait_for(_shown, 240, "every source's values and every command confirmed")
        children = json.loads((where / "demo.json").read_text())
        servers = [
            json.loads((where / name / "service.json").read_text())["pid"] for name in SERVICES
        ]
    finally:
        status = demo.stop(signal.SIGINT, timeout=120)
    output = demo.text + "\n" + "\n".join(demo.errors)
    assert status == 0 and demo.errors == [], output
    shown = demo.text.split("Look further", 1)[1].splitlines()
    commands = [line.strip() for line in shown if line.startswith("    ") and "curl" not in line]
    try:
        ran = [
            subprocess.run(["bash", "-c", c], cwd=ROOT, capture_output=True, text=True, timeout=90)
            for c in commands
        ]
        assert [r.returncode for r in ran] == [27, 0, 0, 0], ran  # mosquitto_sub -W: 27
        assert [pid for pid in [*children.values(), *servers] if _alive(pid)] == []
        assert [name for name in SERVICES if services.running(name, where)] == []
    finally:
        for name in SERVICES:  # what a failure left running
            services.stop(name, run_dir=where)
    assert "demo/energy/storage/voke-battery/soc/last" in ran[0].stdout
    assert "storage.voke-battery" in ran[1].stdout
    assert ran[2].stdout.count("confirmed") == len(COMMANDS)
    # Only the demo's own accounts on the broker: no admin.
    users = json.loads((where / "mosquitto" / "credentials.json").read_text())
    assert set(users) == {"energybus-worker", "platform", "watch", "operator"}
    env = where / "demo.env"
    lines = [line.partition("=") for line in env.read_text().splitlines()]
    made = {name: value for name, _, value in lines}
    assert set(made) == {*SECRETS, *SECURE_SECRETS} and env.stat().st_mode & 0o777 == 0o600
    superuser = json.loads((where / "postgres" / "credentials.json").read_text())["energybus"]
    printed = {
        "the demo": output,
        **{f"logs/{log.name}": log.read_text() for log in (where / "logs").glob("*.log")},
        **{command: r.stdout + r.stderr for command, r in zip(commands, ran, strict=True)},
    }
    assert_no_secret(printed, {**made, "the superuser's password": superuser})
    no_traceback(printed.values())
