"""What every adapter is: pure translation between one source platform and the bus.

An adapter does no I/O. :meth:`Adapter.normalize` turns one source message into
readings (per entity, each value with the spec its mapping row compiled to) or
rejections with a reason; :meth:`Adapter.format` turns one canonical ``set`` into the
source platform's command message(s) and a command record. The worker, the CLI and
library users drive both through :class:`energybus.adapters.Pipeline`, which adds
rendering. Where messages come from is the adapter's :attr:`Adapter.sources`, by
transport; connecting to them is the worker's job.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar
from uuid import uuid4

import msgspec

from energybus.admission import Admitted, CommandPolicy, Gate
from energybus.commands import CommandBook, CommandRecord
from energybus.documents import Located, env_values_hidden, expand_env, load_document, read_toml
from energybus.errors import EnergyBusError, FilterError, MappingError, SourceError
from energybus.messages import Message
from energybus.payloads import Scalar
from energybus.samples import Reading
from energybus.topics import Topic

from .mapping import CommandOptions, Compiler, Document, MappingDocument

__all__ = [
    "Adapter",
    "AmqpEndpoint",
    "Formatted",
    "ModbusEndpoint",
    "ModbusRead",
    "Normalized",
    "Plan",
    "Rejection",
    "SourceDeclaration",
    "Transport",
]

OptionsT = TypeVar("OptionsT", bound=Document)
MappingT = TypeVar("MappingT", bound=MappingDocument)

Transport = Literal["mqtt", "amqp", "modbus"]


class AmqpEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """An AMQP broker and account an adapter's queues are on: the adapter says where and
    as whom, the worker connects. ``name`` names it in logs and errors (``voke org
    acme``); ``password`` is a secret and never shown (not even by ``repr``)."""

    name: str
    uri: str
    """``amqp://host:port`` or ``amqps://host:port``: no credentials, no vhost."""
    vhost: str = "/"
    username: str
    password: str
    prefetch: int = 500
    ca_file: str | None = None
    """CA bundle for ``amqps``; default: the system's trust store."""
    exchange: str = ""
    """The exchange :attr:`SourceDeclaration.publishes` routing keys are published to."""
    missing_queue: str = "the queue does not exist"
    """What to tell an operator when a queue is missing: what to enable, and where."""

    def __repr__(self) -> str:
        return f"AmqpEndpoint(name={self.name!r}, uri={self.uri!r}, vhost={self.vhost!r})"


class ModbusRead(msgspec.Struct, frozen=True, array_like=True):
    """One read request of a poll: function 3 (holding) or 4 (input) registers."""

    table: Literal["holding", "input"]
    address: int
    count: int


class ModbusEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """A Modbus device and how to poll it: the adapter says where and what to read, the
    worker's poller does the I/O. Devices with the same ``connection`` (one TCP gateway,
    one serial line) share one client and are polled one after another; every other
    device is polled on its own, so a dead one delays only its own line."""

    name: str
    """The device's name in the configuration; also the topic of its deliveries."""
    transport: Literal["tcp", "rtu-over-tcp", "rtu"]
    host: str = "127.0.0.1"
    port: int = 502
    serial_port: str | None = None
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    bytesize: int = 8
    unit_id: int = 1
    interval_s: float = 1.0
    timeout_s: float = 1.0
    retries: int = 1
    retry_backoff_s: float = 0.05
    offline_after: int = 3
    """Consecutive failed polls before the device's series go ``offline``."""
    reads: tuple[ModbusRead, ...] = ()
    fingerprint: int = 0
    """Names the read plan in each poll, so a poll is decoded only with its own plan."""
    identity: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """Holding registers and the words they must hold on every new connection before
    the device is polled or written (a SunSpec map's model chain): a device that is not
    the one the map's addresses describe is neither read nor written."""

    @property
    def connection(self) -> str:
        if self.transport == "rtu":
            return f"serial:{self.serial_port}"
        return f"{self.transport}:{self.host}:{self.port}"


class SourceDeclaration(msgspec.Struct, frozen=True, kw_only=True):
    """Where an adapter's source messages come from: a transport and what to take on it.

    For ``mqtt``, ``patterns`` are topic filters; for ``amqp``, queue names on
    ``endpoint``; for ``modbus``, device names. ``publishes`` are the destinations on
    this source's connection that the adapter's commands go to (an AMQP routing key:
    a :class:`~energybus.messages.Message` whose topic is one of them is published
    there, not on the bus).
    """

    transport: Transport
    patterns: tuple[str, ...]
    endpoint: AmqpEndpoint | ModbusEndpoint | None = None
    publishes: tuple[str, ...] = ()


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """Why a message was refused: a stable ``code`` to count by, a message for people.

    It never carries the payload's values or a secret; the dead-letter stream keeps the
    original message for whoever may read it.
    """

    code: str
    message: str
    topic: str
    path: str | None = None

    @classmethod
    def of(cls, error: EnergyBusError, topic: str) -> Rejection:
        path = getattr(error, "path", None)
        return cls(code=error.code, message=error.message, topic=topic, path=path)


