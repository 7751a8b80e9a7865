"""Topic names of the energy bus: ``<site>/energy/<entity_type>/<entity_id>/<metric>/<stream>``.

The valid case is decided by one compiled regular expression, because valid topics are
what a worker sees at line rate. Only a topic that fails it goes through the slower
diagnosis, which finds the first rule broken and says how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, Literal

import msgspec

from energybus.errors import IdentifierError, TopicError

__all__ = [
    "DOMAIN",
    "ENTITY_TYPES",
    "MAX_TOPIC_BYTES",
    "SEGMENTS",
    "STREAMS",
    "EntityType",
    "Stream",
    "Topic",
    "build_topic",
    "is_valid_topic",
    "parse_topic",
    "to_kebab",
    "to_snake",
    "validate_topic",
]

EntityType = Literal["source", "storage", "grid", "load", "transfer"]
Stream = Literal["value", "last", "set", "meta", "availability"]

DOMAIN: Final = "energy"
ENTITY_TYPES: Final[tuple[EntityType, ...]] = ("source", "storage", "grid", "load", "transfer")
STREAMS: Final[tuple[Stream, ...]] = ("value", "last", "set", "meta", "availability")
SEGMENTS: Final = ("site", "domain", "entity_type", "entity_id", "metric", "stream")
MAX_TOPIC_BYTES: Final = 65535
"""MQTT encodes a topic's length in two bytes."""

_KEBAB = r"[a-z0-9]+(?:-[a-z0-9]+)*"
_SNAKE = r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*"
_TOPIC_RE = re.compile(
    rf"({_KEBAB})/energy/({'|'.join(ENTITY_TYPES)})/({_KEBAB})/({_SNAKE})/({'|'.join(STREAMS)})"
)
_GRAMMAR = "<site>/energy/<entity_type>/<entity_id>/<metric>/<stream>"


class Topic(msgspec.Struct, frozen=True, gc=False):
    """A parsed energy bus topic; ``str(topic)`` gives the wire form back."""

    site: str
    entity_type: EntityType
    entity_id: str
    metric: str
    stream: Stream

    def __str__(self) -> str:
        return f"{self.site}/energy/{self.entity_type}/{self.entity_id}/{self.metric}/{self.stream}"

    @property
    def device_id(self) -> str:
        """The historian's device id, ``<entity_type>.<entity_id>``, as the contract recommends."""
        return f"{self.entity_type}.{self.entity_id}"

    def with_stream(self, stream: Stream) -> Topic:
        """The same series on another stream (``value`` -> ``last``, ``meta``, ...)."""
        if stream not in STREAMS:
            raise _stream_error(stream, str(self))
        return Topic(self.site, self.entity_type, self.entity_id, self.metric, stream)


def is_valid_topic(topic: str) -> bool:
    """True when ``topic`` is a valid energy bus topic name; the fastest check there is."""
    # A match is pure ASCII, so its length in characters is its length in bytes.
    return _TOPIC_RE.fullmatch(topic) is not None and len(topic) <= MAX_TOPIC_BYTES


def parse_topic(topic: str | bytes) -> Topic:
    """Split a topic into its levels, or raise :class:`TopicError` saying what is wrong.

    ``bytes`` (a topic as it came off the wire) must be UTF-8.
    """
    if isinstance(topic, bytes):
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:
            text = ""  # validate_topic below says where the bad byte is
    else:
        text = topic
    if isinstance(text, str):
        m = _TOPIC_RE.fullmatch(text)
        if m is not None and len(text) <= MAX_TOPIC_BYTES:
            site, entity_type, entity_id, metric, stream = m.groups()
            return Topic(site, entity_type, entity_id, metric, stream)  # type: ignore[arg-type]
    error = validate_topic(topic)
    assert error is not None
    raise error


