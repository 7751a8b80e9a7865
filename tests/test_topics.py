from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from energybus import (
    ENTITY_TYPES,
    STREAMS,
    IdentifierError,
    Topic,
    TopicError,
    build_topic,
    is_valid_topic,
    parse_topic,
    to_kebab,
    to_snake,
    validate_topic,
)

VALID = [
    "vad/energy/source/pv-roof-1/active_power/value",
    "vad/energy/storage/battery-main/soc/value",
    "vad/energy/grid/main-meter/import_power/value",
    "vad/energy/load/living-room-entertainment/active_power/value",
    "vad/energy/transfer/pv-to-battery/power/value",
    "site-2/energy/grid/m1/import_energy_total/last",
    "0/energy/load/0/a/meta",
    "vad/energy/load/x/a1_b2/availability",
    "vad/energy/load/x/shed_power/set",
]


@pytest.mark.parametrize("topic", VALID)
def test_valid_topics_parse_and_round_trip(topic: str) -> None:
    parsed = parse_topic(topic)
    assert str(parsed) == topic
    assert parse_topic(topic.encode()) == parsed
    assert validate_topic(topic) is None
    assert validate_topic(topic.encode()) is None
    assert is_valid_topic(topic)
    assert build_topic(*topic.split("/")[:1], *topic.split("/")[2:]) == topic


def test_parse_gives_levels_and_device_id() -> None:
    topic = parse_topic("vad/energy/storage/battery-main/soc/value")
    assert topic == Topic("vad", "storage", "battery-main", "soc", "value")
    assert topic.device_id == "storage.battery-main"
    assert str(topic.with_stream("last")) == "vad/energy/storage/battery-main/soc/last"
    with pytest.raises(TopicError) as info:
        topic.with_stream("state")  # type: ignore[arg-type]
    assert info.value.code == "unknown_stream"


# (topic, code, segment, offending text or None)
INVALID = [
    ("", "empty", None, None),
    ("vad/energy/load/x\x00/p/value", "null_character", None, None),
    ("$SYS/energy/load/x/p/value", "reserved_prefix", None, None),
    ("vad/energy/load/+/p/value", "wildcard", "entity_id", "+"),
    ("vad/energy/load/x/p/#", "wildcard", "stream", "#"),
    ("vad/energy/load/x/#", "wildcard", None, "#"),
    ("vad/energy/load/x/value", "level_count", None, None),
    ("vad/energy/load/x/p/value/", "level_count", None, None),
    ("/vad/energy/load/x/p/value", "level_count", None, None),
    ("vad/energy/load//p/value", "empty_level", "entity_id", ""),
    ("/energy/load/x/p/value", "empty_level", "site", ""),
    ("Vad/energy/load/x/p/value", "not_kebab_case", "site", "Vad"),
    ("vad/home/load/x/p/value", "wrong_domain", "domain", "home"),
    ("vad/ENERGY/load/x/p/value", "wrong_domain", "domain", "ENERGY"),
    ("vad/energy/consumer/x/p/value", "unknown_entity_type", "entity_type", "consumer"),
    ("vad/energy/Load/x/p/value", "unknown_entity_type", "entity_type", "Load"),
    ("vad/energy/load/PV_Roof/p/value", "not_kebab_case", "entity_id", "PV_Roof"),
    ("vad/energy/load/pv--roof/p/value", "not_kebab_case", "entity_id", "pv--roof"),
    ("vad/energy/load/-pv/p/value", "not_kebab_case", "entity_id", "-pv"),
    ("vad/energy/load/pv roof/p/value", "not_kebab_case", "entity_id", "pv roof"),
    ("vad/energy/load/x/activePower/value", "not_snake_case", "metric", "activePower"),
    ("vad/energy/load/x/1phase/value", "not_snake_case", "metric", "1phase"),
    ("vad/energy/load/x/a__b/value", "not_snake_case", "metric", "a__b"),
    ("vad/energy/load/x/a_/value", "not_snake_case", "metric", "a_"),
    ("vad/energy/load/x/p/state", "unknown_stream", "stream", "state"),
    ("vad/energy/load/x/p/Value", "unknown_stream", "stream", "Value"),
    ("vad/energy/load/café/p/value", "not_kebab_case", "entity_id", "café"),
]


@pytest.mark.parametrize(("topic", "code", "segment", "text"), INVALID)
def test_invalid_topics_name_code_segment_and_span(
    topic: str, code: str, segment: str | None, text: str | None
) -> None:
    error = validate_topic(topic)
    assert error is not None
    assert (error.code, error.segment) == (code, segment)
    assert error.topic == topic
    if text is not None:
        assert error.span is not None
        assert topic[error.span[0] : error.span[1]] == text
    with pytest.raises(TopicError) as info:
        parse_topic(topic)
    assert info.value.code == code
    assert not is_valid_topic(topic)


