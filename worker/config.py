"""The worker's configuration: one TOML file, validated once at start-up.

``[worker]``, ``[mqtt]`` and ``[historian]`` are checked here (pydantic, unknown keys are
errors); each ``[adapters.<name>]`` table enables that adapter and is checked by the
adapter's own options schema. The file is read and ``${VAR}`` expanded once, here; the
adapters get their tables from that one reading. ``${VAR}`` is how secrets get in;
they are held as ``SecretStr`` and never printed. Every error names the file, the line
and the key.

Relative paths (``data_dir``, TLS files) are taken from the current directory.
"""

from __future__ import annotations

import re
import ssl
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from energybus.adapters import Adapter, adapter_class, adapter_names
from energybus.documents import Located, env_values_hidden, expand_env, read_toml
from energybus.errors import MappingError
from energybus.filters import validate_filter
from energybus.historian import dsn_problem

__all__ = [
    "Config",
    "CounterDeclaration",
    "HistorianConfig",
    "MqttConfig",
    "TlsConfig",
    "WorkerConfig",
    "load_config",
    "site_member",
]


_NEVER = 0xFFFFFFFF
"""The largest MQTT 5 Session Expiry Interval (four bytes); it means "never"."""

FilePath = Annotated[Path, Strict(False)]
"""A path from a TOML string (strict mode would refuse the conversion)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TlsConfig(_Section):
    """TLS to the broker, for both connections of the worker."""

    ca_file: FilePath | None = None
    """CA bundle to verify the broker; default: the system's trust store."""
    cert_file: FilePath | None = None
    """Client certificate, for brokers that authenticate clients by certificate."""
    key_file: FilePath | None = None
    """The private key of ``cert_file``."""

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        # Read once at load, so that a missing or wrong file is a located error at
        # start (and in `check`), not a reconnect loop that never names the file.
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"ca_file {self.ca_file}: {_why(error)}") from None
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as error:
                raise ValueError(
                    f"cert_file {self.cert_file} with key_file {self.key_file}: {_why(error)}"
                ) from None
        return self

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        if self.cert_file is not None and self.key_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _why(error: OSError) -> str:
    """An unusable file's reason in words: the OS's, or OpenSSL's without its source
    location (``no certificate or crl found``, ``PEM lib``)."""
    if isinstance(error, ssl.SSLError) and error.reason:
        return f"not usable ({str(error.reason).lower().replace('_', ' ')})"
    text = re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", error.strerror or str(error))
    return text if not isinstance(error, ssl.SSLError) else f"not usable ({text})"


class MqttConfig(_Section):
    """The broker of the energy bus; the worker's two MQTT 5 connections both go there."""

    host: str = "127.0.0.1"
    """The broker's host name or address."""
    port: int = Field(default=1883, ge=1, le=65535)
    """The broker's port (8883 is the usual one with TLS)."""
    client_id: str = Field(
        default="energybus", min_length=1, max_length=60, pattern=r"^[A-Za-z0-9_.-]+$"
    )
    """Stable across restarts: the broker keeps the session (and queued messages) under it.
    The worker uses ``<client_id>-src`` and ``<client_id>-bus`` for its two connections."""
    username: str | None = None
    """The user both connections log in as; none connects anonymously."""
    password: SecretStr | None = None
    """The password of ``username``: use ``${VAR}``; never printed or logged."""
    tls: TlsConfig | None = None
    """TLS to the broker; absent, the connections are plain TCP."""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    """MQTT keep-alive: how soon a silent connection is found dead, by either side."""
    session_expiry_s: int = Field(default=7 * 86400, ge=0, le=_NEVER)
    """How long the broker keeps the source session (``<client_id>-src``: source topics
    and command filters) and queues source messages while the worker is away."""
    ingest_session_expiry_s: int = Field(default=3600, ge=0, le=_NEVER)
    """How long the broker keeps the bus session (``<client_id>-bus``) and queues other
    publishers' canonical values for the bus ingest while the worker is away. That is the
    whole bus, and a worker gone for good must not leave the broker hoarding it: an hour
    covers a restart or an upgrade. Not used when ``worker.bus_ingest`` is empty (the bus
    connection then keeps no session)."""

    def broker(self) -> dict[str, Any]:
        """Where and as whom every connection of the worker (and ``retire``) connects:
        the keyword arguments of :meth:`BusClient.connect` that do not depend on which
        connection it is."""
        return {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password.get_secret_value() if self.password else None,
            "tls": self.tls.context() if self.tls else None,
            "keepalive": self.keepalive_s,
        }

    receive_maximum: int = Field(default=2000, ge=1, le=65535)
    """Unacknowledged source messages the broker may send at once (MQTT 5 Receive Maximum)."""
    max_inflight: int = Field(default=20000, ge=1, le=60000)
    """QoS 1 publishes waiting for their PUBACK; packet ids are 16 bits, so it stays
    well below 65535."""
    reconnect_min_s: float = Field(default=0.5, gt=0)
    """The first wait before reconnecting (to the broker, or an AMQP source); each
    failure doubles it, with jitter."""
    reconnect_max_s: float = Field(default=30.0, gt=0)
    """The longest wait between reconnection attempts (at least ``reconnect_min_s``)."""


