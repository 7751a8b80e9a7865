"""What every adapter is: pure translation between one source platform and the bus.

An adapter does no I/O. :meth:`Adapter.normalize` turns one source message into samples
(each with the :class:`SeriesSpec` its mapping row compiled to) or a rejection with a
reason; :meth:`Adapter.format` turns one canonical ``set`` into the source platform's
command message(s) and a command record. The worker, the CLI and library users drive
both through :class:`energybus.adapters.Pipeline`, which adds rendering.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar
from uuid import uuid4

import msgspec

from energybus.errors import EnergyBusError
from energybus.messages import Message
from energybus.render import SeriesSpec
from energybus.samples import Sample

from .commands import CommandBook, CommandRecord
from .mapping import (
    Document,
    Located,
    MappingDocument,
    load_document,
    load_options,
    read_toml,
)

__all__ = ["Adapter", "Formatted", "Normalized", "Plan", "Rejection"]

OptionsT = TypeVar("OptionsT", bound=Document)
MappingT = TypeVar("MappingT", bound=MappingDocument)


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

    ``samples`` and ``specs`` run in parallel (the spec of each sample's series).
    ``commands`` holds command records the message moved (an ACK confirms one).
    ``duplicate`` marks a message already translated from another topic; it is not an
    error and produces nothing.
    """

    samples: list[Sample] = msgspec.field(default_factory=list)
    specs: list[SeriesSpec] = msgspec.field(default_factory=list)
    rejections: list[Rejection] = msgspec.field(default_factory=list)
    commands: list[CommandRecord] = msgspec.field(default_factory=list)
    duplicate: bool = False


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

    source_filters: tuple[str, ...]
    """MQTT filters of the source topics this adapter consumes."""
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
        document, where = self.read_mapping(source)
        self.mapping: MappingT = document
        self.plan: Plan = self.compile(document, where)
        self.new_id = new_id or (lambda: str(uuid4()))
        self.commands = CommandBook(timeout_s=getattr(self.options, "command_timeout_s", 60.0))
        self.start()

    def start(self) -> None:
        """Build what the options imply (filters, known devices); runs once, last in
        ``__init__``, so subclasses need not repeat its signature."""

    @classmethod
    def read_mapping(cls, source: str | Path | None = None) -> tuple[Any, Located]:
        """Load and validate a mapping file (the packaged one by default)."""
        from energybus.mappings import mapping_path

        data, where = read_toml(source if source is not None else mapping_path(cls.name))
        document = load_document(cls.mapping_type, data, where)
        if document.adapter != cls.name:
            raise where.error(
                "wrong_adapter",
                f"this mapping is for adapter {document.adapter!r}, not {cls.name!r}",
                "$.adapter",
            )
        return document, where

    @classmethod
    def options_from_file(
        cls, source: str | Path, *, environ: Mapping[str, str] | None = None
    ) -> Any:
        """This adapter's options from the ``[adapters.<name>]`` table of a site config.

        ``${VAR}`` in strings comes from the environment; a missing table means the
        defaults. Other tables belong to the worker, which checks them.
        """
        data, where = read_toml(source)
        adapters = data.get("adapters", {})
        section = adapters.get(cls.name, {}) if isinstance(adapters, dict) else {}
        if not isinstance(section, dict):
            raise where.error("wrong_type", "must be a table", f"$.adapters.{cls.name}")
        return load_options(
            cls.options_type, section, where, f"$.adapters.{cls.name}", environ=environ
        )

    @classmethod
    def check_mapping(cls, source: str | Path | None = None) -> Plan:
        """Load and compile a mapping file without building an adapter."""
        document, where = cls.read_mapping(source)
        return cls.compile(document, where)

    @classmethod
    @abstractmethod
    def compile(cls, document: Any, where: Located) -> Plan:
        """Check what the schema cannot (units, metrics, templates) and build lookups."""

    @abstractmethod
    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        """Translate one source message. Never raises on bad input: it rejects."""

    @abstractmethod
    def format(self, topic: str, payload: bytes, *, received_at: datetime) -> Formatted:
        """Turn one canonical ``set`` into source command(s); raises on refusal.

        The record is registered in :attr:`commands` as ``accepted``; the caller marks
        it ``sent`` once the broker has the command.
        """

    def expire(self, now: datetime) -> list[CommandRecord]:
        """Commands whose answer is overdue, now ``expired``."""
        return self.commands.expire(now)
