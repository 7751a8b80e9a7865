"""Malformed inputs, drawn by hypothesis: a valid message of one source broken one way,
with the rejection reason the worker must count and dead-letter it under.

Each category is a strategy of :class:`Mutation` (where and how to break), applied to a
message made new for it (tests/faults/traffic.py), so two inputs are never the same
bytes unless the category is a replay:

- ``truncated``: the encoded message cut short anywhere (``malformed_json``);
- ``oversized``: about 1 MB in one field: past the source's ``max_payload_bytes``, it is
  ``too_large`` (:meth:`Dialect.reason` compares it with the limit the worker runs
  with); below a limit raised that far, the field decides (a VEN id too long for a
  topic, a CPI or Voke device no plant has, a setpoint that is no number);
- ``nested``: thousands of levels of arrays or objects where the decoder must follow
  them (``too_deep``), or where a typed decoder wants a number (``wrong_type``);
- ``wrong_type``: one field of the envelope or a mapped value given a JSON value of
  another type (``wrong_type``), re-signed where the source signs;
- ``invalid_utf8``: bytes that are not UTF-8 put inside any string of the message, key or
  value, mapped or not (``invalid_utf8``);
- ``huge_number``: a mapped number written past the range of a double (``non_finite``);
- ``forged``: a signature no active key made: random hex, another key's, one over other
  content, or one of the wrong type (``bad_signature``);
- ``replayed``: a valid message sent again, byte for byte (``replayed``).

Every input is refused whole: nothing of it is stored, so the ledger of valid samples
is untouched by it. An input of any category longer than the source's
``max_payload_bytes`` is ``too_large`` instead, since the pipeline refuses it before
anything decodes it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Final, NamedTuple, TypeVar

import hypothesis
import msgspec
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from hypothesis.strategies import SearchStrategy

from energybus.adapters.signing import Signer
from tests.faults.traffic import Doc

T = TypeVar("T")
FieldPath = tuple[str | int, ...]

CATEGORIES: Final = (
    "truncated",
    "oversized",
    "nested",
    "wrong_type",
    "invalid_utf8",
    "huge_number",
    "forged",
    "replayed",
)
REASONS: Final = {
    "truncated": "malformed_json",
    "wrong_type": "wrong_type",
    "invalid_utf8": "invalid_utf8",
    "huge_number": "non_finite",
    "forged": "bad_signature",
    "replayed": "replayed",
}
"""The reason of each category whatever the source; ``oversized`` and ``nested`` depend
on where the source puts them (:class:`Dialect`)."""

_MARK: Final = "@@fault-mark@@"
_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"')


class Dialect(NamedTuple):
    """Where one source's messages can be broken, and what each break is refused as."""

    adapter: str
    typed: dict[FieldPath, tuple[str, ...]]
    """Fields whose type is checked, each with the JSON kinds that are wrong for it (null
    is left out: where it is allowed it means "absent")."""
    numbers: tuple[FieldPath, ...]
    """Mapped numbers, for ``huge_number``."""
    oversized: tuple[FieldPath, str]
    nested: tuple[FieldPath, str]
    signed: bool

    @property
    def categories(self) -> tuple[str, ...]:
        return CATEGORIES if self.signed else CATEGORIES[:-2]

    def reason(self, category: str, payload: bytes, max_payload_bytes: int) -> str:
        """The reason ``payload``, an input of ``category``, must be refused with by a
        source that takes ``max_payload_bytes`` (the worker's configured limit)."""
        if len(payload) > max_payload_bytes:
            return "too_large"
        if category == "oversized":
            return self.oversized[1]
        if category == "nested":
            return self.nested[1]
        return REASONS[category]