class CounterDeclaration(_Section):
    """A counter series the counter historian computes energy from, and its rollover
    (docs/historian.md)."""

    metric: str = Field(pattern=r"^[a-z][a-z0-9_]*_total$")
    """The counter's metric (a ``_total`` metric)."""
    site: str = "*"
    """The site it applies to; ``*``: every site."""
    device: str = "*"
    """The device it applies to (``<entity_type>.<entity_id>``); ``*``: every device."""
    wrap_at: float | None = Field(default=None, gt=0)
    """The value at which the register wraps to 0, in the metric's canonical unit."""
    max_rate: float | None = Field(default=None, gt=0)
    """The largest plausible increase per second, in the metric's canonical unit."""


class HistorianConfig(_Section):
    """The PostgreSQL historians the worker writes its rows to (docs/historian.md)."""

    dsn: SecretStr | None = None
    """PostgreSQL connection string; without one the worker only publishes on the bus.
    Use ``${VAR}`` for a password: plans and logs show the DSN without it."""
    batch_rows: int = Field(default=5000, ge=1)
    """Rows that make a batch written at once."""
    batch_interval_s: float = Field(default=0.1, gt=0)
    """The longest a row waits for its batch to fill before it is written."""
    retry_s: float = Field(default=2.0, gt=0)
    """How often an unreachable database is tried again (meanwhile batches go to the
    outbox)."""
    outbox_max_mb: float = Field(default=1024.0, gt=0)
    """Bound of the outbox (``<data_dir>/outbox.sqlite3``), where batches wait while the
    database is unreachable; when full the worker stops acknowledging source messages."""
    counters: list[CounterDeclaration] = []
    """Counter declarations, each a ``[[historian.counters]]`` table."""

    @field_validator("dsn")
    @classmethod
    def _usable_dsn(cls, dsn: SecretStr | None) -> SecretStr | None:
        problem = dsn_problem(dsn.get_secret_value()) if dsn is not None else None
        if problem is not None:
            raise ValueError(problem)
        return dsn


