"""PostgreSQL sinks: the measurement and counter historians and command records.

:class:`Historian` writes :class:`Batch` es idempotently, :class:`Outbox` keeps them on
local disk while the database is away, :func:`migrate` creates the schema. The design of
the counter historian is in ``docs/historian.md``.
"""

from __future__ import annotations

from .batch import Batch, RowTuple, decode_batch, encode_batch
from .outbox import Outbox, OutboxFull
from .queries import (
    COMMAND_COLUMNS,
    TABLES,
    counter_energy,
    counter_events,
    recent_commands,
    table_rows,
)
from .schema import GRANTS, SCHEMA, MigrationResult, grant, migrate, migrations
from .writer import QUALITY_CODES, Historian, SchemaBehind, WriteResult, dsn_problem

__all__ = [
    "COMMAND_COLUMNS",
    "GRANTS",
    "QUALITY_CODES",
    "SCHEMA",
    "TABLES",
    "Batch",
    "Historian",
    "MigrationResult",
    "Outbox",
    "OutboxFull",
    "RowTuple",
    "SchemaBehind",
    "WriteResult",
    "counter_energy",
    "counter_events",
    "decode_batch",
    "dsn_problem",
    "encode_batch",
    "grant",
    "migrate",
    "migrations",
    "recent_commands",
    "table_rows",
]
