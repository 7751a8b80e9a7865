"""How a benchmark's clients reach the broker and the database.

Plain, as the test services take them: MQTT over TCP without a login, PostgreSQL trusting
loopback. Locked down, as tools/services.py's secure mode runs them and a site would:
every MQTT client (the worker, the load generator, the bus meter) over TLS with the run
directory's client certificate and a user and password of its own, which an ACL allows
only what that client does; PostgreSQL over TLS (``sslmode=verify-full``) with the
superuser's SCRAM password. The benchmark then measures what the lock-down costs, so
the clients do exactly the work a locked-down site's would.

Passwords reach the processes a benchmark starts through their environment, never their
command line (which every user can read in ``/proc``) nor a file of their own.
"""

from __future__ import annotations

import os
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tools import services

MQTT_PASSWORD = "ENERGYBUS_BENCH_MQTT_PASSWORD"
"""The variable that carries an MQTT client's password to the process it runs in."""
PG_PASSWORD = "ENERGYBUS_BENCH_PG_PASSWORD"
"""The variable that carries the database password to the worker and the commands."""
CLIENTS = ("worker", "load", "meter")


@dataclass(frozen=True)
class MqttLogin:
    """One MQTT client's TLS files and login on a locked-down broker."""

    ca: Path
    cert: Path
    key: Path
    username: str
    password: str = field(repr=False)

    def context(self) -> ssl.SSLContext:
        """Verifies the broker against the run directory's CA and host name, and shows
        the client certificate the broker requires."""
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(self.cert, self.key)
        return context

    def args(self) -> list[str]:
        """Options of benchmarks/load.py; the password goes by :data:`MQTT_PASSWORD`."""
        return ["--ca", str(self.ca), "--cert", str(self.cert), "--key", str(self.key),
                "--username", self.username]  # fmt: skip


@dataclass(frozen=True)
class Access:
    """The broker and database of one run, and how each client of the run logs in."""

    mqtt: services.Service
    pg: services.Service
    logins: Mapping[str, MqttLogin] = field(default_factory=dict)
    """By client (:data:`CLIENTS`); none on plain services."""
    pg_password: str | None = field(default=None, repr=False)

    @property
    def secure(self) -> bool:
        return self.mqtt.secure

    @property
    def transport(self) -> str:
        return "tls" if self.secure else "plain"

    def login(self, client: str) -> MqttLogin | None:
        return self.logins.get(client)

    def _dsn(self, password: str) -> str:
        ca = quote(str(services.pki_of(self.pg).ca), safe="/")
        return (
            f"postgresql://energybus:{password}@{self.pg.host}:{self.pg.port}/energybus"
            f"?sslmode=verify-full&sslrootcert={ca}"
        )

    @property
    def dsn(self) -> str:
        """The database as this process's own queries reach it (with the password, on a
        locked-down server: kept in memory, never printed)."""
        if self.pg_password is None:
            return self.pg.url
        return self._dsn(quote(self.pg_password, safe=""))

    def env(self, client: str = "worker") -> dict[str, str]:
        """The environment of a process the run starts for ``client``: its MQTT password
        on a locked-down broker; for the worker and the commands run as it, the
        database's too, and ``ENERGYBUS_DSN`` for the commands that take a DSN."""
        env = dict(os.environ)
        login = self.login(client)
        if login is not None:
            env[MQTT_PASSWORD] = login.password
        if client == "worker":
            if self.pg_password is not None:
                env[PG_PASSWORD] = self.pg_password
            env["ENERGYBUS_DSN"] = self.dsn
        return env

    def worker_config(self, *, data_dir: str, client_id: str, site: str, historian: bool) -> str:
        """A worker's site.toml for the VEN adapter on ``site``; its secrets are
        ``${VAR}`` references to :meth:`env`'s variables."""
        mqtt = f'[mqtt]\nport = {self.mqtt.port}\nclient_id = "{client_id}"\n'
        login = self.login("worker")
        if login is not None:
            mqtt += (
                f'username = "{login.username}"\npassword = "${{{MQTT_PASSWORD}}}"\n'
                f'[mqtt.tls]\nca_file = "{login.ca}"\ncert_file = "{login.cert}"\n'
                f'key_file = "{login.key}"\n'
            )
        dsn = self.pg.url if self.pg_password is None else self._dsn(f"${{{PG_PASSWORD}}}")
        return (
            f'[worker]\ndata_dir = "{data_dir}"\n{mqtt}'
            + (f'[historian]\ndsn = "{dsn}"\n' if historian else "")
            + f'[adapters.ven]\nsite = "{site}"\n'
        )


def plain(mqtt: services.Service, pg: services.Service) -> Access:
    return Access(mqtt, pg)


def worker_acl(site: str, client_id: str) -> str:
    """The worker's ACL of docs/security.md for the VEN adapter alone: its sources and the
    canonical bus to read; its own site's canonical streams (and sets, to delete a
    retained one), the VEN commands, its status and its dead letters to write."""
    return (
        "topic read volttron/metering\ntopic read ven/telemetry/+\n"
        "topic read ven/loads/+\ntopic read ven/ack/+\n"
        "topic read +/energy/#\ntopic write ven/cmd/+\n"
        + "".join(f"topic write {site}/energy/+/+/+/{stream}\n"
                  for stream in ("value", "last", "meta", "availability", "set"))
        + f"topic readwrite energybus/worker/{client_id}/#\n"
        "topic write energybus/dead_letter/#\n"
    )  # fmt: skip


def secure(mqtt: services.Service, pg: services.Service, *, site: str, client_id: str) -> Access:
    """Locked-down services made ready for one run on ``site``: a user and a random
    password for each client (``bench-worker``, ``bench-load``, ``bench-meter``), each
    allowed only its own topics, installed in the broker, which reloads them."""
    if not (mqtt.secure and pg.secure):
        raise services.ServiceError("a TLS run needs the services in their secure mode")
    pki = services.pki_of(mqtt)
    passwords = {client: secrets.token_urlsafe(24) for client in CLIENTS}
    acl = {
        "worker": worker_acl(site, client_id),
        "load": "topic write volttron/metering\n",
        "meter": f"topic read {site}/energy/storage/+/soc/last\n",
    }
    services.mosquitto_users(
        mqtt,
        {f"bench-{client}": password for client, password in passwords.items()},
        "".join(f"user bench-{client}\n{acl[client]}" for client in CLIENTS),
    )
    logins = {
        client: MqttLogin(pki.ca, pki.client_cert, pki.client_key, f"bench-{client}", password)
        for client, password in passwords.items()
    }
    return Access(mqtt, pg, logins, services.credentials(pg)["energybus"])
