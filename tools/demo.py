"""The demo: every kind of source at once, through a local worker, watched live.

``./dev demo`` runs ``python -m tools.demo``, which

1. starts Mosquitto, PostgreSQL and RabbitMQ on loopback (tools/services.py; the demo's
   default ports, or others), creates the historian schema and, on RabbitMQ, the Voke
   organisation ``acme`` (a user and a vhost);
2. writes the worker's configuration, ``examples/demo.toml`` with this run's ports, to
   ``<run-dir>/site.toml`` and starts the worker (``energybus run``) and the simulators
   (``energybus simulate``: a VEN, a signed CPI plant, the Voke org, a Modbus meter and
   a Modbus battery), each a process of its own with its log in ``<run-dir>/logs``;
3. shows the live view of ``energybus watch`` until Ctrl-C (SIGINT) or SIGTERM, and
   sends one command through each commandable source once it has reported, so that each
   round trip (sent, then confirmed) shows in the view;
4. stops the simulators and the worker, leaves the services running with what they
   hold (``--stop-services`` stops them too) and prints how to look further.

Any failure stops what the demo started and is one line (and the end of the log that
explains it), never a traceback. Secrets (the CPI plant's, the Voke org's) are made once
per run directory and kept in ``<run-dir>/demo.env``, readable by the owner only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from energybus.cli.mqtt import MqttLink
from energybus.cli.signals import until_signal
from energybus.cli.view import Board
from energybus.cli.watch import Screen, Where, follow
from tools import services

__all__ = ["COMMANDS", "Ports", "main", "site_config"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "demo.toml"
DEFAULT_RUN_DIR = Path(".run/demo")
ENERGYBUS = [sys.executable, "-m", "energybus.cli"]
SITE = "demo"
ORG = "acme"
T = TypeVar("T")


@dataclass(frozen=True)
class Ports:
    """Every port the demo listens on; the defaults are those of examples/demo.toml."""

    mqtt: int = services.DEFAULT_PORTS["mosquitto"]
    postgres: int = services.DEFAULT_PORTS["postgres"]
    rabbitmq: int = services.DEFAULT_PORTS["rabbitmq"]
    metrics: int = 9464
    modbus_meter: int = 5020
    modbus_battery: int = 5021

    @classmethod
    def free(cls) -> Ports:
        chosen: set[int] = set()
        while len(chosen) < len(cls.__dataclass_fields__):
            chosen.add(services.free_port())
        return cls(*sorted(chosen))


@dataclass(frozen=True)
class Command:
    """One command the demo sends: a canonical ``set``, once its entity has reported."""

    adapter: str
    entity: tuple[str, str]
    """(entity type, entity id) on site ``demo``: it must have reported first, so that
    the adapter knows it (a VEN is known from its first metering)."""
    metric: str
    value: float
    extra: tuple[tuple[str, Any], ...] = ()
    """More of the Profile B envelope (a VEN event's ``duration_s``)."""

    @property
    def series(self) -> str:
        return f"{SITE}/{self.entity[0]}/{self.entity[1]}/{self.metric}"

    @property
    def topic(self) -> str:
        return f"{SITE}/energy/{self.entity[0]}/{self.entity[1]}/{self.metric}/set"

    def payload(self, now: float) -> bytes:
        """Profile B with ``observed_at``, so that the command cannot run late."""
        observed = datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z")
        body = {"value": self.value, "observed_at": observed, **dict(self.extra)}
        return json.dumps(body).encode()


COMMANDS = (
    Command("ven", ("load", "ven-1"), "shed_power", 3000, (("duration_s", 900),)),
    Command("cpi", ("storage", "cpi-battery"), "power_setpoint", -2500),
    Command("voke", ("storage", "voke-battery"), "power_setpoint", -2000),
    Command("modbus", ("storage", "modbus-battery"), "max_charge_power", 4000),
)
"""A demand-response event of 3 kW on the VEN; 2.5 kW and 2 kW of charging on the CPI and
Voke batteries; a 4 kW charge limit on the Modbus battery (written, read back)."""


def site_config(ports: Ports, run_dir: Path) -> str:
    """examples/demo.toml with ``ports`` and ``run_dir`` in place of the defaults."""
    text = EXAMPLE.read_text()
    for default, port in zip(
        (f.default for f in Ports.__dataclass_fields__.values()), asdict(ports).values(),
        strict=True,
    ):  # fmt: skip
        text = re.sub(rf"(?<![\d.]){default}(?!\d)", str(port), text)
    return text.replace(str(DEFAULT_RUN_DIR), str(run_dir))


def load_secrets(run_dir: Path) -> dict[str, str]:
    """The demo's secrets, made once per run directory (``demo.env``, mode 0600)."""
    path = run_dir / "demo.env"
    names = ("ENERGYBUS_CPI_SECRET", "ENERGYBUS_VOKE_API_KEY", "ENERGYBUS_VOKE_SIGNING_KEY")
    found: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            found[name] = value
    if all(found.get(name) for name in names):
        return {name: found[name] for name in names}
    made = {name: secrets.token_hex(16) for name in names}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write("".join(f"{name}={value}\n" for name, value in made.items()))
    return made


class DemoError(Exception):
    """A step failed; the message is one line for the user."""


class Children:
    """The processes the demo starts: each in a session of its own (Ctrl-C reaches the
    demo alone, which stops them in order), its output in a log, its PID recorded in
    ``<run-dir>/demo.json`` so that a demo killed outright is cleaned up by the next."""

    def __init__(self, run_dir: Path) -> None:
        self.logs = run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.record = run_dir / "demo.json"
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def leftovers(self) -> list[str]:
        """Stop what a demo killed outright in this run directory left running; their
        names. A demo that still runs there is an error: its ports are taken."""
        try:
            recorded = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return []
        running = {name: pid for name, pid in recorded.items() if _runs(pid, name)}
        if "demo" in running:
            raise DemoError(
                f"a demo already runs in {self.record.parent} (pid {running['demo']}): "
                "stop it (Ctrl-C) first"
            )
        for pid in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.record.unlink(missing_ok=True)
        return list(running)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        with (self.logs / f"{name}.log").open("wb") as log:
            self.running[name] = subprocess.Popen(
                [*ENERGYBUS, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        self._write()

    def _write(self) -> None:
        pids = {"demo": os.getpid(), **{n: p.pid for n, p in self.running.items()}}
        self.record.write_text(json.dumps(pids))

    def exited(self) -> tuple[str, int] | None:
        """A process that ended on its own, and its status."""
        for name, process in self.running.items():
            status = process.poll()
            if status is not None:
                return name, status
        return None

    def tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(f"         | {line}" for line in text.splitlines()[-lines:])

    def stop(self, names: list[str], timeout: float) -> list[str]:
        """SIGTERM to ``names`` at once, SIGKILL to what is left after ``timeout``; the
        names of those that had to be killed."""
        processes = {n: self.running.pop(n) for n in names if n in self.running}
        if not processes:
            return []
        for process in processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        killed = []
        deadline = time.monotonic() + timeout
        for name, process in processes.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                killed.append(name)
            else:
                # Its children, if any, go with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        if self.running:
            self._write()
        else:
            self.record.unlink(missing_ok=True)
        return killed


def _runs(pid: int, name: str) -> bool:
    """Whether ``pid`` is still the process a demo recorded as ``name`` (not a PID the
    system has given to something else since)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return (b"tools.demo" if name == "demo" else b"energybus.cli") in command


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir: Path = args.run_dir.resolve()
        self.ports: Ports = args.ports
        self.started = time.time()
        self.dev_started: float | None = args.started_at
        self.live = sys.stdout.isatty() and not args.plain
        self.board = Board()
        self.screen = Screen(live=self.live, title="energybus demo")
        self.children = Children(self.run_dir)
        self.services: list[str] = []
        self.status: dict[str, str] = {}
        """Each service: its port, or how it is getting on."""
        self.processes: list[str] = []
        self.sent: dict[str, str] = {}
        self.first_value: str | None = None
        self.viewing = False
        """Whether the live view is being redrawn on the terminal."""
        self.dsn = f"postgresql://energybus@127.0.0.1:{self.ports.postgres}/energybus"

    # Output -------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        """A line of progress, printed unless the live view holds the screen (its own
        lines at the top say how things stand then)."""
        if not self.viewing:
            print(text, flush=True)

    def notes(self) -> list[str]:
        services_line = "  ".join(f"{name} {state}" for name, state in self.status.items())
        lines = [f"services  {services_line}", f"running   {'  '.join(self.processes)}"]
        lines.append(
            self.first_value
            or f"waiting   for the first canonical value ({time.time() - self.started:.0f} s)"
        )
        waiting = [c.adapter for c in COMMANDS if c.adapter not in self.sent]
        line = f"commands  sent to {', '.join(self.sent) or 'none yet'}"
        if waiting:
            line += f"; each of {', '.join(waiting)} once it has reported"
        lines.append(line)
        lines.append(f"Ctrl-C stops the demo; logs in {self._path(self.children.logs)}")
        return lines

    def _path(self, path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(Path.cwd()))
        return str(path)

    def draw(self) -> None:
        self.viewing = self.live
        self.check_first_value()
        self.screen.notes = self.notes()
        self.screen.draw(self.board)

    def check_first_value(self) -> None:
        at = self.board.first_value_at
        if at is None or self.first_value is not None:
            return
        text = f"first canonical value after {at - self.started:.1f} s"
        if self.dev_started is not None:
            text += f" ({at - self.dev_started:.1f} s since ./dev demo started)"
        self.first_value = text
        if not self.live:
            print(text, flush=True)

    # Steps --------------------------------------------------------------------------------

    async def main(self, stop: asyncio.Event) -> int:
        try:
            await self._run(stop)
        except DemoError as error:
            self.screen.close()
            print(f"error    {error}", file=sys.stderr, flush=True)
            return 1
        finally:
            self.screen.close()
            self._stop_children()
            if self.args.stop_services:
                await self._stop_services()
        self._farewell()
        return 0

    async def _run(self, stop: asyncio.Event) -> None:
        left = self.children.leftovers()
        if left:
            self.say(f"cleanup   stopped what an earlier demo left running: {', '.join(left)}")
        self.say(f"demo      run directory {self._path(self.run_dir)}")
        self.status = dict.fromkeys(("mosquitto", "postgres", "rabbitmq"), "starting")
        rabbitmq = asyncio.create_task(self._service("rabbitmq", self.ports.rabbitmq))
        try:
            # Both to their end, so that whatever started is known and can be stopped.
            mosquitto = self._service("mosquitto", self.ports.mqtt)
            postgres = self._service("postgres", self.ports.postgres)
            both = asyncio.gather(mosquitto, postgres, return_exceptions=True)
            started = await _until(stop, both)
            for outcome in started or ():
                if isinstance(outcome, BaseException):
                    raise outcome
            if stop.is_set():
                return
            await _until(stop, self._schema())
            if stop.is_set():
                return
            config = self.run_dir / "site.toml"
            config.write_text(site_config(self.ports, self.run_dir))
            env = {**os.environ, **load_secrets(self.run_dir), "ENERGYBUS_DSN": self.dsn}
            self._start_worker_and_simulators(config, env)
            self.draw()
            follower = asyncio.create_task(
                follow(
                    self.board,
                    Where(
                        mqtt_port=self.ports.mqtt,
                        dsn=self.dsn,
                        metrics_url=f"http://127.0.0.1:{self.ports.metrics}/metrics",
                    ),
                    stop=stop,
                    every_s=1.0 if self.live else self.args.every,
                    draw=self.draw,
                    commands_since=datetime.fromtimestamp(self.started, UTC),
                )
            )
            commander = asyncio.create_task(self._commands(stop))
            voke = asyncio.create_task(self._voke(rabbitmq, env))
            tasks = [follower, commander, voke]
            if self.args.duration is not None:
                asyncio.get_running_loop().call_later(self.args.duration, stop.set)
            try:
                while not stop.is_set():
                    for task in tasks:
                        if task.done() and not task.cancelled() and task.exception():
                            raise DemoError(_reason(task.exception()))
                    exited = self.children.exited()
                    if exited is not None:
                        name, status = exited
                        raise DemoError(
                            f"{name} exited with status {status}; the end of its log:\n"
                            + self.children.tail(name)
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.5)
            finally:
                stop.set()
                for task in (commander, voke):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.screen.close()
                self.viewing = False
        finally:
            if not rabbitmq.done():
                self.say("stopping  waiting for RabbitMQ to finish starting")
            await asyncio.gather(rabbitmq, return_exceptions=True)

    async def _service(self, name: str, port: int) -> services.Service:
        began = time.monotonic()
        try:
            service = await asyncio.to_thread(services.start, name, run_dir=self.run_dir, port=port)
        except services.ServiceError as error:
            self.status[name] = "failed"
            raise DemoError(str(error)) from None
        self.services.append(name)
        self.status[name] = f":{service.port}"
        took = time.monotonic() - began
        self.say(f"service   {name} on {service.host}:{service.port} ({took:.1f} s)")
        return service

    async def _schema(self) -> None:
        import asyncpg

        from energybus.historian import migrate

        try:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            try:
                result = await migrate(conn)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError) as error:
            raise DemoError(f"cannot create the historian schema: {error}") from None
        self.say(f"historian schema energybus at version {result.current}")

    def _start_worker_and_simulators(self, config: Path, env: dict[str, str]) -> None:
        p = self.ports
        mqtt = ["--host", "127.0.0.1", "--port", str(p.mqtt), "--interval", "2"]
        start = self.children.start
        start("worker", ["run", "--config", str(config)], env)
        start("ven", ["simulate", "ven", *mqtt], env)
        start("cpi", ["simulate", "cpi", *mqtt], env)
        for name, port, map_name in (
            ("modbus-meter", p.modbus_meter, "eastron_sdm630"),
            ("modbus-battery", p.modbus_battery, "sunspec_battery"),
        ):
            start(name, ["simulate", "modbus", "--map", map_name, "--port", str(port)], env)
        self.processes += [
            f"worker (metrics :{p.metrics})",
            "ven",
            "cpi",
            f"modbus-meter :{p.modbus_meter}",
            f"modbus-battery :{p.modbus_battery}",
        ]
        self.say(
            f"started   the worker (energybus run --config {self._path(config)}), the VEN, the "
            f"CPI plant, the Modbus meter (:{p.modbus_meter}) and battery (:{p.modbus_battery})"
        )

    async def _voke(self, rabbitmq: asyncio.Task[services.Service], env: dict[str, str]) -> None:
        """Once RabbitMQ is up: the org's user and vhost, then the Voke simulator."""
        # Shielded: stopping this task must not cancel RabbitMQ's start, which goes on in
        # its thread regardless and must be known to have ended, to be stopped.
        service = await asyncio.shield(rabbitmq)
        api_key = env["ENERGYBUS_VOKE_API_KEY"]
        await asyncio.to_thread(services.rabbitmq_tenants, service, {ORG: (api_key, ORG)})
        voke_env = {
            **env,
            "ENERGYBUS_VOKE_URL": f"amqp://{ORG}:{api_key}@{service.host}:{service.port}/",
            "ENERGYBUS_VOKE_SIGNING_KEY": env["ENERGYBUS_VOKE_SIGNING_KEY"],
        }
        args = ["simulate", "voke", "--org", ORG, "--vhost", ORG, "--rate", "2"]
        args += ["--meter-interval", "30", "--mode-every", "0"]
        self.children.start("voke", args, voke_env)
        self.processes.append("voke")
        self.say(f"started   the Voke org {ORG} (vhost {ORG}, plant P-1)")

    async def _commands(self, stop: asyncio.Event) -> None:
        """Each command once its entity has reported, through a connection of its own."""
        link = MqttLink()
        await link.connect("127.0.0.1", self.ports.mqtt, name="energybus-demo-commands")
        try:
            pending = list(COMMANDS)
            while pending and not stop.is_set():
                for command in list(pending):
                    entity = self.board.entities.get((SITE, *command.entity))
                    if entity is not None and entity.live():
                        await link.publish(command.topic, command.payload(time.time()))
                        self.sent[command.adapter] = command.series
                        pending.remove(command)
                await asyncio.sleep(0.5)
        finally:
            await link.close()

    # The end ------------------------------------------------------------------------------

    def _stop_children(self) -> None:
        # The sources first, then the worker, which flushes what it holds.
        if self.children.running:
            print("stopping  the simulators, then the worker", flush=True)
        simulators = [n for n in self.children.running if n != "worker"]
        killed = self.children.stop(simulators, timeout=15)
        killed += self.children.stop(["worker"], timeout=30)
        if killed:
            print(f"stopping  killed (no clean stop in time): {', '.join(killed)}", flush=True)

    async def _stop_services(self) -> None:
        for name in reversed(self.services):
            with contextlib.suppress(services.ServiceError):
                await asyncio.to_thread(services.stop, name, run_dir=self.run_dir)

    def _farewell(self) -> None:
        p = self.ports
        run_dir = self._path(self.run_dir)
        script = Path(sys.executable).with_name("energybus")
        energybus = self._path(script) if script.exists() else "energybus"
        query = (
            "SELECT device_id, metric_name, count(*), max(observed_at) "
            f"FROM energybus.measurements WHERE site = '{SITE}' GROUP BY 1, 2 ORDER BY 1, 2"
        )
        lines = [
            "",
            "stopped   the simulators and the worker"
            + (" and the services." if self.args.stop_services else "."),
        ]
        if self.first_value:
            lines.append(self.first_value)
        lines.append("")
        if self.args.stop_services:
            lines.append(f"Everything is stopped; the data stays in {run_dir}.")
        else:
            lines += [
                "Mosquitto, PostgreSQL and RabbitMQ keep running, with what they hold.",
                "Look further:",
                "  the newest value of every series (retained on the bus):",
                f"    mosquitto_sub -h 127.0.0.1 -p {p.mqtt} -t '{SITE}/energy/+/+/+/last' -v -W 2",
                "  the historian:",
                f'    psql {self.dsn} -c "{query}"',
                "  the commands and what became of them:",
                f"    {energybus} commands list --dsn {self.dsn} --site {SITE}",
                "  the worker's metrics, while the demo runs:",
                f"    curl -s http://127.0.0.1:{p.metrics}/metrics | grep '^energybus_'",
                f"  the logs: {self._path(self.children.logs)}/",
                "Stop the services:",
                f"    python3 tools/services.py down --run-dir {shlex.quote(run_dir)}",
            ]
        print("\n".join(lines), flush=True)


async def _until(stop: asyncio.Event, step: Awaitable[T]) -> T | None:
    """``step``, or None when ``stop`` is set first (the step is still waited for:
    whatever it starts must be known to be stopped)."""
    task = asyncio.ensure_future(step)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    result = await task
    return None if stop.is_set() else result


def _reason(error: BaseException | None) -> str:
    if isinstance(error, DemoError | ConnectionError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.demo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument(
        "--free-ports", action="store_true", help="free ports instead of the demo's defaults"
    )
    defaults = Ports()
    for name in Ports.__dataclass_fields__:
        parser.add_argument(
            f"--{name.replace('_', '-')}-port", type=int, default=None,
            help=f"default {getattr(defaults, name)}",
        )  # fmt: skip
    parser.add_argument(
        "--stop-services", action="store_true", help="also stop the services at the end"
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument(
        "--plain", action="store_true", help="print whole views, even on a terminal"
    )
    parser.add_argument(
        "--every", type=float, default=5.0, help="seconds between plain views (default 5)"
    )
    parser.add_argument("--started-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = Ports.free() if args.free_ports else defaults
    chosen = {
        name: getattr(args, f"{name}_port") or getattr(base, name)
        for name in Ports.__dataclass_fields__
    }
    args.ports = Ports(**chosen)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(args)
    try:
        return until_signal(demo.main)
    except Exception:  # a defect: one line here, the traceback in the log
        log = demo.children.logs / "demo.log"
        log.write_text(traceback.format_exc())
        print(f"error    the demo failed (a defect); details in {log}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