def validate_topic(topic: str | bytes) -> TopicError | None:
    """The first rule ``topic`` breaks, or ``None``. Never raises, whatever it is given."""
    if isinstance(topic, bytes):
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError as exc:
            return TopicError(
                "invalid_utf8",
                f"topic is not valid UTF-8 (byte {exc.start} is 0x{topic[exc.start]:02x})",
                topic=topic.decode("utf-8", "replace"),
            )
    elif isinstance(topic, str):
        text = topic
    else:
        return TopicError(
            "not_text", f"topic must be text, not {type(topic).__name__}", topic=repr(topic)
        )
    if _TOPIC_RE.fullmatch(text) is not None and len(text) <= MAX_TOPIC_BYTES:
        return None
    return _diagnose(text)


def build_topic(
    site: str, entity_type: str, entity_id: str, metric: str, stream: str = "value"
) -> str:
    """Join levels into a topic, raising :class:`TopicError` on the first bad level."""
    topic = f"{site}/{DOMAIN}/{entity_type}/{entity_id}/{metric}/{stream}"
    if is_valid_topic(topic):
        return topic
    # Diagnose each level on its own: joined, a '/' inside a level would shift the rest.
    levels = (site, DOMAIN, entity_type, entity_id, metric, stream)
    for index, level in enumerate(levels):
        if "/" in level:
            segment = SEGMENTS[index]
            raise TopicError(
                "slash_in_level",
                f"{segment} {level!r} must not contain '/'",
                topic=topic,
                segment=segment,
            )
    error = _diagnose(topic)
    raise error


def to_kebab(text: str) -> str:
    """Turn a source id into a bus id: ``circuit_1`` -> ``circuit-1``.

    ``Garage EV`` -> ``garage-ev``; camelCase and acronyms split into words
    (``batterySOC`` -> ``battery-soc``); accents are dropped (``Küche`` -> ``kuche``).
    Raises :class:`IdentifierError` when nothing usable is left.
    """
    words = _words(text)
    if not words:
        raise IdentifierError(
            "empty_identifier",
            f"{text!r} has no letters or digits to build a kebab-case id from",
            source=text,
        )
    return "-".join(words)


def to_snake(text: str) -> str:
    """Turn a source's field name into a metric name: ``Active Power`` -> ``active_power``.

    A metric must start with a letter, so ``3phase`` raises :class:`IdentifierError`
    rather than being renamed behind the caller's back.
    """
    words = _words(text)
    if not words:
        raise IdentifierError(
            "empty_identifier",
            f"{text!r} has no letters or digits to build a snake_case name from",
            source=text,
        )
    name = "_".join(words)
    if not name[0].isalpha():
        raise IdentifierError(
            "leading_digit",
            f"a metric name must start with a letter; {text!r} gives {name!r}",
            source=text,
        )
    return name


# Patterns used only off the hot path go through re's own cache, compiled on first use,
# so that a process that only validates valid topics never pays for them.
_CAMEL = r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])"
_WORD = r"[A-Za-z0-9]+"


def _words(text: str) -> list[str]:
    import unicodedata

    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return [w.lower() for w in re.findall(_WORD, re.sub(_CAMEL, " ", ascii_text))]


def _suggest(fix: Callable[[str], str], text: str) -> str:
    """``, e.g. 'pv-roof'`` when ``fix`` can mend ``text``, else nothing."""
    try:
        suggestion = fix(text)
    except IdentifierError:
        return ""
    return f", e.g. {suggestion!r}"


def _closest(text: str, choices: tuple[str, ...]) -> str:
    """``, e.g. 'value'`` for a near miss such as ``Value`` or ``values``, else nothing."""
    import difflib

    found = difflib.get_close_matches(text.lower(), choices, n=1, cutoff=0.75)
    return f", e.g. {found[0]!r}" if found else ""


def _stream_error(stream: str, topic: str, span: tuple[int, int] | None = None) -> TopicError:
    hint = _closest(stream, STREAMS)
    return TopicError(
        "unknown_stream",
        f"stream {stream!r} must be one of {', '.join(STREAMS)}{hint}",
        topic=topic,
        segment="stream",
        span=span,
    )