def test_messages_say_what_was_expected_and_how_to_fix() -> None:
    error = validate_topic("vad/energy/source/PV_Roof/active_power/value")
    assert error is not None
    assert error.message == (
        "entity_id 'PV_Roof' must be kebab-case (a-z, 0-9, single '-'), e.g. 'pv-roof'"
    )
    error = validate_topic("vad/energy/load/x/Active Power/value")
    assert error is not None and "e.g. 'active_power'" in error.message
    error = validate_topic("vad/energy/Load/x/p/value")
    assert error is not None and "e.g. 'load'" in error.message
    assert "source, storage, grid, load, transfer" in error.message
    error = validate_topic("vad/energy/load/x/p")
    assert error is not None and "<site>/energy/<entity_type>" in error.message
    error = validate_topic("vad/energy/load/x/p/values")
    assert error is not None and error.message.endswith("e.g. 'value'")
    error = validate_topic("vad/energy/sorce/x/p/value")
    assert error is not None and error.message.endswith("e.g. 'source'")
    error = validate_topic("vad/home/load/x/p/value")
    assert error is not None and "e.g." not in error.message


def test_mqtt_byte_rules() -> None:
    too_long = "a" * 65536
    error = validate_topic(too_long)
    assert error is not None and error.code == "too_long"
    # 65535 bytes of UTF-8 is the limit, counted in bytes, not characters.
    multibyte = "é" * 32768  # 65536 bytes
    error = validate_topic(multibyte)
    assert error is not None and error.code == "too_long"
    error = validate_topic(b"vad/energy/load/\xff/p/value")
    assert error is not None and error.code == "invalid_utf8"
    with pytest.raises(TopicError) as info:
        parse_topic(b"vad/energy/load/\xff/p/value")
    assert info.value.message == "topic is not valid UTF-8 (byte 16 is 0xff)"
    error = validate_topic("vad/energy/load/\ud800/p/value")
    assert error is not None and error.code == "invalid_utf8"
    error = validate_topic(42)  # type: ignore[arg-type]
    assert error is not None and error.code == "not_text"


def test_build_topic_checks_each_level() -> None:
    assert build_topic("vad", "grid", "main-meter", "import_power") == (
        "vad/energy/grid/main-meter/import_power/value"
    )
    with pytest.raises(TopicError) as info:
        build_topic("vad", "grid", "main/meter", "import_power")
    assert (info.value.code, info.value.segment) == ("slash_in_level", "entity_id")
    with pytest.raises(TopicError) as info:
        build_topic("vad", "grid", "Main Meter", "import_power")
    assert (info.value.code, info.value.segment) == ("not_kebab_case", "entity_id")
    with pytest.raises(TopicError) as info:
        build_topic("vad", "grid", "m", "p", "event")
    assert info.value.code == "unknown_stream"


@pytest.mark.parametrize(
    ("source", "kebab", "snake"),
    [
        ("circuit_1", "circuit-1", "circuit_1"),
        ("Garage EV", "garage-ev", "garage_ev"),
        ("VEN_7", "ven-7", "ven_7"),
        ("PV_Roof", "pv-roof", "pv_roof"),
        ("batterySOC", "battery-soc", "battery_soc"),
        ("usedPowerKw", "used-power-kw", "used_power_kw"),
        ("HTTPServer", "http-server", "http_server"),
        ("  Küche -- 2 ", "kuche-2", "kuche_2"),
        ("ven-042", "ven-042", "ven_042"),
        ("L1 Voltage", "l1-voltage", "l1_voltage"),
    ],
)
def test_identifier_helpers(source: str, kebab: str, snake: str) -> None:
    assert to_kebab(source) == kebab
    assert to_snake(source) == snake


def test_identifier_helpers_refuse_what_they_cannot_mend() -> None:
    with pytest.raises(IdentifierError) as info:
        to_kebab("  --  ")
    assert info.value.code == "empty_identifier"
    with pytest.raises(IdentifierError) as info:
        to_snake("3 phase")
    assert info.value.code == "leading_digit"


kebab = st.from_regex(r"[a-z0-9]{1,6}(-[a-z0-9]{1,6}){0,3}", fullmatch=True)
snake = st.from_regex(r"[a-z][a-z0-9]{0,6}(_[a-z0-9]{1,6}){0,3}", fullmatch=True)


@given(kebab, st.sampled_from(ENTITY_TYPES), kebab, snake, st.sampled_from(STREAMS))
def test_build_parse_round_trip(
    site: str, entity_type: str, entity_id: str, metric: str, stream: str
) -> None:
    topic = build_topic(site, entity_type, entity_id, metric, stream)
    parsed = parse_topic(topic)
    assert (parsed.site, parsed.entity_type, parsed.entity_id, parsed.metric, parsed.stream) == (
        site,
        entity_type,
        entity_id,
        metric,
        stream,
    )
    assert str(parsed) == topic


@given(st.text())
def test_validator_never_raises_on_text(text: str) -> None:
    error = validate_topic(text)
    assert (error is None) == is_valid_topic(text)
    if error is not None:
        assert error.code and error.message


@given(st.one_of(st.binary(), st.text().map(str.encode)))
def test_parse_and_validate_agree_on_bytes(data: bytes) -> None:
    error = validate_topic(data)
    if error is None:
        assert str(parse_topic(data)).encode() == data
    else:
        with pytest.raises(TopicError) as info:
            parse_topic(data)
        assert info.value.code == error.code


@given(st.text(min_size=1))
def test_kebab_helper_output_is_always_a_valid_id(text: str) -> None:
    try:
        result = to_kebab(text)
    except IdentifierError:
        return
    assert validate_topic(f"vad/energy/load/{result}/p/value") is None
