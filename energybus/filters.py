"""Subscription filters: building the canonical ones, validating any, and matching.

:func:`matches` follows MQTT 3.1.1 section 4.7 and MQTT 5 section 4.7 to the letter,
including the corners most hand-written matchers get wrong: ``sport/#`` matches
``sport``; ``+`` matches an empty level; a filter starting with a wildcard never
matches a topic starting with ``$``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

from energybus.errors import FilterError, TopicError
from energybus.topics import (
    DOMAIN,
    ENTITY_TYPES,
    MAX_TOPIC_BYTES,
    SEGMENTS,
    STREAMS,
    Stream,
    validate_topic,
)

__all__ = [
    "CANONICAL_FILTERS",
    "canonical_filter",
    "matches",
    "validate_filter",
]


def canonical_filter(
    stream: Stream | None = "value",
    *,
    site: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    metric: str | None = None,
) -> str:
    """The narrowest filter for the levels given; an omitted level becomes ``+``.

    ``canonical_filter("value")`` is ``+/energy/+/+/+/value``, the contract's routing
    subscription; ``canonical_filter(None, site="vad")`` takes every stream of a site.
    Every given level is checked against the bus grammar, so a typo fails here rather
    than as a subscription that silently never matches.
    """
    levels = [site, DOMAIN, entity_type, entity_id, metric, stream]
    topic_filter = "/".join("+" if level is None else level for level in levels)
    error = validate_filter(topic_filter, canonical=True)
    if error is not None:
        raise error
    return topic_filter


CANONICAL_FILTERS: Final[dict[Stream, str]] = {
    stream: f"+/{DOMAIN}/+/+/+/{stream}" for stream in STREAMS
}
"""One routing filter per stream, as the contract suggests for Node-RED."""


def validate_filter(topic_filter: str, *, canonical: bool = False) -> FilterError | None:
    """The first rule ``topic_filter`` breaks, or ``None``.

    With ``canonical=True`` the filter must also be able to match energy bus topics:
    at most six levels, and every level that is not a wildcard valid for its position.
    """
    if not isinstance(topic_filter, str):
        return FilterError(
            "not_text",
            f"filter must be text, not {type(topic_filter).__name__}",
            filter=repr(topic_filter),
        )
    levels = _split_filter(topic_filter)
    if isinstance(levels, FilterError):
        return levels
    if not canonical:
        return None
    # '#' also matches its parent level, so 'a/b/c/d/e/f/#' can still match six levels.
    fixed = levels[:-1] if levels[-1] == "#" else levels
    if len(fixed) > len(SEGMENTS) or (len(levels) < len(SEGMENTS) and levels[-1] != "#"):
        return FilterError(
            "level_count",
            f"filter has {len(levels)} levels and cannot match a 6-level energy bus topic",
            filter=topic_filter,
        )
    # Put each literal level into a topic that is valid elsewhere and let the topic
    # validator judge it, so the grammar lives in one place.
    probe = ["vad", DOMAIN, ENTITY_TYPES[0], "probe", "probe", STREAMS[0]]
    for index, level in enumerate(fixed):
        if level in ("+", "#"):
            continue
        trial = probe.copy()
        trial[index] = level
        error = validate_topic("/".join(trial))
        if error is not None:
            return FilterError(error.code, error.message, filter=topic_filter)
    return None


def matches(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` matches ``topic_filter`` under MQTT's rules.

    Raises :class:`FilterError` for an invalid filter and :class:`TopicError` for a
    topic name with wildcards in it (neither can take part in a match), like
    Mosquitto's ``mosquitto_topic_matches_sub``.
    """
    levels = _compiled(topic_filter)
    if levels is None:
        error = _split_filter(topic_filter)
        assert isinstance(error, FilterError)
        raise error
    if "+" in topic or "#" in topic:
        raise TopicError(
            "wildcard", "a topic name must not contain the wildcards '+' or '#'", topic=topic
        )
    if topic == "":
        return False
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False
    topic_levels = topic.split("/")
    for index, level in enumerate(levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(topic_levels) == len(levels)


@lru_cache(maxsize=4096)
def _compiled(topic_filter: str) -> tuple[str, ...] | None:
    """Filters repeat (a worker holds a handful), so each is split and checked once.

    Errors are not cached: an exception instance raised twice grows its traceback.
    """
    levels = _split_filter(topic_filter)
    return None if isinstance(levels, FilterError) else levels


def _split_filter(topic_filter: str) -> tuple[str, ...] | FilterError:
    if topic_filter == "":
        return FilterError("empty", "filter is empty", filter=topic_filter)
    if "\x00" in topic_filter:
        return FilterError("null_character", "filter must not contain U+0000", filter=topic_filter)
    try:
        size = len(topic_filter.encode("utf-8"))
    except UnicodeEncodeError:
        return FilterError("invalid_utf8", "filter contains a lone surrogate", filter=topic_filter)
    if size > MAX_TOPIC_BYTES:
        return FilterError(
            "too_long",
            f"filter is {size} bytes of UTF-8; MQTT allows at most {MAX_TOPIC_BYTES}",
            filter=topic_filter,
        )
    levels = tuple(topic_filter.split("/"))
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return FilterError(
                "misplaced_wildcard",
                f"'#' must be a whole level and the last one (level {index + 1}: {level!r})",
                filter=topic_filter,
            )
        if "+" in level and level != "+":
            return FilterError(
                "misplaced_wildcard",
                f"'+' must be a whole level (level {index + 1}: {level!r})",
                filter=topic_filter,
            )
    return levels