def _diagnose(topic: str) -> TopicError:
    """Find the first rule a topic breaks; only called when the fast match failed."""
    if topic == "":
        return TopicError("empty", f"topic is empty; expected {_GRAMMAR}", topic=topic)
    if "\x00" in topic:
        return TopicError(
            "null_character", "topic must not contain the null character U+0000", topic=topic
        )
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return TopicError(
            "invalid_utf8", "topic contains a lone surrogate, which is not valid UTF-8", topic=topic
        )
    if size > MAX_TOPIC_BYTES:
        return TopicError(
            "too_long",
            f"topic is {size} bytes of UTF-8; MQTT allows at most {MAX_TOPIC_BYTES}",
            topic=topic,
        )
    if topic.startswith("$"):
        return TopicError(
            "reserved_prefix",
            "topics starting with '$' are reserved for the broker ($SYS, $share)",
            topic=topic,
        )

    levels = topic.split("/")
    spans: list[tuple[int, int]] = []
    start = 0
    for level in levels:
        spans.append((start, start + len(level)))
        start += len(level) + 1

    for index, level in enumerate(levels):
        wildcard = "+" if "+" in level else "#" if "#" in level else None
        if wildcard is not None:
            at_level = index < len(SEGMENTS) and len(levels) == len(SEGMENTS)
            return TopicError(
                "wildcard",
                f"{wildcard!r} is a wildcard; it may appear in a subscription filter, "
                "never in a topic name",
                topic=topic,
                segment=SEGMENTS[index] if at_level else None,
                span=spans[index],
            )

    if len(levels) != len(SEGMENTS):
        return TopicError(
            "level_count",
            f"topic has {len(levels)} level{'s' if len(levels) > 1 else ''}; "
            f"expected 6: {_GRAMMAR}",
            topic=topic,
        )

    site, domain, entity_type, entity_id, metric, stream = levels
    for index, level in enumerate(levels):
        if level == "":
            return TopicError(
                "empty_level",
                f"{SEGMENTS[index]} is empty; expected {_GRAMMAR}",
                topic=topic,
                segment=SEGMENTS[index],
                span=spans[index],
            )
    if re.fullmatch(_KEBAB, site) is None:
        return TopicError(
            "not_kebab_case",
            f"site {site!r} must be kebab-case (a-z, 0-9, single '-'){_suggest(to_kebab, site)}",
            topic=topic,
            segment="site",
            span=spans[0],
        )
    if domain != DOMAIN:
        hint = _closest(domain, (DOMAIN,))
        return TopicError(
            "wrong_domain",
            f"level 2 must be the literal 'energy', not {domain!r}{hint}",
            topic=topic,
            segment="domain",
            span=spans[1],
        )
    if entity_type not in ENTITY_TYPES:
        hint = _closest(entity_type, ENTITY_TYPES)
        return TopicError(
            "unknown_entity_type",
            f"entity_type {entity_type!r} must be one of {', '.join(ENTITY_TYPES)}{hint}",
            topic=topic,
            segment="entity_type",
            span=spans[2],
        )
    if re.fullmatch(_KEBAB, entity_id) is None:
        return TopicError(
            "not_kebab_case",
            f"entity_id {entity_id!r} must be kebab-case (a-z, 0-9, single '-')"
            f"{_suggest(to_kebab, entity_id)}",
            topic=topic,
            segment="entity_id",
            span=spans[3],
        )
    if re.fullmatch(_SNAKE, metric) is None:
        return TopicError(
            "not_snake_case",
            f"metric {metric!r} must be snake_case (a-z, 0-9, single '_', starting with a letter)"
            f"{_suggest(to_snake, metric)}",
            topic=topic,
            segment="metric",
            span=spans[4],
        )
    return _stream_error(stream, topic, spans[5])