class Normalized(msgspec.Struct, kw_only=True):
    """What one source message became.

    ``readings`` hold the values per entity (each value with its series' spec).
    ``rejections`` refuse the message, or single values of it (with their path) while
    the rest is published. ``commands`` holds command records the message moved (an
    ACK confirms one). ``duplicate`` marks a message already translated from another
    topic; it is not an error and produces nothing.
    """

    readings: list[Reading] = msgspec.field(default_factory=list)
    rejections: list[Rejection] = msgspec.field(default_factory=list)
    commands: list[CommandRecord] = msgspec.field(default_factory=list)
    duplicate: bool = False
    unavailable: list[tuple[str, str, str]] = msgspec.field(default_factory=list)
    """Entities (site, type, id) the source reports unreachable: their series go
    ``offline`` now rather than after the availability timeout."""

    @classmethod
    def of(cls, readings: list[Reading], errors: list[SourceError], topic: str) -> Normalized:
        """Readings, with the values refused on the way (``errors``) as rejections."""
        return cls(readings=readings, rejections=[Rejection.of(e, topic) for e in errors])


class Formatted(msgspec.Struct, frozen=True, kw_only=True):
    """A canonical ``set`` turned into the source platform's command."""

    record: CommandRecord
    messages: list[Message]


class Plan:
    """A compiled mapping; adapters subclass it with their lookups."""

    rows: int = 0
    """How many source values the mapping translates (``mappings check`` reports it)."""


