"""energybus: one MQTT language for a site's energy telemetry.

This package is the contract of the energy bus (topics, filters, payloads, delivery
policy, units, metrics, rendering and the historian mapping): pure functions and small
types with no I/O, cheap to import, so that adapters, the worker, the CLI and Node-RED
flows all apply exactly the same rules.

Names load on first use (PEP 562): ``import energybus`` is nearly free, and a
process that only validates topics never builds the payload schemas or the renderer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from energybus._version import __version__

# public name -> module that defines it; __all__ and lazy loading both come from here.
_EXPORTS: dict[str, str] = {
    "CommandError": "energybus.errors",
    "EnergyBusError": "energybus.errors",
    "FilterError": "energybus.errors",
    "IdentifierError": "energybus.errors",
    "LimitError": "energybus.errors",
    "MappingError": "energybus.errors",
    "PayloadError": "energybus.errors",
    "PolicyError": "energybus.errors",
    "SourceError": "energybus.errors",
    "TopicError": "energybus.errors",
    "UnitError": "energybus.errors",
    "FINAL_STATES": "energybus.commands",
    "CommandBook": "energybus.commands",
    "CommandRecord": "energybus.commands",
    "CommandState": "energybus.commands",
    "CANONICAL_FILTERS": "energybus.filters",
    "canonical_filter": "energybus.filters",
    "matches": "energybus.filters",
    "validate_filter": "energybus.filters",
    "DELIVERY": "energybus.messages",
    "Delivery": "energybus.messages",
    "Message": "energybus.messages",
    "check_delivery": "energybus.messages",
    "message": "energybus.messages",
    "METRICS": "energybus.metrics",
    "MetricClass": "energybus.metrics",
    "MetricInfo": "energybus.metrics",
    "metric_class": "energybus.metrics",
    "metric_info": "energybus.metrics",
    "Availability": "energybus.payloads",
    "Envelope": "energybus.payloads",
    "HistorianMeta": "energybus.payloads",
    "LastEnvelope": "energybus.payloads",
    "Meta": "energybus.payloads",
    "QUALITIES": "energybus.payloads",
    "Quality": "energybus.payloads",
    "Scalar": "energybus.payloads",
    "SetEnvelope": "energybus.payloads",
    "decode_availability": "energybus.payloads",
    "decode_last": "energybus.payloads",
    "decode_meta": "energybus.payloads",
    "decode_payload": "energybus.payloads",
    "decode_set": "energybus.payloads",
    "decode_value": "energybus.payloads",
    "encode_scalar": "energybus.payloads",
    "validate_payload": "energybus.payloads",
    "DEFAULT_SPEC": "energybus.render",
    "Renderer": "energybus.render",
    "SeriesSpec": "energybus.render",
    "CounterRow": "energybus.rows",
    "MeasurementRow": "energybus.rows",
    "Row": "energybus.rows",
    "historian_row": "energybus.rows",
    "to_row": "energybus.rows",
    "Reading": "energybus.samples",
    "Sample": "energybus.samples",
    "SeriesKey": "energybus.samples",
    "decode_sample": "energybus.samples",
    "make_sample": "energybus.samples",
    "observation": "energybus.samples",
    "ENTITY_TYPES": "energybus.topics",
    "EntityType": "energybus.topics",
    "STREAMS": "energybus.topics",
    "Stream": "energybus.topics",
    "Topic": "energybus.topics",
    "build_topic": "energybus.topics",
    "is_valid_topic": "energybus.topics",
    "parse_topic": "energybus.topics",
    "to_kebab": "energybus.topics",
    "to_snake": "energybus.topics",
    "validate_topic": "energybus.topics",
    "CANONICAL_UNITS": "energybus.units",
    "Conversion": "energybus.units",
    "canonical_unit": "energybus.units",
    "conversion": "energybus.units",
    "convert": "energybus.units",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'energybus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    # "X as X" marks an explicit re-export for strict type checkers.
    from energybus.commands import (
        FINAL_STATES as FINAL_STATES,
        CommandBook as CommandBook,
        CommandRecord as CommandRecord,
        CommandState as CommandState,
    )
    from energybus.errors import (
        CommandError as CommandError,
        EnergyBusError as EnergyBusError,
        FilterError as FilterError,
        IdentifierError as IdentifierError,
        LimitError as LimitError,
        MappingError as MappingError,
        PayloadError as PayloadError,
        PolicyError as PolicyError,
        SourceError as SourceError,
        TopicError as TopicError,
        UnitError as UnitError,
    )
    from energybus.filters import (
        CANONICAL_FILTERS as CANONICAL_FILTERS,
        canonical_filter as canonical_filter,
        matches as matches,
        validate_filter as validate_filter,
    )
    from energybus.messages import (
        DELIVERY as DELIVERY,
        Delivery as Delivery,
        Message as Message,
        check_delivery as check_delivery,
        message as message,
    )
    from energybus.metrics import (
        METRICS as METRICS,
        MetricClass as MetricClass,
        MetricInfo as MetricInfo,
        metric_class as metric_class,
        metric_info as metric_info,
    )
    from energybus.payloads import (
        QUALITIES as QUALITIES,
        Availability as Availability,
        Envelope as Envelope,
        HistorianMeta as HistorianMeta,
        LastEnvelope as LastEnvelope,
        Meta as Meta,
        Quality as Quality,
        Scalar as Scalar,
        SetEnvelope as SetEnvelope,
        decode_availability as decode_availability,
        decode_last as decode_last,
        decode_meta as decode_meta,
        decode_payload as decode_payload,
        decode_set as decode_set,
        decode_value as decode_value,
        encode_scalar as encode_scalar,
        validate_payload as validate_payload,
    )
    from energybus.render import (
        DEFAULT_SPEC as DEFAULT_SPEC,
        Renderer as Renderer,
        SeriesSpec as SeriesSpec,
    )
    from energybus.rows import (
        CounterRow as CounterRow,
        MeasurementRow as MeasurementRow,
        Row as Row,
        historian_row as historian_row,
        to_row as to_row,
    )
    from energybus.samples import (
        Reading as Reading,
        Sample as Sample,
        SeriesKey as SeriesKey,
        decode_sample as decode_sample,
        make_sample as make_sample,
        observation as observation,
    )
    from energybus.topics import (
        ENTITY_TYPES as ENTITY_TYPES,
        STREAMS as STREAMS,
        EntityType as EntityType,
        Stream as Stream,
        Topic as Topic,
        build_topic as build_topic,
        is_valid_topic as is_valid_topic,
        parse_topic as parse_topic,
        to_kebab as to_kebab,
        to_snake as to_snake,
        validate_topic as validate_topic,
    )
    from energybus.units import (
        CANONICAL_UNITS as CANONICAL_UNITS,
        Conversion as Conversion,
        canonical_unit as canonical_unit,
        conversion as conversion,
        convert as convert,
    )