_NOT_NUMBER: Final = ("string", "boolean", "array", "object")
_NOT_STRING: Final = ("number", "boolean", "array", "object")
DIALECTS: Final = {
    "ven": Dialect(
        "ven",
        typed={
            ("venId",): _NOT_STRING,
            ("timestamp",): _NOT_NUMBER,
            ("batterySOC",): _NOT_NUMBER,
            ("usedPowerKw",): _NOT_NUMBER,
            ("circuits",): ("string", "number", "boolean", "object"),
            # An item key may be a number (ids such as 3 become "3"), not a structure.
            ("circuits", 0, "id"): ("array", "object"),
            ("circuits", 0, "currentKw"): _NOT_NUMBER,
            ("circuits", 1, "enabled"): ("string", "number", "array", "object"),
        },
        numbers=(("timestamp",), ("batterySOC",), ("usedPowerKw",), ("circuits", 1, "currentKw")),
        # The VEN's id becomes topic levels: 1 MB of it is too long for a topic.
        oversized=(("venId",), "too_long"),
        # A field the mapping does not know is skipped, but its nesting still is followed.
        nested=(("extensions",), "too_deep"),
        signed=False,
    ),
    "cpi": Dialect(
        "cpi",
        typed={
            ("ts",): _NOT_NUMBER,
            ("target",): _NOT_STRING,
            ("values",): ("string", "boolean", "array"),
        },
        numbers=(("ts",), ("values", "soc"), ("values", "status")),
        oversized=(("target",), "unknown_target"),
        nested=(("values", "soc"), "too_deep"),
        signed=True,
    ),
    "voke": Dialect(
        "voke",
        typed={
            ("ts",): _NOT_NUMBER,
            ("device",): _NOT_STRING,
            ("kind",): _NOT_STRING,
            ("values",): ("string", "boolean", "array", "number"),
        },
        numbers=(("ts",), ("seq",), ("values", "socPct")),
        oversized=(("device",), "unknown_target"),
        nested=(("values",), "too_deep"),
        signed=True,
    ),
    "modbus": Dialect(
        "modbus",
        typed={
            ("value",): ("string", "array", "object"),
            ("unit",): _NOT_STRING,
            ("event_id",): _NOT_STRING,
            ("duration_s",): _NOT_NUMBER,
        },
        numbers=(("value",), ("duration_s",)),
        # A set's decoder is typed: a string or an array where the number belongs is
        # refused at once, however long or deep.
        oversized=(("value",), "wrong_type"),
        nested=(("value",), "wrong_type"),
        signed=False,
    ),
}


class Mutation(NamedTuple):
    category: str
    path: FieldPath = ()
    value: Any = None
    where: float = 0.0
    offset: float = 0.0


# Strategies ---------------------------------------------------------------------------

_leaf: Final = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**6), 10**6),
    st.floats(-1e9, 1e9, allow_nan=False),
    st.booleans(),
)
_KINDS: Final[dict[str, SearchStrategy[Any]]] = {
    "string": st.text(max_size=16),
    "number": st.one_of(st.integers(-(10**9), 10**9), st.floats(-1e9, 1e9, allow_nan=False)),
    "boolean": st.booleans(),
    "array": st.lists(_leaf, max_size=4),
    "object": st.dictionaries(st.text(max_size=8), _leaf, max_size=3),
}
_fraction: Final = st.floats(0, 1, exclude_max=True)
_invalid_utf8: Final = st.one_of(
    st.integers(0x80, 0xBF).map(lambda b: bytes([b])),  # a continuation byte alone
    st.tuples(st.integers(0xC0, 0xC1), st.integers(0x80, 0xBF)).map(bytes),  # overlong
    st.integers(0xC2, 0xF4).map(lambda b: bytes([b])),  # a lead byte cut short
    st.integers(0xA0, 0xBF).map(lambda b: bytes([0xED, b, 0x80])),  # a UTF-16 surrogate
    st.integers(0x90, 0xBF).map(lambda b: bytes([0xF4, b, 0x80, 0x80])),  # past U+10FFFF
    st.integers(0xF5, 0xFF).map(lambda b: bytes([b])),  # never in UTF-8
)
_huge: Final = st.builds(
    lambda sign, lead, digits, exponent: f"{sign}{lead}.{digits}e{exponent}".encode(),
    st.sampled_from(["", "-"]),
    st.integers(1, 9),
    st.text("0123456789", min_size=1, max_size=17),
    st.integers(309, 100_000),
)


def strategy(dialect: Dialect, category: str) -> SearchStrategy[Mutation]:
    """How hypothesis draws one ``category`` of break for ``dialect``'s messages."""
    if category == "truncated":
        return _fraction.map(lambda where: Mutation(category, where=where))
    if category == "oversized":
        path = dialect.oversized[0]
        return st.tuples(st.sampled_from("abcxyz09"), st.integers(1_000_000, 1_100_000)).map(
            lambda value: Mutation(category, path, value)
        )
    if category == "nested":
        # Deeper than the interpreter's recursion limit also while hypothesis runs a test
        # (it raises the limit to at most 3,000), so the input is too deep everywhere.
        path = dialect.nested[0]
        return st.tuples(st.sampled_from(["[", '{"a":']), st.integers(3_500, 8_000)).map(
            lambda value: Mutation(category, path, value)
        )
    if category == "wrong_type":
        fields = sorted(dialect.typed.items(), key=repr)
        return st.sampled_from(fields).flatmap(
            lambda field: (
                st.sampled_from(field[1])
                .flatmap(lambda kind: _KINDS[kind])
                .map(lambda value: Mutation(category, field[0], value))
            )
        )
    if category == "invalid_utf8":
        return st.tuples(_invalid_utf8, _fraction, _fraction).map(
            lambda t: Mutation(category, (), t[0], t[1], t[2])
        )
    if category == "huge_number":
        return st.tuples(st.sampled_from(dialect.numbers), _huge).map(
            lambda t: Mutation(category, t[0], t[1])
        )
    if category == "forged":
        return st.one_of(
            st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: ("hex", h)),
            st.text(min_size=1, max_size=24).map(lambda key: ("key", key)),
            st.just(("tampered", None)),
            st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.just("")).map(
                lambda sig: ("type", sig)
            ),
        ).map(lambda how: Mutation(category, (), how))
    if category == "replayed":
        return _fraction.map(lambda where: Mutation(category, where=where))
    raise ValueError(f"no category {category!r}")


