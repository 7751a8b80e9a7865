"""Payload schemas of each stream, as msgspec Structs, with decoders and encoders built once.

One base Struct, :class:`Schema`, holds the policy every schema shares: payloads are
immutable values, unknown fields are errors, absent optional fields are left out when
encoding (small envelopes), and fields keep the order the contract writes them in.
"""

from __future__ import annotations

import math
import operator
import re
from datetime import datetime
from itertools import accumulate, count
from typing import Annotated, Final, Literal, TypeAlias, TypeVar

import msgspec

from energybus.errors import LimitError, PayloadError
from energybus.metrics import MetricClass
from energybus.topics import Stream

__all__ = [
    "DECODE_ERRORS",
    "QUALITIES",
    "Availability",
    "Envelope",
    "HistorianMeta",
    "HistorianMode",
    "LastEnvelope",
    "Meta",
    "Quality",
    "Scalar",
    "Schema",
    "SetEnvelope",
    "decode_availability",
    "decode_last",
    "decode_meta",
    "decode_payload",
    "decode_set",
    "decode_value",
    "deeper_than",
    "encode",
    "encode_scalar",
    "explain",
    "over_limit",
    "too_large",
    "validate_payload",
]

Scalar: TypeAlias = bool | int | float
Quality = Literal["good", "degraded", "stale", "bad"]
QUALITIES: Final[tuple[Quality, ...]] = ("good", "degraded", "stale", "bad")
HistorianMode = Literal["sample", "state", "event"]
Availability = Literal["online", "offline"]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


