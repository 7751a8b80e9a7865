from __future__ import annotations

import pytest
from hypothesis import assume, given, strategies as st

from energybus import (
    CANONICAL_FILTERS,
    FilterError,
    TopicError,
    canonical_filter,
    matches,
    validate_filter,
)

# The MQTT 3.1.1 / 5.0 section 4.7 examples, and the cases client libraries test.
MATCHING = [
    ("foo/bar", "foo/bar"),
    ("foo/+", "foo/bar"),
    ("foo/+/baz", "foo/bar/baz"),
    ("foo/+/#", "foo/bar/baz"),
    ("A/B/+/#", "A/B/B/C"),
    ("#", "foo/bar/baz"),
    ("#", "/foo/bar"),
    ("/#", "/foo/bar"),
    ("$SYS/bar", "$SYS/bar"),
    ("$SYS/#", "$SYS/bar"),
    ("sport/tennis/player1/#", "sport/tennis/player1"),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking"),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon"),
    ("sport/#", "sport"),
    ("sport/tennis/+", "sport/tennis/player1"),
    ("sport/+", "sport/"),
    ("+/+", "/finance"),
    ("/+", "/finance"),
    ("+", "a"),
    ("+/+/+", "a//b"),
    ("a/+/b", "a//b"),
    ("foo/#", "foo/"),
    ("+/energy/+/+/+/value", "vad/energy/source/pv-roof-1/active_power/value"),
    ("vad/energy/#", "vad/energy/storage/battery-main/soc/last"),
]

NOT_MATCHING = [
    ("test/6/#", "test/3"),
    ("foo/bar", "foo"),
    ("foo/+", "foo/bar/baz"),
    ("foo/+/baz", "foo/bar/bar"),
    ("foo/+/#", "fo2/bar/baz"),
    ("/#", "foo/bar"),
    ("#", "$SYS/bar"),
    ("+/monitor/Clients", "$SYS/monitor/Clients"),
    ("+", "$SYS"),
    ("$BOB/bar", "$SYS/bar"),
    ("sport/tennis/+", "sport/tennis/player1/ranking"),
    ("sport/+", "sport"),
    ("+", "/finance"),
    ("foo/bar", "foo/bar/"),
    ("Foo/bar", "foo/bar"),
    ("+/energy/+/+/+/value", "vad/energy/source/pv-roof-1/active_power/last"),
    ("a/b", ""),
]


@pytest.mark.parametrize(("topic_filter", "topic"), MATCHING)
def test_matches(topic_filter: str, topic: str) -> None:
    assert matches(topic_filter, topic)


@pytest.mark.parametrize(("topic_filter", "topic"), NOT_MATCHING)
def test_does_not_match(topic_filter: str, topic: str) -> None:
    assert not matches(topic_filter, topic)


@pytest.mark.parametrize(
    "bad", ["", "foo/#/bar", "foo/bar#", "#/", "a/b+/c", "+a", "a/\x00", "sport+"]
)
def test_invalid_filters_are_errors(bad: str) -> None:
    error = validate_filter(bad)
    assert error is not None and error.filter == bad
    with pytest.raises(FilterError):
        matches(bad, "a/b")


def test_wildcards_in_a_topic_name_are_an_error() -> None:
    with pytest.raises(TopicError) as info:
        matches("#", "a/+/b")
    assert info.value.code == "wildcard"


def test_canonical_filters() -> None:
    assert CANONICAL_FILTERS["value"] == "+/energy/+/+/+/value"
    assert set(CANONICAL_FILTERS) == {"value", "last", "set", "meta", "availability"}
    assert canonical_filter("meta") == "+/energy/+/+/+/meta"
    assert canonical_filter("value", site="vad") == "vad/energy/+/+/+/value"
    assert (
        canonical_filter("last", site="vad", entity_type="storage", entity_id="battery-main")
        == "vad/energy/storage/battery-main/+/last"
    )
    assert canonical_filter(None, site="vad", metric="soc") == "vad/energy/+/+/soc/+"
    with pytest.raises(FilterError) as info:
        canonical_filter("value", site="VAD")
    assert info.value.code == "not_kebab_case"
    with pytest.raises(FilterError) as info:
        canonical_filter("value", entity_type="house")
    assert info.value.code == "unknown_entity_type"


def test_canonical_validation_of_free_filters() -> None:
    assert validate_filter("vad/energy/#", canonical=True) is None
    assert validate_filter("#", canonical=True) is None
    assert validate_filter("+/energy/+/+/+/value/#", canonical=True) is None
    error = validate_filter("vad/energy/+/+", canonical=True)
    assert error is not None and error.code == "level_count"
    error = validate_filter("vad/energy/+/+/+/+/+", canonical=True)
    assert error is not None and error.code == "level_count"
    error = validate_filter("vad/home/#", canonical=True)
    assert error is not None and error.code == "wrong_domain"
    # Valid MQTT, though no energy bus topic can match it.
    assert validate_filter("vad/home/#") is None


level = st.sampled_from(["a", "b", "", "$x", "energy"])


@given(st.lists(level, min_size=1, max_size=5), st.data())
def test_matches_agrees_with_a_direct_reading_of_the_spec(
    topic_levels: list[str], data: st.DataObject
) -> None:
    topic = "/".join(topic_levels)
    filter_levels = [data.draw(st.sampled_from([lvl, "+", "a", ""])) for lvl in topic_levels]
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(filter_levels)))
        filter_levels = [*filter_levels[:cut], "#"]
    topic_filter = "/".join(filter_levels)
    assume(topic_filter != "")  # an empty filter is invalid, tested above
    expected = _reference(filter_levels, topic_levels)
    if topic == "":
        expected = False
    assert matches(topic_filter, topic) is expected


def _reference(filter_levels: list[str], topic_levels: list[str]) -> bool:
    if topic_levels[0].startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    if filter_levels[-1] == "#":
        head = filter_levels[:-1]
        return len(topic_levels) >= len(head) and all(
            f in ("+", t) for f, t in zip(head, topic_levels, strict=False)
        )
    return len(filter_levels) == len(topic_levels) and all(
        f in ("+", t) for f, t in zip(filter_levels, topic_levels, strict=True)
    )