class Adapter(ABC, Generic[OptionsT, MappingT]):
    """Base of every adapter. Subclasses set the class attributes and the two methods.

    ``name`` is the adapter's one name everywhere: module, mapping file
    (``mappings/<name>.toml``), configuration key (``[adapters.<name>]``) and golden-test
    folder (``tests/golden/<name>/``).
    """

    name: ClassVar[str]
    options_type: ClassVar[type[Document]]
    mapping_type: ClassVar[type[MappingDocument]]
    json_sources: ClassVar[bool] = True
    """Whether source messages are JSON documents, whose nesting the pipeline holds to
    ``max_depth`` before :meth:`normalize` decodes them; an adapter whose messages are
    binary (Modbus polls) says ``False``, or the bytes of its words would be counted
    as brackets."""

    sources: tuple[SourceDeclaration, ...]
    """Where this adapter's source messages come from, per transport."""
    command_filters: tuple[str, ...]
    """Canonical filters of the ``set`` topics this adapter turns into commands."""

    def __init__(
        self,
        *,
        options: OptionsT | None = None,
        mapping: str | Path | None = None,
        new_id: Callable[[], str] | None = None,
    ) -> None:
        self.options: OptionsT = (
            options if options is not None else self.options_type()  # type: ignore[assignment]
        )
        source = mapping if mapping is not None else getattr(self.options, "mapping", None)
        document, plan = self.load_plan(source)
        self.mapping: MappingT = document
        self.plan: Plan = plan
        self.new_id = new_id or (lambda: str(uuid4()))
        self.commands = CommandBook(timeout_s=getattr(self.options, "command_timeout_s", 60.0))
        self.gate = _gate(self.options)
        """Every ``set`` passes it before :meth:`format` (``Pipeline`` runs it)."""
        self.start()

    def start(self) -> None:
        """Build what the options imply (filters, known devices); runs once, last in
        ``__init__``, so subclasses need not repeat its signature."""

    @classmethod
    def default_mapping(cls) -> Path:
        """The mapping file used when the options name none: the packaged
        ``mappings/<name>.toml``. An adapter of another package ships its own and returns
        its path (docs/new-source.md)."""
        from energybus.mappings import mapping_path

        return mapping_path(cls.name)

    @classmethod
    def read_mapping(cls, source: str | Path | None = None) -> tuple[Any, Compiler]:
        """Load and validate a mapping file (:meth:`default_mapping` by default)."""
        data, where = read_toml(source if source is not None else cls.default_mapping())
        # The adapter is checked first: another adapter's mapping fails every schema
        # rule, and the one fault worth reporting is that it is the wrong file.
        named = data.get("adapter")
        if isinstance(named, str) and named != cls.name:
            raise where.error(
                "wrong_adapter",
                f"this mapping is for adapter {named!r}, not {cls.name!r}",
                "$.adapter",
            )
        document = load_document(cls.mapping_type, data, where)
        return document, Compiler(where, document.defaults)

    @classmethod
    def options_from(
        cls,
        section: Mapping[str, Any],
        where: Located,
        path: str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        expanded: bool = False,
    ) -> Any:
        """This adapter's options from its ``[adapters.<name>]`` table of a site file
        already read (``${VAR}`` expanded unless ``expanded``)."""
        at = path or f"$.adapters.{cls.name}"
        if expanded:  # by a caller that hides the variables' values in its errors
            return load_document(cls.options_type, dict(section), where, at)
        with env_values_hidden(section, environ):
            data = expand_env(dict(section), where, at, environ)
            return load_document(cls.options_type, data, where, at)

    @classmethod
    def options_from_file(
        cls, source: str | Path, *, environ: Mapping[str, str] | None = None
    ) -> Any:
        """This adapter's options from a site configuration file; a missing table means
        the defaults. Other tables belong to the worker, which checks them."""
        data, where = read_toml(source)
        adapters = data.get("adapters", {})
        section = adapters.get(cls.name, {}) if isinstance(adapters, dict) else {}
        if not isinstance(section, dict):
            raise where.error("wrong_type", "must be a table", f"$.adapters.{cls.name}")
        return cls.options_from(section, where, environ=environ)

    @classmethod
    def load_plan(cls, source: str | Path | None = None) -> tuple[Any, Plan]:
        """The mapping (:meth:`default_mapping` by default) and its compiled plan. An adapter
        whose mapping is several files (one per device family) overrides this, and
        compiles each file with :meth:`read_mapping` and :meth:`compile`."""
        document, compiler = cls.read_mapping(source)
        return document, cls.compile(document, compiler)

    @classmethod
    def check_mapping(cls, source: str | Path | None = None) -> Plan:
        """Load and compile a mapping without building an adapter."""
        return cls.load_plan(source)[1]

    @classmethod
    @abstractmethod
    def compile(cls, document: Any, compiler: Compiler) -> Plan:
        """Check what the schema cannot (units, metrics, templates) and build lookups."""

    @abstractmethod
    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        """Translate one source message. Never raises on bad input: it rejects."""

    @abstractmethod
    def format(self, command: Admitted, *, received_at: datetime) -> Formatted:
        """Turn one canonical ``set``, already through the admission gate (its topic
        parsed, its payload decoded and checked), into source command(s); raises on
        refusal.

        The record is registered in :attr:`commands` as ``accepted``; the caller marks
        it ``sent`` once the broker has the command.
        """

    def knows_target(self, parsed: Topic) -> bool:
        """Whether the ``set`` on ``parsed`` names a device this adapter commands. Asked
        when several adapters take sets of the same metric (CPI and Voke plants both take
        ``power_setpoint``), so that a command goes to the adapter of its device; a set
        that no adapter claims goes to the first adapter routed, which refuses it. The
        default claims nothing, so that an adapter which does not say which devices are
        its own never takes another's commands: one that takes sets of a metric other
        adapters also take overrides this (docs/new-source.md)."""
        return False

    def connected_sites(self) -> list[tuple[str, str, str]]:
        """``(device, options path, site)`` of every device this adapter reaches through a
        connection of its own (an AMQP account, a polled Modbus device). Only the worker
        that configures such a device receives its messages, so in a partitioned group
        (docs/scaling.md) its site must be one of that member's, and the worker refuses a
        configuration where it is not."""
        return []

    def site_of(self, topic: str, payload: bytes) -> str | None:
        """The site a source message is about, when it can be told cheaply (from the
        topic, or one field of the payload), else ``None``. The members of a partitioned
        group (docs/scaling.md) each handle the sites that hash to them, so every message
        about a site, its commands and their answers included, meets one member."""
        return None

    def expire(self, now: datetime) -> list[CommandRecord]:
        """Commands whose answer is overdue, now ``expired``."""
        return self.commands.expire(now)

    def counters(self) -> list[tuple[str, str, str, float | None, float | None]]:
        """``(site, device, metric, wrap_at, max_rate)`` of the counters whose rollover
        the adapter knows (a register's width); the worker declares them to the counter
        historian at start-up."""
        return []

    def failed(self, command_id: str, reason: str) -> CommandRecord | None:
        """Command ``command_id`` could not be sent: now ``rejected`` with ``reason``
        (``None`` when it already has an outcome)."""
        return self.commands.fail(command_id, reason)

    # What every ``format`` shares ---------------------------------------------------------

    def command(
        self,
        parsed: Topic,
        value: Scalar,
        *,
        command_id: str,
        target: str,
        action: str,
        payload: dict[str, Any] | None,
        received_at: datetime,
        messages: list[Message],
    ) -> Formatted:
        """Register a new command record as ``accepted`` and pair it with its messages."""
        record = CommandRecord(
            id=command_id,
            adapter=self.name,
            site=parsed.site,
            entity_type=parsed.entity_type,
            entity_id=parsed.entity_id,
            metric=parsed.metric,
            value=value,
            target=target,
            action=action,
            payload=payload,
            state="accepted",
            accepted_at=received_at,
            expires_at=self.commands.deadline(received_at),
        )
        self.commands.accept(record)
        return Formatted(record=record, messages=messages)


def _gate(options: Document) -> Gate:
    """The admission gate an adapter's options describe (the defaults without any)."""
    if not isinstance(options, CommandOptions):
        return Gate()
    try:
        return Gate(
            policy=CommandPolicy(
                max_age_s=options.command_max_age_s, max_future_s=options.command_max_future_s
            ),
            series=options.command_series,
            interlocks=options.interlocks,
        )
    except FilterError as error:
        rules = [("command_series", r.filter) for r in options.command_series]
        rules += [("interlocks", r.filter) for r in options.interlocks]
        where = next(
            (f"$.{key}[{i}].filter" for i, (key, f) in enumerate(rules) if f == error.filter), "$"
        )
        raise MappingError(error.code, error.message, path=where) from None