class WorkerConfig(_Section):
    """The worker itself: where it keeps state, its own topics, logs and metrics."""

    data_dir: FilePath = Path("energybus-data")
    """Holds ``outbox.sqlite3``, and ``poll-outbox-<adapter>.sqlite3`` for Modbus polls."""
    topic_prefix: str = Field(default="energybus", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    """Root of the worker's own topics: status and dead letters (see docs/worker.md)."""
    availability_timeout_s: float = Field(default=300.0, gt=0)
    """Silence after which an entity's series go ``offline`` on its ``availability``
    stream."""
    bus_ingest: list[str] = ["+/energy/+/+/+/value"]
    """Canonical filters whose traffic from other publishers goes to the historians;
    ``[]`` turns the bus ingest off."""
    shared_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Subscribe through ``$share/<group>/...``, so that the workers of a group share the
    traffic (as ``--shared-group``; docs/worker.md, "Several workers")."""
    member: str | None = Field(default=None, pattern=r"^[0-9]{1,4}/[0-9]{1,4}$")
    """``INDEX/COUNT``: this worker handles the sites that hash to INDEX among COUNT
    members of its shared group (docs/scaling.md)."""
    metrics_host: str = "127.0.0.1"
    """The address the Prometheus endpoint listens on."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """The port of the Prometheus endpoint (``/metrics``); none: no endpoint."""
    log_format: Literal["human", "json"] = "human"
    """Log lines for people, or one JSON object per line (as ``--log-format``)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """The least severe log lines written."""
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    """How long SIGTERM or SIGINT waits for the last batch and the outstanding
    acknowledgements; what misses it is redelivered to the next run."""
    poll_outbox_max_mb: float = Field(default=1024.0, gt=0)
    """Bound of each Modbus poll outbox (``<data_dir>/poll-outbox-<adapter>.sqlite3``): polls wait
    there while the bus is away (docs/modbus.md gives its size for 24 h)."""
    max_payload_bytes: int = Field(default=16_384, ge=1)
    """The largest canonical message the bus ingest takes, in bytes; a larger one is
    refused as ``too_large`` and dead-lettered with its size, without its body. (Each
    adapter has its own limit for its source messages.)"""
    max_series_per_site: int = Field(default=10_000, ge=1)
    """Distinct series (device and metric) the worker keeps per site; a sample of a
    new series past it is refused as ``too_many_series`` (docs/worker.md, "Input
    limits")."""
    max_series: int = Field(default=100_000, ge=1)
    """Distinct series the worker keeps in all, whatever their sites (any publisher on
    the bus ingest can invent sites); past it a new series is ``too_many_series`` too.
    This is what bounds the worker's memory for series (docs/worker.md, "Input
    limits", gives what each costs)."""


class _Root(_Section):
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    historian: HistorianConfig = Field(default_factory=HistorianConfig)
    adapters: dict[str, dict[str, Any]] = {}


class Config:
    """A validated configuration: each enabled adapter's options, and the adapter built
    from them (its mapping compiled, its devices checked), ready for one worker."""

    def __init__(
        self,
        root: _Root,
        adapters: dict[str, Any],
        file: str,
        built: dict[str, Adapter[Any, Any]] | None = None,
    ) -> None:
        self.worker = root.worker
        self.mqtt = root.mqtt
        self.historian = root.historian
        self.adapters = adapters
        self.built = built or {}
        self.file = file

    @property
    def member(self) -> tuple[int, int] | None:
        """``(index, count)`` of a partitioned group's member, else ``None``."""
        if self.worker.member is None:
            return None
        index, count = self.worker.member.split("/")
        return int(index), int(count)

    def with_overrides(
        self,
        *,
        shared_group: str | None = None,
        member: str | None = None,
        log_format: str | None = None,
    ) -> Config:
        """Options given on the command line, checked as the file's are."""
        changes: dict[str, Any] = {}
        if shared_group is not None:
            changes["shared_group"] = shared_group
        if member is not None:
            changes["member"] = member
        if log_format is not None:
            changes["log_format"] = log_format
        where = Located(self.file, "")
        if changes:
            try:
                self.worker = WorkerConfig.model_validate(
                    {**self.worker.model_dump(exclude_unset=True), **changes}
                )
            except ValidationError as exc:
                raise _first_error(exc, where, "$.worker") from None
        _check_member(self.worker, self.built, where)
        return self

    @property
    def bus_session_expiry_s(self) -> int:
        """The session expiry of ``<client_id>-bus``: ``mqtt.ingest_session_expiry_s``, or
        0 when there is no bus ingest (a connection that only publishes has nothing the
        broker must keep for it)."""
        return self.mqtt.ingest_session_expiry_s if self.worker.bus_ingest else 0

    def redacted_dsn(self) -> str | None:
        """The DSN without its password, for logs and plans; its other parameters
        (``sslmode`` above all) stay, since they say how the connection is made."""
        if self.historian.dsn is None:
            return None
        parts = urlsplit(self.historian.dsn.get_secret_value())
        host = parts.hostname or ""
        user = f"{parts.username}@" if parts.username else ""
        port = f":{parts.port}" if parts.port else ""
        shown = [(k, v) for k, v in parse_qsl(parts.query) if k not in _SECRET_PARAMETERS]
        query = f"?{urlencode(shown, safe='/')}" if shown else ""
        return f"{parts.scheme}://{user}{host}{port}{parts.path}{query}"


_SECRET_PARAMETERS: Final = frozenset({"password", "sslpassword"})
"""libpq parameters of a DSN that are secrets (a password may also be given so)."""


def load_config(source: str | Path, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a site configuration; raises :class:`MappingError`.

    A value that came from ``${VAR}`` is a secret as far as errors go: a message that
    would repeat it (a validator quoting a wrong value, ``Invalid enum value '...'``)
    shows ``${VAR}`` in its place."""
    data, where = read_toml(source)
    with env_values_hidden(data, environ):
        return _load(data, where, source, environ)


def _load(
    data: Any, where: Located, source: str | Path, environ: Mapping[str, str] | None
) -> Config:
    data = expand_env(data, where, "$", environ)
    try:
        root = _Root.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, where) from None
    if root.mqtt.reconnect_max_s < root.mqtt.reconnect_min_s:
        raise where.error("out_of_range", "must be >= reconnect_min_s", "$.mqtt.reconnect_max_s")
    for index, pattern in enumerate(root.worker.bus_ingest):
        problem = validate_filter(pattern)
        if problem is not None:
            raise where.error(problem.code, problem.message, f"$.worker.bus_ingest[{index}]")
    if not root.adapters:
        raise where.error(
            "no_adapters",
            f"enable at least one adapter with an [adapters.<name>] table; known: "
            f"{', '.join(adapter_names())}",
            "$.adapters",
        )
    adapters: dict[str, Any] = {}
    built: dict[str, Adapter[Any, Any]] = {}
    for name in root.adapters:
        try:
            cls = adapter_class(name)
        except MappingError as exc:
            raise where.error(exc.code, exc.message, f"$.adapters.{name}") from None
        options = adapters[name] = cls.options_from(root.adapters[name], where, expanded=True)
        try:
            built[name] = cls(options=options)
        except MappingError as exc:
            if exc.file is not None:  # a fault of the mapping file, located there
                raise
            path = f"$.adapters.{name}{exc.path[1:]}"
            raise where.error(exc.code, exc.message, path) from None
    _check_member(root.worker, built, where)
    return Config(root, adapters, str(source), built)


def site_member(site: str, count: int) -> int:
    """The member of a partitioned group of ``count`` that handles ``site``: CRC-32 of the
    site modulo the group's size, the same in every process and on every machine."""
    return zlib.crc32(site.encode()) % count


def _check_member(
    worker: WorkerConfig, built: Mapping[str, Adapter[Any, Any]], where: Located
) -> None:
    """A member's INDEX/COUNT, its group, and that each device reached through a
    connection of the member's own is about one of the member's sites: the other members
    never see that device's messages, and a ``set`` for it goes by its site like any
    other, so on any other member it would be refused as an unknown target."""
    if worker.member is None:
        return
    index, count = (int(n) for n in worker.member.split("/"))
    if not 0 <= index < count:
        raise where.error("out_of_range", "INDEX/COUNT needs 0 <= INDEX < COUNT", "$.worker.member")
    if worker.shared_group is None:
        raise where.error(
            "missing_field",
            "a member needs its shared_group (the members share the bus ingest through it)",
            "$.worker.member",
        )
    for name, adapter in built.items():
        for device, path, site in adapter.connected_sites():
            owner = site_member(site, count)
            if owner != index:
                raise where.error(
                    "wrong_member",
                    f"{name} {device} is about site {site!r}, which hashes to member"
                    f" {owner}/{count}, not {index}/{count}: configure it on member {owner}",
                    f"$.adapters.{name}{path[1:]}",
                )


def _first_error(exc: ValidationError, where: Located, at: str = "$") -> MappingError:
    error = exc.errors()[0]
    path = at + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    kind = error["type"]
    code = {
        "extra_forbidden": "unknown_field",
        "missing": "missing_field",
    }.get(kind, "invalid_value" if "type" not in kind else "wrong_type")
    message = "unknown key" if kind == "extra_forbidden" else error["msg"]
    return where.error(code, message, path)