class Schema(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every payload schema on the bus; holds the shared schema policy."""


class Envelope(Schema, frozen=True, gc=False):
    """Profile B: a value with the observation time and quality travelling alongside."""

    value: Scalar
    unit: str | None = None
    observed_at: AwareDatetime | None = None
    quality: Quality | None = None


class SetEnvelope(Schema, frozen=True, gc=False):
    """Profile B on ``set``: a requested value, optionally bounded in time and named.

    ``duration_s`` asks for the setting to hold that long (a demand-response event);
    ``event_id`` names the request so the source platform's records can cite it.
    """

    value: Scalar
    unit: str | None = None
    observed_at: AwareDatetime | None = None
    quality: Quality | None = None
    duration_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    event_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    priority: Literal["safety", "manual", "scheduled", "optimization"] | None = None
    """The command's class where setpoints are arbitrated (energybus.safety): a lower
    class cannot override a higher one while it holds."""


class LastEnvelope(Schema, frozen=True, gc=False, kw_only=True):
    """The retained ``last``: Profile B with ``observed_at`` required, for freshness checks."""

    value: Scalar
    unit: str | None = None
    observed_at: AwareDatetime
    quality: Quality | None = None


class HistorianMeta(Schema, frozen=True):
    """How a historian should read a value stream (the contract's ``meta.historian.mode``)."""

    mode: HistorianMode


class Meta(Schema, frozen=True):
    """Retained metadata of one series. ``docs/contract.md`` explains each field."""

    unit: str | None = None
    description: str | None = None
    source: str | None = None
    precision: Annotated[float, msgspec.Meta(gt=0)] | None = None
    historian: HistorianMeta | None = None
    metric_class: MetricClass | None = msgspec.field(default=None, name="class")
    max_interval_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    deadband: Annotated[float, msgspec.Meta(ge=0)] | None = None
    attributes: dict[str, str | int | float | bool] | None = None


_value_decoder: Final[msgspec.json.Decoder[Scalar | Envelope]] = msgspec.json.Decoder(
    Scalar | Envelope
)
_set_decoder: Final[msgspec.json.Decoder[Scalar | SetEnvelope]] = msgspec.json.Decoder(
    Scalar | SetEnvelope
)
_last_decoder: Final = msgspec.json.Decoder(LastEnvelope)
_meta_decoder: Final = msgspec.json.Decoder(Meta)
_encoder: Final = msgspec.json.Encoder()
_MAX_DOUBLE: Final = 1.7976931348623157e308
_AVAILABILITY: Final[dict[bytes, Availability]] = {b"online": "online", b"offline": "offline"}

encode: Final = _encoder.encode
"""Encode a schema object (or scalar) to canonical JSON bytes."""


def encode_scalar(value: Scalar) -> bytes:
    """Profile A bytes for ``value``; refuses what JSON or the contract cannot carry."""
    kind = type(value)
    if kind is not float and kind is not int and kind is not bool:
        raise PayloadError("wrong_type", f"value must be a number or boolean, not {kind.__name__}")
    encoded = _encoder.encode(value)
    if encoded == b"null":  # msgspec writes NaN and infinities as null; JSON has neither
        raise PayloadError("non_finite", f"value {value!r} is not a finite number")
    return encoded


def decode_value(payload: bytes | str) -> Scalar | Envelope:
    """Decode a ``value`` payload: Profile A scalar or Profile B envelope."""
    return _decode_sample(_value_decoder, Envelope, payload)


def decode_set(payload: bytes | str) -> Scalar | SetEnvelope:
    """Decode a ``set`` payload: Profile A scalar or a Profile B :class:`SetEnvelope`."""
    return _decode_sample(_set_decoder, SetEnvelope, payload)


_E = TypeVar("_E", Envelope, SetEnvelope)


def _decode_sample(
    decoder: msgspec.json.Decoder[Scalar | _E], envelope: type[_E], payload: bytes | str
) -> Scalar | _E:
    try:
        decoded = decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise _payload_error(exc, "a JSON number, boolean, or Profile B object") from None
    value: Scalar = decoded.value if isinstance(decoded, envelope) else decoded  # type: ignore[assignment]
    if (type(value) is float and not math.isfinite(value)) or (
        type(value) is int and not -_MAX_DOUBLE <= value <= _MAX_DOUBLE
    ):
        # Bus values are doubles: a 400-digit integer is JSON, but no number a consumer
        # (or the historian) can hold.
        path = "$.value" if isinstance(decoded, envelope) else "$"
        raise PayloadError("non_finite", "value is out of the range of a finite number", path=path)
    return decoded


def decode_last(payload: bytes | str) -> LastEnvelope:
    """Decode a retained ``last`` payload: Profile B with ``observed_at``."""
    try:
        decoded = _last_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise _payload_error(exc, "a Profile B object with observed_at") from None
    if type(decoded.value) is float and not math.isfinite(decoded.value):
        raise PayloadError(
            "non_finite", "value is out of the range of a finite number", path="$.value"
        )
    return decoded


def decode_meta(payload: bytes | str) -> Meta:
    """Decode a retained ``meta`` payload."""
    try:
        return _meta_decoder.decode(payload)
    except DECODE_ERRORS as exc:
        raise _payload_error(exc, "a JSON object of metadata") from None


def decode_availability(payload: bytes | str) -> Availability:
    """Decode an ``availability`` payload: the bare text ``online`` or ``offline``."""
    key = payload.encode("utf-8", "replace") if isinstance(payload, str) else payload
    state = _AVAILABILITY.get(key)
    if state is None:
        shown = key[:40].decode("utf-8", "replace")
        raise PayloadError(
            "invalid_value", f"availability must be 'online' or 'offline', not {shown!r}"
        )
    return state


_DECODERS: Final = {
    "value": decode_value,
    "set": decode_set,
    "last": decode_last,
    "meta": decode_meta,
    "availability": decode_availability,
}


def decode_payload(stream: Stream, payload: bytes | str) -> object:
    """Decode ``payload`` by the rules of ``stream``; raises :class:`PayloadError`."""
    return _DECODERS[stream](payload)


def validate_payload(stream: Stream, payload: bytes | str) -> PayloadError | None:
    """The first rule ``payload`` breaks for ``stream``, or ``None``. Never raises on bad input."""
    try:
        _DECODERS[stream](payload)
    except PayloadError as exc:
        return exc
    return None


_PATH_RE: Final = re.compile(r" - at `(\$[^`]*)`$")
_FIELD_RE: Final = re.compile(r"field `([^`]*)`")
_CHOICES: Final = {
    "$.quality": QUALITIES,
    "$.historian.mode": ("sample", "state", "event"),
    "$.class": ("measurement", "counter"),
}


DECODE_ERRORS: Final = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError)
"""What a msgspec decode of untrusted bytes can raise. Invalid UTF-8 inside a JSON
string is a ``UnicodeDecodeError`` in msgspec 0.22 and a ``DecodeError`` from 0.23 on
(:func:`explain` gives both the code ``invalid_utf8``); nesting deeper than the
interpreter's recursion limit is a ``RecursionError`` (``too_deep``). Source messages
are held to ``max_depth`` (:func:`deeper_than`) before they are decoded, so this is a
safety net for decoders that no limit guards (a mapping file, a CLI input line)."""

DecodeFault = msgspec.MsgspecError | UnicodeDecodeError | RecursionError


def explain(exc: DecodeFault) -> tuple[str, str, str]:
    """``(code, detail, path)`` for a msgspec error: its wording kept, a stable code added.

    Shared by every msgspec schema in energybus (payloads, mapping files, adapter
    options, source messages), so one kind of fault has one code wherever it is found.
    """
    if isinstance(exc, RecursionError):
        return "too_deep", "JSON nested too deeply to decode", "$"
    if isinstance(exc, UnicodeDecodeError) or "UTF-8" in str(exc):
        return "invalid_utf8", "not valid UTF-8 text", "$"
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return "malformed_json", text, "$"
    match = _PATH_RE.search(text)
    path = match.group(1) if match else "$"
    detail = text[: match.start()] if match else text
    field = _FIELD_RE.search(detail)
    if field and detail.startswith("Object contains unknown field"):
        return "unknown_field", detail, f"{path}.{field.group(1)}"
    if field and detail.startswith("Object missing required field"):
        return "missing_field", detail, f"{path}.{field.group(1)}"
    if detail.startswith("Number out of range"):
        return "non_finite", "number is out of the range of a finite double", path
    if "timezone" in detail:
        return (
            "naive_datetime",
            "time must carry a zone (RFC 3339, e.g. '2026-03-08T10:15:12Z')",
            path,
        )
    if detail.startswith("Expected") and re.search(r"` [<>]=? ", detail):
        return "out_of_range", detail, path
    if detail.startswith("Expected"):
        return "wrong_type", detail, path
    return "invalid_value", detail, path


# Nesting ------------------------------------------------------------------------------

_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?')
"""A JSON string, escapes included; to the end of the input when it is not closed."""
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_NOT_BRACKETS_OR_QUOTES: Final = bytes(b for b in range(256) if b not in b'[]{}"')
_PARENS: Final = bytes.maketrans(b"[]{}", b"()()")
_STEPS: Final = bytes.maketrans(b"()", b"\x02\x00")


def deeper_than(payload: bytes, max_depth: int) -> bool:
    """Whether the JSON in ``payload`` nests arrays and objects more than ``max_depth``
    levels (``1`` has none, ``{"a": [1]}`` two), counted as a decoder meets them:
    brackets inside strings are text, and a document cut short counts the levels it
    opened. Bytes that are not JSON are counted the same way; what they are is the
    decoder's to say.

    Most messages have no more opening brackets in all than the limit, which two
    ``bytes.count`` calls tell (about 2 µs for a 3 KB VEN message). Only the others are
    scanned exactly: without any backslash, string boundaries are every other quote, so
    the brackets and quotes are kept (``bytes.translate``), empty strings dropped and
    what is left between quotes cut out; with one, escapes decide where strings end,
    and a regular expression removes them. The depth is then the highest running count
    of the brackets, summed by ``itertools`` rather than a Python loop (about 50 ns a
    bracket: 13 ms for 256 KiB of nothing else).
    """
    if payload.count(b"[") + payload.count(b"{") <= max_depth:
        return False
    if b"\\" in payload:
        kept = _STRING.sub(b"", payload).translate(_PARENS, _NOT_BRACKETS)
    else:
        kept = payload.translate(_PARENS, _NOT_BRACKETS_OR_QUOTES).replace(b'""', b"")
        if b'"' in kept:
            kept = b"".join(kept.split(b'"')[::2])
    if kept.count(b"(") <= max_depth:
        return False
    # After n brackets of which k opened, the depth is 2k - n: opening brackets step by
    # 2, closing ones by 0, and the count of brackets so far is subtracted.
    depths: map[int] = map(operator.sub, accumulate(kept.translate(_STEPS)), count(1))
    return max(depths) > max_depth


def too_large(size: int, max_bytes: int, *, prefix: str = "") -> LimitError:
    """The refusal of a message of ``size`` bytes, over ``max_bytes``."""
    return LimitError(
        "too_large",
        f"the message is {size:,} bytes; at most {max_bytes:,} are taken"
        f" ({prefix}max_payload_bytes)",
        setting=f"{prefix}max_payload_bytes",
    )


def over_limit(
    payload: bytes, max_bytes: int, max_depth: int | None = None, *, prefix: str = ""
) -> LimitError | None:
    """Why ``payload`` may not be decoded, or ``None``: larger than ``max_bytes``
    (``too_large``), or JSON nested deeper than ``max_depth`` (``too_deep``; ``None``
    checks no nesting, for payloads that are not JSON). ``prefix`` completes the names
    of the settings in the message (``adapters.ven.``)."""
    if len(payload) > max_bytes:
        return too_large(len(payload), max_bytes, prefix=prefix)
    if max_depth is not None and deeper_than(payload, max_depth):
        return LimitError(
            "too_deep",
            f"JSON nested more than {max_depth} levels deep ({prefix}max_depth)",
            setting=f"{prefix}max_depth",
        )
    return None


def _payload_error(exc: DecodeFault, expected: str) -> PayloadError:
    code, detail, path = explain(exc)
    if code == "malformed_json" or (code == "wrong_type" and path == "$"):
        detail = f"{detail}; expected {expected}"
    elif code == "invalid_value" and path in _CHOICES:
        detail = f"{detail}; expected one of {', '.join(_CHOICES[path])}"
    if code in ("malformed_json", "invalid_utf8", "too_deep"):
        return PayloadError(code, detail)
    return PayloadError(code, f"{detail} (at {path})", path=path)
