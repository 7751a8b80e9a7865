"""energybus: one MQTT language for a site's energy telemetry.

This package is the contract of the energy bus (topics, filters, payloads, delivery
policy, units, metrics, rendering and the historian mapping): pure functions and small
types with no I/O, cheap to import, so that adapters, the worker, the CLI and Node-RED
flows all apply exactly the same rules.
"""

from energybus._version import __version__
from energybus.errors import (
    EnergyBusError,
    FilterError,
    IdentifierError,
    PayloadError,
    PolicyError,
    TopicError,
    UnitError,
)
from energybus.filters import CANONICAL_FILTERS, canonical_filter, matches, validate_filter
from energybus.messages import DELIVERY, Delivery, Message, check_delivery, message
from energybus.metrics import METRICS, MetricClass, MetricInfo, metric_class, metric_info
from energybus.payloads import (
    QUALITIES,
    Availability,
    Envelope,
    HistorianMeta,
    LastEnvelope,
    Meta,
    Quality,
    Scalar,
    decode_availability,
    decode_last,
    decode_meta,
    decode_payload,
    decode_value,
    encode_scalar,
    validate_payload,
)
from energybus.render import DEFAULT_SPEC, Renderer, SeriesSpec
from energybus.rows import CounterRow, MeasurementRow, Row, historian_row, to_row
from energybus.samples import Sample, SeriesKey, decode_sample, make_sample
from energybus.topics import (
    ENTITY_TYPES,
    STREAMS,
    EntityType,
    Stream,
    Topic,
    build_topic,
    is_valid_topic,
    parse_topic,
    to_kebab,
    to_snake,
    validate_topic,
)
from energybus.units import CANONICAL_UNITS, Conversion, canonical_unit, conversion, convert

__all__ = [
    "CANONICAL_FILTERS",
    "CANONICAL_UNITS",
    "DEFAULT_SPEC",
    "DELIVERY",
    "ENTITY_TYPES",
    "METRICS",
    "QUALITIES",
    "STREAMS",
    "Availability",
    "Conversion",
    "CounterRow",
    "Delivery",
    "EnergyBusError",
    "EntityType",
    "Envelope",
    "FilterError",
    "HistorianMeta",
    "IdentifierError",
    "LastEnvelope",
    "MeasurementRow",
    "Message",
    "Meta",
    "MetricClass",
    "MetricInfo",
    "PayloadError",
    "PolicyError",
    "Quality",
    "Renderer",
    "Row",
    "Sample",
    "Scalar",
    "SeriesKey",
    "SeriesSpec",
    "Stream",
    "Topic",
    "TopicError",
    "UnitError",
    "__version__",
    "build_topic",
    "canonical_filter",
    "canonical_unit",
    "check_delivery",
    "conversion",
    "convert",
    "decode_availability",
    "decode_last",
    "decode_meta",
    "decode_payload",
    "decode_sample",
    "decode_value",
    "encode_scalar",
    "historian_row",
    "is_valid_topic",
    "make_sample",
    "matches",
    "message",
    "metric_class",
    "metric_info",
    "parse_topic",
    "to_kebab",
    "to_row",
    "to_snake",
    "validate_filter",
    "validate_payload",
    "validate_topic",
]
