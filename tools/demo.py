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

``--secure`` runs the same demo on locked-down services (``services.start(secure=True)``)
in a run directory of its own: every connection but Modbus TCP over TLS with
verification, each account with the rights docs/security.md gives it (read from that
document, so that the demo shows what it prescribes), every password generated into
``demo.env`` and handed over through the environment only.
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
import ssl
import subprocess
import sys
import time
import tomllib
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from energybus.cli.login import PASSWORD_ENV, Login
from energybus.cli.mqtt import MqttLink
from energybus.cli.signals import until_signal
from energybus.cli.view import Board
from energybus.cli.watch import Screen, Where, follow
from tools import services
from tools.pki import Pki

__all__ = ["COMMANDS", "SECURE_SECRETS", "Locked", "Ports", "main", "site_config"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "demo.toml"
DEFAULT_RUN_DIR = Path(".run/demo")
SECURE_RUN_DIR = Path(".run/demo-secure")
SECURITY = ROOT / "docs" / "security.md"
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
    def secure(cls) -> Ports:
        """A secure demo's defaults: its services run beside a plain demo's, which stay
        up after it (8883 and 5671 are MQTT's and AMQP's ports for TLS)."""
        return replace(cls(), mqtt=18883, postgres=15433, rabbitmq=15671)

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


SECRETS = ("ENERGYBUS_CPI_SECRET", "ENERGYBUS_VOKE_API_KEY", "ENERGYBUS_VOKE_SIGNING_KEY")
SECURE_SECRETS = (
    "DEMO_WORKER_MQTT_PASSWORD",
    "DEMO_PLATFORM_MQTT_PASSWORD",
    "DEMO_WATCH_MQTT_PASSWORD",
    "DEMO_OPERATOR_MQTT_PASSWORD",
    "DEMO_OWNER_DB_PASSWORD",
    "DEMO_WRITER_DB_PASSWORD",
    "DEMO_READER_DB_PASSWORD",
    "DEMO_VOKE_PASSWORD",
)
"""The passwords of a secure demo's accounts, beside :data:`SECRETS` in ``demo.env``."""


def load_secrets(run_dir: Path, names: tuple[str, ...] = SECRETS) -> dict[str, str]:
    """The demo's secrets, made once per run directory (``demo.env``, mode 0600)."""
    path = run_dir / "demo.env"
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


MQTT_USERS = {
    "energybus-worker": "DEMO_WORKER_MQTT_PASSWORD",
    "platform": "DEMO_PLATFORM_MQTT_PASSWORD",
    "watch": "DEMO_WATCH_MQTT_PASSWORD",
    "operator": "DEMO_OPERATOR_MQTT_PASSWORD",
}
"""A secure demo's broker accounts and the variables of their passwords."""

ROLES = {
    "energybus_owner": "DEMO_OWNER_DB_PASSWORD",
    "energybus_writer": "DEMO_WRITER_DB_PASSWORD",
    "energybus_reader": "DEMO_READER_DB_PASSWORD",
}
"""docs/security.md's PostgreSQL roles and the variables of their passwords."""

OTHER_USERS_ACL = f"""
user platform
# The simulated VEN and CPI plant, on their platforms' topics.
topic readwrite volttron/#
topic readwrite ven/#
topic readwrite cpi/#

user watch
# The live view and mosquitto_sub: reading only.
topic read +/energy/#
topic read energybus/dead_letter/#
topic read energybus/worker/+/status

user operator
# The demo's commands: its site's set topics, nothing else.
topic write {SITE}/energy/+/+/+/set
"""


def documented(name: str) -> str:
    """The content docs/security.md gives for the file ``name``: what it prescribes is
    what the demo installs, so the two cannot drift apart."""
    text = SECURITY.read_text()
    match = re.search(rf"^File `{re.escape(name)}`:\n\n```\w*\n(.*?)^```", text, re.M | re.S)
    if match is None:
        raise DemoError(f"docs/security.md shows no file {name}")
    return match.group(1)


def voke_permissions() -> tuple[str, str, str]:
    """Configure, write and read of docs/security.md's ``rabbitmqctl set_permissions``,
    written for the organisation the demo plays."""
    for line in SECURITY.read_text().splitlines():
        if line.startswith(f"rabbitmqctl set_permissions -p {ORG} {ORG} "):
            configure, write, read = shlex.split(line)[-3:]
            return configure, write, read
    raise DemoError(f"docs/security.md gives no rabbitmqctl set_permissions for {ORG}")


@dataclass(frozen=True)
class Locked:
    """What ``--secure`` changes: the accounts, their passwords (``demo.env``) and the
    run directory's certificates (tools/pki.py, made by the services' first start)."""

    run_dir: Path
    ports: Ports
    secrets: dict[str, str] = field(repr=False)

    @property
    def pki(self) -> Pki:
        return Pki.at(self.run_dir / "pki")

    def acl(self) -> str:
        """docs/security.md's worker ACL, for site ``demo`` and the demo's client id, and
        the demo's other users', each allowed only what it does."""
        client_id = tomllib.loads(EXAMPLE.read_text())["mqtt"]["client_id"]
        text = documented("worker.acl")
        for old, new in (
            ("plant-a/", f"{SITE}/"),
            ("energybus/worker/energybus/", f"energybus/worker/{client_id}/"),
        ):
            if old not in text:
                raise DemoError(f"docs/security.md's worker.acl has no {old} to adapt")
            text = text.replace(old, new)
        return text + OTHER_USERS_ACL

    def mqtt_users(self) -> dict[str, str]:
        return {user: self.secrets[name] for user, name in MQTT_USERS.items()}

    def login(self, user: str) -> Login:
        context = ssl.create_default_context(cafile=str(self.pki.ca))
        context.load_cert_chain(self.pki.client_cert, self.pki.client_key)
        return Login(user, self.secrets[MQTT_USERS[user]], context)

    def mqtt_options(self) -> list[str]:
        """The simulators' login; the password goes in ``ENERGYBUS_MQTT_PASSWORD``."""
        pki = self.pki
        return [
            *("--username", "platform", "--ca-file", str(pki.ca)),
            *("--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key)),
        ]

    def dsn(self, role: str, password: str | None = None, ca: str | None = None) -> str:
        """PostgreSQL as ``role`` over TLS, its certificate and name checked; without a
        password, for showing."""
        who = role if password is None else f"{role}:{urllib.parse.quote(password, safe='')}"
        return (
            f"postgresql://{who}@127.0.0.1:{self.ports.postgres}/energybus"
            f"?sslmode=verify-full&sslrootcert={ca or self.pki.ca}"
        )

    def role_dsn(self, role: str) -> str:
        return self.dsn(role, self.secrets[ROLES[role]])

    def config(self, plain: str) -> str:
        """The plain site configuration with the broker and Voke locked down: the
        historian's DSN comes from the environment, and Modbus TCP has no TLS."""
        pki = self.pki
        ca, cert, key = (
            json.dumps(str(path)) for path in (pki.ca, pki.client_cert, pki.client_key)
        )
        login = 'username = "energybus-worker"\npassword = "${DEMO_WORKER_MQTT_PASSWORD}"\n'
        tls = f"[mqtt.tls]\nca_file = {ca}\ncert_file = {cert}\nkey_file = {key}\n\n"
        edits: tuple[tuple[str, Callable[[re.Match[str]], str]], ...] = (
            (r"^client_id = .*\n", lambda m: m[0] + login),
            (r"^\[historian\]$", lambda m: tls + m[0]),
            (r'^uri = "amqp://(.*)"$', lambda m: f'uri = "amqps://{m[1]}"\nca_file = {ca}'),
        )
        text = plain
        for pattern, edit in edits:
            text, count = re.subn(pattern, edit, text, flags=re.M)
            if count != 1:
                raise DemoError(f"examples/demo.toml has no single line {pattern} to lock down")
        return text

    def tenants(self) -> dict[str, tuple[str, str]]:
        """The partner ``acme``, as the worker logs in, and ``voke``, the platform the
        simulator plays, with every right on the org's vhost."""
        return {
            ORG: (self.secrets["ENERGYBUS_VOKE_API_KEY"], ORG),
            "voke": (self.secrets["DEMO_VOKE_PASSWORD"], ORG),
        }

    def voke_url(self, service: services.Service) -> str:
        password = urllib.parse.quote(self.secrets["DEMO_VOKE_PASSWORD"], safe="")
        cafile = urllib.parse.quote(str(self.pki.ca))
        return f"amqps://voke:{password}@{service.host}:{service.port}/?cafile={cafile}"


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
        self.locked: Locked | None = None
        """With ``--secure``: the accounts and certificates of the locked-down services."""
        if args.secure:
            names = SECRETS + SECURE_SECRETS
            self.locked = Locked(self.run_dir, self.ports, load_secrets(self.run_dir, names))

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
        if self.locked is not None:
            self.say(
                "secure    TLS with verification and a password on every connection but "
                "Modbus TCP; each account with the rights of docs/security.md"
            )
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
            text = site_config(self.ports, self.run_dir)
            locked = self.locked
            if locked is None:
                config.write_text(text)
                env = {**os.environ, **load_secrets(self.run_dir), "ENERGYBUS_DSN": self.dsn}
                self._start_worker_and_simulators(config, env, env)
                view_dsn, view_login = self.dsn, None
            else:
                config.write_text(locked.config(text))
                # Each process gets the passwords of its own accounts, and no other.
                env = {**os.environ, **{name: locked.secrets[name] for name in SECRETS}}
                worker_env = {
                    **env,
                    "DEMO_WORKER_MQTT_PASSWORD": locked.secrets["DEMO_WORKER_MQTT_PASSWORD"],
                    "ENERGYBUS_DSN": locked.role_dsn("energybus_writer"),
                }
                platform = {PASSWORD_ENV: locked.secrets["DEMO_PLATFORM_MQTT_PASSWORD"]}
                self._start_worker_and_simulators(config, worker_env, {**env, **platform})
                view_dsn, view_login = locked.role_dsn("energybus_reader"), locked.login("watch")
            self.draw()
            follower = asyncio.create_task(
                follow(
                    self.board,
                    Where(
                        mqtt_port=self.ports.mqtt,
                        dsn=view_dsn,
                        metrics_url=f"http://127.0.0.1:{self.ports.metrics}/metrics",
                        login=view_login,
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
        secure = self.locked is not None
        try:
            service = await asyncio.to_thread(
                services.start, name, run_dir=self.run_dir, port=port, secure=secure
            )
        except services.ServiceError as error:
            self.status[name] = "failed"
            raise DemoError(str(error)) from None
        self.services.append(name)
        self.status[name] = f":{service.port}"
        took = time.monotonic() - began
        self.say(f"service   {name} on {service.host}:{service.port} ({took:.1f} s)")
        if self.locked is not None and name == "mosquitto":
            try:
                await asyncio.to_thread(
                    services.mosquitto_users, service, self.locked.mqtt_users(), self.locked.acl()
                )
            except services.ServiceError as error:
                raise DemoError(str(error)) from None
            self.say(
                f"accounts  mosquitto: {', '.join(MQTT_USERS)}; the worker's ACL is "
                f"docs/security.md's for site {SITE}"
            )
        if self.locked is not None and name == "postgres":
            await self._roles(self.locked, service)
        return service

    async def _roles(self, locked: Locked, postgres: services.Service) -> None:
        """docs/security.md's roles (roles.sql), each with its password from demo.env,
        made by the superuser the secure service was initialised with."""
        import asyncpg

        try:
            superuser = locked.dsn("energybus", services.credentials(postgres)["energybus"])
            # A statement that fails is logged with its text: not these, with passwords.
            quiet = {"log_statement": "none", "log_min_error_statement": "panic"}
            conn = await asyncpg.connect(superuser, timeout=10, server_settings=quiet)
            try:
                query = "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1::text[])"
                if await conn.fetchval(query, list(ROLES)) == 0:
                    await conn.execute(documented("roles.sql"))
                for role, name in ROLES.items():
                    await conn.execute(f"ALTER ROLE {role} PASSWORD '{locked.secrets[name]}'")
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, services.ServiceError) as error:
            raise DemoError(f"cannot make the historian's roles: {error}") from None
        self.say(f"accounts  postgres: {', '.join(ROLES)}")

    async def _schema(self) -> None:
        if self.locked is not None:
            await self._init_as_owner(self.locked)
            return
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

    async def _init_as_owner(self, locked: Locked) -> None:
        """The schema made by its owner with ``energybus historian init``, which grants
        the writer (the worker) and the reader (the view) their rights."""
        args = ["historian", "init", "--writer", "energybus_writer", "--reader", "energybus_reader"]
        env = {**os.environ, "ENERGYBUS_DSN": locked.role_dsn("energybus_owner")}
        with (self.children.logs / "historian-init.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *ENERGYBUS, *args, stdout=log, stderr=subprocess.STDOUT, env=env
            )
            status = await process.wait()
        if status != 0:
            raise DemoError(
                f"energybus historian init exited with status {status}; the end of its log:\n"
                + self.children.tail("historian-init")
            )
        self.say(f"historian schema energybus made by energybus_owner: energybus {' '.join(args)}")

    def _start_worker_and_simulators(
        self, config: Path, env: dict[str, str], simulator_env: dict[str, str]
    ) -> None:
        p = self.ports
        mqtt = ["--host", "127.0.0.1", "--port", str(p.mqtt), "--interval", "2"]
        if self.locked is not None:
            mqtt += self.locked.mqtt_options()
        start = self.children.start
        start("worker", ["run", "--config", str(config)], env)
        start("ven", ["simulate", "ven", *mqtt], simulator_env)
        start("cpi", ["simulate", "cpi", *mqtt], simulator_env)
        for name, port, map_name in (
            ("modbus-meter", p.modbus_meter, "eastron_sdm630"),
            ("modbus-battery", p.modbus_battery, "sunspec_battery"),
        ):
            args = ["simulate", "modbus", "--map", map_name, "--port", str(port)]
            start(name, args, simulator_env)
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
        if self.locked is None:
            await asyncio.to_thread(services.rabbitmq_tenants, service, {ORG: (api_key, ORG)})
            url = f"amqp://{ORG}:{api_key}@{service.host}:{service.port}/"
        else:
            permissions = {ORG: voke_permissions()}
            await asyncio.to_thread(
                services.rabbitmq_tenants, service, self.locked.tenants(), permissions
            )
            url = self.locked.voke_url(service)
            self.say(f"accounts  rabbitmq: {ORG} (docs/security.md's permissions), voke")
        voke_env = {
            **env,
            "ENERGYBUS_VOKE_URL": url,
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
        login = None if self.locked is None else self.locked.login("operator")
        await link.connect(
            "127.0.0.1", self.ports.mqtt, name="energybus-demo-commands", login=login
        )
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
        subscribe = f"mosquitto_sub -h 127.0.0.1 -p {p.mqtt}"
        topic = f"-t '{SITE}/energy/+/+/+/last' -v -W 2"
        psql = f'psql {self.dsn} -c "{query}"'
        commands = f"{energybus} commands list --dsn {self.dsn} --site {SITE}"
        look = "Look further:"
        if self.locked is not None:
            # Each command reads its password from demo.env in a subshell of its own: in
            # no output, and not left in the reader's shell.
            env = shlex.quote(self._path(self.run_dir / "demo.env"))
            pki = self.locked.pki
            ca, cert, key = (
                shlex.quote(self._path(f)) for f in (pki.ca, pki.client_cert, pki.client_key)
            )
            subscribe = (
                f"(. {env} && {subscribe} --cafile {ca} --cert {cert} --key {key} "
                f'-u watch -P "$DEMO_WATCH_MQTT_PASSWORD" {topic})'
            )
            dsn = shlex.quote(self.locked.dsn("energybus_reader", ca=self._path(pki.ca)))
            reader = f'(. {env} && PGPASSWORD="$DEMO_READER_DB_PASSWORD"'
            psql = f'{reader} psql {dsn} -c "{query}")'
            commands = f"{reader} {energybus} commands list --dsn {dsn} --site {SITE})"
            look = f"Look further, as the read-only accounts (their passwords in {env}):"
        else:
            subscribe = f"{subscribe} {topic}"
        if self.args.stop_services:
            lines.append(f"Everything is stopped; the data stays in {run_dir}.")
        else:
            lines += [
                "Mosquitto, PostgreSQL and RabbitMQ keep running, with what they hold.",
                look,
                "  the newest value of every series (retained on the bus):",
                f"    {subscribe}",
                "  the historian:",
                f"    {psql}",
                "  the commands and what became of them:",
                f"    {commands}",
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
    parser.add_argument(
        "--secure",
        action="store_true",
        help="on locked-down services: TLS, passwords, least privilege (docs/security.md)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        help=f"default {DEFAULT_RUN_DIR}, {SECURE_RUN_DIR} with --secure (either kind of "
        "services in a run directory, never both)",
    )
    parser.add_argument(
        "--free-ports", action="store_true", help="free ports instead of the demo's defaults"
    )
    plain, secure = Ports(), Ports.secure()
    for name in Ports.__dataclass_fields__:
        default = f"default {getattr(plain, name)}"
        if getattr(secure, name) != getattr(plain, name):
            default += f", {getattr(secure, name)} with --secure"
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, help=default)
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
    if args.run_dir is None:
        args.run_dir = SECURE_RUN_DIR if args.secure else DEFAULT_RUN_DIR
    base = Ports.free() if args.free_ports else secure if args.secure else plain
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
