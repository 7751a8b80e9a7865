"""The error tree: one base class, one subclass per thing that can be wrong.

Every error carries its facts as attributes (a stable ``code`` first of all) so that
the worker can count rejections by reason and the CLI can print them as JSON, without
parsing messages. The codes are listed in ``docs/errors.md``; a code never changes
meaning once released.
"""

from __future__ import annotations

__all__ = [
    "CommandError",
    "EnergyBusError",
    "FilterError",
    "IdentifierError",
    "LimitError",
    "MappingError",
    "PayloadError",
    "PolicyError",
    "SourceError",
    "TopicError",
    "UnitError",
]


class EnergyBusError(ValueError):
    """Base of every error energybus raises on bad input.

    It derives from ``ValueError`` because every one of them is a bad value handed in
    by a caller; code that does not know energybus can still catch it.
    """

    code: str

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message}


class TopicError(EnergyBusError):
    """A topic name breaks MQTT's rules or the energy bus grammar.

    ``segment`` names the level at fault (``site``, ``domain``, ``entity_type``,
    ``entity_id``, ``metric``, ``stream``) or is ``None`` when the whole topic is at
    fault; ``span`` is the ``(start, end)`` character range of that level, so a
    caller can point at it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        topic: str,
        segment: str | None = None,
        span: tuple[int, int] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.topic = topic
        self.segment = segment
        self.span = span

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "segment": self.segment, "message": self.message}


class FilterError(EnergyBusError):
    """A subscription filter breaks MQTT's rules (or, when asked, the bus grammar)."""

    def __init__(self, code: str, message: str, *, filter: str) -> None:
        super().__init__(code, message)
        self.filter = filter


class PayloadError(EnergyBusError):
    """A payload does not fit its stream.

    ``path`` locates the fault inside the JSON document in msgspec's notation
    (``$``, ``$.quality``, ``$.historian.mode``).
    """

    def __init__(self, code: str, message: str, *, path: str = "$") -> None:
        super().__init__(code, message)
        self.path = path

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "path": self.path, "message": self.message}


class PolicyError(EnergyBusError):
    """A message would break the delivery policy, such as a retained ``set``."""

    def __init__(self, code: str, message: str, *, topic: str) -> None:
        super().__init__(code, message)
        self.topic = topic


class UnitError(EnergyBusError):
    """A unit is unknown, or cannot be converted to the one asked for."""

    def __init__(self, code: str, message: str, *, unit: str) -> None:
        super().__init__(code, message)
        self.unit = unit


class IdentifierError(EnergyBusError):
    """A source identifier cannot be turned into a bus identifier."""

    def __init__(self, code: str, message: str, *, source: str) -> None:
        super().__init__(code, message)
        self.source = source


class MappingError(EnergyBusError):
    """A mapping file or adapter configuration is wrong; found when it loads, never later.

    ``file`` and ``line`` locate the fault for an editor (``line`` is ``None`` when the
    fault has no single line, such as a missing key); ``path`` names it inside the
    document in msgspec's notation (``$.entity[2].fields.usedPowerKw.unit``).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        path: str = "$",
    ) -> None:
        super().__init__(code, message)
        self.file = file
        self.line = line
        self.path = path

    def __str__(self) -> str:
        where = self.file or "<mapping>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        return f"{where}: {self.message} (at {self.path}) [{self.code}]"

    def to_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "file": self.file,
            "line": self.line,
            "path": self.path,
            "message": self.message,
        }


class SourceError(EnergyBusError):
    """A source platform's message cannot be translated (bad JSON, unknown device, bad
    signature, replay).

    The message never quotes the payload's values or a secret: rejections are logged
    and dead-lettered, and a value may be confidential where a field name is not.
    ``path`` locates the fault in the source document when there is one.
    """

    def __init__(self, code: str, message: str, *, path: str = "$") -> None:
        super().__init__(code, message)
        self.path = path

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "path": self.path, "message": self.message}


class LimitError(EnergyBusError):
    """An input past a limit the configuration sets: a message too large or nested too
    deeply to decode, a series or site more than the worker keeps track of.

    ``setting`` names the configuration key of the limit (``max_payload_bytes``), so
    the operator knows what to raise if the input was legitimate; the message gives
    the size or count against the limit, never the input's content.
    """

    def __init__(self, code: str, message: str, *, setting: str, path: str = "$") -> None:
        super().__init__(code, message)
        self.setting = setting
        self.path = path

    def to_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "setting": self.setting,
            "message": self.message,
            "path": self.path,
        }


class CommandError(EnergyBusError):
    """A canonical ``set`` that cannot become a source command (no such target or action,
    a value the action cannot take)."""

    def __init__(self, code: str, message: str, *, topic: str) -> None:
        super().__init__(code, message)
        self.topic = topic
