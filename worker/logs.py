"""Logging: human lines by default, one JSON object per line with ``--log-format json``.

Connection and sink states are logged through :class:`StateLog`, once per change, so a
broker that is down for an hour gives two lines, not thousands.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec

__all__ = ["QUIET", "StateLog", "setup_logging"]

QUIET = ("aiormq", "aio_pika", "pymodbus")
"""Libraries whose own logging the worker's log leaves out (their connections' and
devices' states are logged by the worker's sources)."""

_encode = msgspec.json.Encoder().encode


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


def setup_logging(fmt: Literal["human", "json"] = "human", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The AMQP client logs every failed attempt at ERROR, with a traceback when a
    # connection drops, and pymodbus every unanswered read with a hex dump of the
    # request; the sources say each change of state once, in one line.
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)


class StateLog:
    """Logs a message when the state changes, and only then."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.state: str | None = None

    def change(self, state: str, level: int, message: str, *args: object) -> bool:
        if state == self.state:
            return False
        self.state = state
        self.logger.log(level, message, *args)
        return True