def draw(strategy: SearchStrategy[T], count: int, *, seed: int) -> list[T]:
    """``count`` values of ``strategy``, the same ones for the same seed: hypothesis's
    generation outside a test, for a corpus sent to a running worker."""
    found: list[T] = []
    while len(found) < count:

        @hypothesis.seed(seed)
        @settings(
            max_examples=count - len(found),
            database=None,
            phases=[Phase.generate],
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(strategy)
        def collect(value: T) -> None:
            found.append(value)

        before = len(found)
        collect()
        if len(found) == before:
            raise RuntimeError("the strategy gave nothing more")
        seed += 1
    return found[:count]


# Applying a mutation -------------------------------------------------------------------


def _set(document: Any, path: FieldPath, value: Any) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def _marked(doc: Doc, path: FieldPath, replacement: bytes) -> bytes:
    """The message with the field at ``path`` written as ``replacement``, raw bytes that
    a JSON encoder would not write."""
    document = _copy(doc.document)
    _set(document, path, _MARK)
    return _encode(document).replace(f'"{_MARK}"'.encode(), replacement, 1)


def apply(mutation: Mutation, doc: Doc, sent: Sequence[bytes] = ()) -> bytes:
    """The bytes of ``doc`` broken by ``mutation``; a replay repeats one of ``sent``."""
    category, path, value = mutation.category, mutation.path, mutation.value
    if category == "truncated":
        encoded = doc.encode()
        return encoded[: int(mutation.where * len(encoded))]
    if category == "oversized":
        char, size = value
        document = _copy(doc.document)
        _set(document, path, char * size)
        return _encode(doc.resigned(document))
    if category == "nested":
        opening, depth = value
        closing = "]" if opening == "[" else "}"
        inner = "" if opening == "[" else "1"
        return _marked(doc, path, (opening * depth + inner + closing * depth).encode())
    if category == "wrong_type":
        document = _copy(doc.document)
        _set(document, path, value)
        return _encode(doc.resigned(document))
    if category == "invalid_utf8":
        encoded = doc.encode()
        strings = [m.span() for m in _STRING.finditer(encoded)]
        start, end = strings[int(mutation.where * len(strings))]
        at = start + 1 + int(mutation.offset * (end - start - 1))
        if encoded[at - 1 : at] == b"\\":
            at -= 1  # not inside an escape
        junk: bytes = value
        return encoded[:at] + junk + encoded[at:]
    if category == "huge_number":
        return _marked(doc, path, value)
    if category == "forged":
        return _encode(_forged(doc, value))
    if category == "replayed":
        if not sent:
            raise ValueError("a replay needs a message sent before it")
        return sent[int(mutation.where * len(sent))]
    raise ValueError(f"no category {category!r}")


def _forged(doc: Doc, how: tuple[str, Any]) -> dict[str, Any]:
    kind, value = how
    document = _copy(doc.document)
    if kind == "hex":
        document["sig"] = value
    elif kind == "key":
        document["sig"] = Signer([value]).sign(document)
    elif kind == "tampered":
        # Signed, then a value changed: the signature is over other content.
        values = document["values"]
        first = sorted(values)[0]
        values[first] = values[first] + 1 if isinstance(values[first], int | float) else 1
    else:
        document["sig"] = value
    return document


def _copy(document: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = msgspec.json.decode(_encode(document))
    return copied


_encode: Final = msgspec.json.encode


class Input(NamedTuple):
    """One malformed input as sent: its source, where it went, the bytes and the reason
    it must be refused with."""

    adapter: str
    topic: str
    payload: bytes
    category: str
    reason: str

    @property
    def letter(self) -> str:
        """What its dead letter is known by (:func:`letter_key`)."""
        body = None if self.reason == "too_large" else self.payload
        return letter_key(self.topic, body, len(self.payload))


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def letter_key(topic: str, body: bytes | None, size: int) -> str:
    """What a dead letter is matched with the input it refused by: the digest of the
    body it carries, or, for one that keeps only the size (``too_large``), its topic
    and size."""
    return digest(body) if body is not None else f"{topic}#{size}"
