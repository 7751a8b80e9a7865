"""The input limits without services: payload size and JSON depth per source, and the
bound on series per site (docs/worker.md, "Input limits")."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from benchmarks.adapters import ven_messages
from energybus.adapters import Pipeline, Rejection, create_adapter
from energybus.adapters.ven import VenEntry, VenOptions
from energybus.errors import LimitError, PayloadError
from energybus.payloads import decode_meta, decode_set, decode_value, deeper_than, over_limit
from energybus.render import DEFAULT_SPEC, Renderer
from energybus.samples import Reading
from energybus.worker.acks import AckQueue
from energybus.worker.availability import Availability
from energybus.worker.config import load_config
from energybus.worker.deadletter import dead_letter
from energybus.worker.dispatch import Dispatcher
from energybus.worker.metrics import Metrics
from energybus.worker.series import SeriesBound
from energybus.worker.sources import Delivery
from tests.test_cli import run
from tests.test_dispatch import FakeBus, FakeSink, _count

AT = datetime(2024, 10, 23, 16, 13, 21, tzinfo=UTC)


def _reference_depth(payload: bytes) -> int:
    """The nesting a JSON tokenizer meets, byte by byte: the slow, obvious definition
    ``deeper_than`` must agree with."""
    depth = deepest = 0
    inside = False
    index = 0
    while index < len(payload):
        char = payload[index : index + 1]
        if inside:
            if char == b"\\":
                index += 2
                continue
            inside = char != b'"'
        elif char == b'"':
            inside = True
        elif char in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in b"]}":
            depth -= 1
        index += 1
    return deepest


# Nesting ------------------------------------------------------------------------------

_soup = st.lists(
    st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b",", b":", b"1"]), max_size=60
).map(b"".join)


@settings(max_examples=3000)
@given(_soup, st.integers(0, 8))
def test_depth_agrees_with_a_tokenizer_on_any_bytes(payload: bytes, limit: int) -> None:
    """Truncated, unbalanced, quotes and escapes anywhere: the fast paths (two counts,
    strings cut out by quote parity) must give what a tokenizer gives."""
    assert deeper_than(payload, limit) == (_reference_depth(payload) > limit)


_json = st.recursive(
    st.one_of(st.integers(), st.text(alphabet='[]{}"\\ab'), st.booleans()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=30,
)


def _nesting(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_nesting, value.values()), default=0)
    return 0


@settings(max_examples=1000)
@given(_json, st.integers(0, 6))
def test_depth_of_documents_with_brackets_in_their_strings(value: Any, limit: int) -> None:
    for encoded in (msgspec.json.encode(value), json.dumps(value).encode()):  # escapes too
        assert deeper_than(encoded, limit) == (_nesting(value) > limit), encoded


def test_a_document_cut_short_counts_the_levels_it_opened() -> None:
    assert deeper_than(b"[" * 33, 32)
    assert not deeper_than(b"[" * 32, 32)
    assert not deeper_than(b'{"a": "' + b"[" * 100, 32)  # inside a string never closed
    assert deeper_than(b'{"a": "\\"", "b": ' + b"[" * 40, 32)  # an escaped quote


def test_over_limit_names_the_setting_and_never_the_content() -> None:
    error = over_limit(b'{"secret": "' + b"s" * 1988 + b'"}', 1024, 32, prefix="adapters.ven.")
    assert isinstance(error, LimitError)
    assert error.code == "too_large" and error.setting == "adapters.ven.max_payload_bytes"
    assert error.message == (
        "the message is 2,002 bytes; at most 1,024 are taken (adapters.ven.max_payload_bytes)"
    )
    deep = over_limit(b"[" * 40 + b"]" * 40, 1024, 32)
    assert deep is not None and (deep.code, deep.setting) == ("too_deep", "max_depth")
    assert over_limit(b"[" * 40, 1024) is None  # no depth asked: not JSON


@pytest.mark.parametrize("decode", [decode_value, decode_set, decode_meta])
def test_canonical_decoders_refuse_deep_nesting_at_its_first_bracket(decode: Any) -> None:
    """Why the bus ingest and sets need no depth limit: their schemas are typed and
    closed, so nesting is refused where it starts, never followed (no RecursionError
    and no ``too_deep``), however deep."""
    deep = b"[" * 200_000 + b"]" * 200_000
    for payload in (deep, b'{"value": 1, "unit": ' + deep + b"}", b'{"x": ' + deep + b"}"):
        with pytest.raises(PayloadError) as raised:
            decode(payload)
        assert raised.value.code in {"wrong_type", "unknown_field"}


# The pipeline ---------------------------------------------------------------------------


def _metering(**fields: Any) -> dict[str, Any]:
    return {"venId": "ven-1", "timestamp": 1729700000, "usedPowerKw": 1.0, **fields}


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_a_ven_message_past_either_limit_is_refused_before_it_is_decoded() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    big = msgspec.json.encode(_metering(note="n" * 300_000))
    out = pipeline.feed("volttron/metering", big, received_at=AT)
    assert [r.code for r in out.rejections] == ["too_large"]
    assert "adapters.ven.max_payload_bytes" in out.rejections[0].message
    # The root object is one level: 31 more make 32, the default limit.
    fits = msgspec.json.encode(_metering(extensions=_nested(31)))
    deep = msgspec.json.encode(_metering(extensions=_nested(32)))
    assert not pipeline.feed("volttron/metering", fits, received_at=AT).rejections
    out = pipeline.feed("volttron/metering", deep, received_at=AT)
    assert [r.code for r in out.rejections] == ["too_deep"] and not out.readings
    assert pipeline.rejected == {"too_large": 1, "too_deep": 1}


def test_many_objects_and_brackets_in_names_are_not_depth() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    wide = ven_messages(1, circuits=60)[0]  # 123 objects and arrays, 3 levels
    assert wide.count(b"{") + wide.count(b"[") > 32
    assert not pipeline.feed("volttron/metering", wide, received_at=AT).rejections
    named = msgspec.json.encode(
        _metering(circuits=[{"id": "c1", "name": "[" * 100, "currentKw": 1.0}])
    )
    assert not pipeline.feed("volttron/metering", named, received_at=AT).rejections


def test_limits_come_from_the_adapter_options() -> None:
    options = VenOptions(max_payload_bytes=200, max_depth=2)
    pipeline = Pipeline(create_adapter("ven", options=options))
    long = msgspec.json.encode(_metering(note="n" * 200))
    deep = msgspec.json.encode(_metering(extensions=[[1]]))
    assert [
        r.code for r in pipeline.feed("volttron/metering", long, received_at=AT).rejections
    ] == ["too_large"]
    assert [
        r.code for r in pipeline.feed("volttron/metering", deep, received_at=AT).rejections
    ] == ["too_deep"]


def test_limits_are_options_of_every_adapter_in_a_site_file(tmp_path: Any) -> None:
    config = tmp_path / "site.toml"
    config.write_text("[adapters.ven]\nmax_payload_bytes = 4096\nmax_depth = 8\n")
    built = load_config(config).built["ven"]
    assert (built.options.max_payload_bytes, built.options.max_depth) == (4096, 8)
    config.write_text("[adapters.cpi]\nmax_depth = 0\n")
    with pytest.raises(Exception, match="max_depth"):
        load_config(config)


def test_modbus_deliveries_are_binary_and_not_counted_as_brackets() -> None:
    pipeline = Pipeline(create_adapter("modbus"))
    assert pipeline.max_depth is None
    out = pipeline.feed("meter", b"[" * 100, received_at=AT)
    assert [r.code for r in out.rejections] == ["unrouted"]  # the device's, not too_deep


def test_an_oversized_set_is_refused_on_the_record_without_being_decoded() -> None:
    pipeline = Pipeline(create_adapter("ven"))
    topic = "ven-1/energy/load/ven-1/shed_power/set"
    payload = b'{"value": 3000, "event_id": "' + b"e" * 300_000 + b'"}'
    out = pipeline.feed(topic, payload, received_at=AT)
    assert [r.code for r in out.rejections] == ["too_large"]
    (record,) = out.commands
    assert (record.state, record.code, record.value) == ("refused", "too_large", None)


def test_an_oversized_message_goes_to_the_member_its_topic_hashes_to() -> None:
    """A partitioned group asks the site first; one too large is not decoded for it, so
    exactly one member refuses it."""
    pipeline = Pipeline(create_adapter("ven"))
    big = msgspec.json.encode(_metering(note="n" * 300_000))
    assert pipeline.site_of("volttron/metering", big) == "volttron/metering"
    small = msgspec.json.encode(_metering())
    assert pipeline.site_of("volttron/metering", small) == "ven-1"


# Dead letters -----------------------------------------------------------------------------


def _letter(code: str, payload: bytes) -> dict[str, Any]:
    letter = dead_letter(
        [Rejection(code=code, message="m", topic="t")],
        source="ven",
        topic="t",
        payload=payload,
        received_at=AT,
        worker="w",
    )
    decoded: dict[str, Any] = json.loads(letter)
    return decoded


def test_a_too_large_dead_letter_has_the_size_and_not_the_body() -> None:
    letter = _letter("too_large", b"x" * 300_000)
    assert letter["size"] == 300_000
    assert "payload" not in letter and "payload_base64" not in letter
    assert _letter("too_large", b"\xff" * 10).keys() == letter.keys()
    other = _letter("malformed_json", b"{x")
    assert (other["size"], other["payload"]) == (2, "{x")


# The bound on series ----------------------------------------------------------------------


def _reading(site: str, entity: str, *metrics: str) -> Reading:
    return Reading(site, "load", entity, AT, "good", [(m, 1.0, "W", DEFAULT_SPEC) for m in metrics])


def test_series_past_the_bound_are_refused_and_the_others_go_on() -> None:
    bound = SeriesBound(max_series_per_site=3, max_series=100)
    renderer = Renderer(admit=bound.admit)
    out: list[Any] = []
    assert renderer.render_reading(_reading("s", "a", "active_power", "voltage"), out) is None
    refused = renderer.render_reading(_reading("s", "b", "active_power", "voltage"), out)
    assert refused is not None and [(i, e.code) for i, e in refused] == [(1, "too_many_series")]
    assert "site 's' has 3 series already (worker.max_series_per_site)" in refused[0][1].message
    # Known series keep flowing, another site has a bound of its own.
    assert renderer.render_reading(_reading("s", "a", "active_power", "voltage"), out) is None
    assert renderer.render_reading(_reading("t", "a", "active_power"), out) is None
    assert bound.series == 4 and bound.sites == 2
    topics = {m.topic for m in out}
    assert "s/energy/load/b/active_power/value" in topics
    assert "s/energy/load/b/voltage/value" not in topics


def test_a_series_whose_topic_cannot_exist_takes_no_place_in_the_bound() -> None:
    bound = SeriesBound(max_series_per_site=1, max_series=100)
    renderer = Renderer(admit=bound.admit)
    refused = renderer.render_reading(_reading("s", "Not-Kebab", "active_power"), [])
    assert refused is not None and refused[0][1].code == "not_kebab_case"
    assert bound.series == 0
    assert renderer.render_reading(_reading("s", "ok", "active_power"), []) is None


def test_the_bound_in_all_holds_however_many_sites_are_invented() -> None:
    bound = SeriesBound(max_series_per_site=10, max_series=3)
    for site in ("a", "b", "c"):
        bound.admit_row(site, "load.x", "active_power")
    with pytest.raises(LimitError) as raised:
        bound.admit_row("d", "load.x", "active_power")
    assert (raised.value.code, raised.value.setting) == ("too_many_series", "worker.max_series")
    with pytest.raises(LimitError):
        bound.admit_row("a", "load.y", "active_power")
    bound.admit_row("a", "load.x", "active_power")  # known series go on
    assert (bound.series, bound.sites) == (3, 3)


def _worker(
    bound: SeriesBound,
    ingest_bytes: int | None = None,
    ingest: SeriesBound | None = None,
) -> tuple[Dispatcher, FakeBus, FakeSink, Metrics]:
    metrics = Metrics()
    metrics.series_bound(bound, ingest)
    sink = FakeSink()
    ven = Pipeline(create_adapter("ven"), renderer=Renderer(source="ven", admit=bound.admit))
    dispatcher = Dispatcher(
        pipelines={"ven": ven},
        sink=sink,
        metrics=metrics,
        availability=Availability(timeout_s=60),
        dead_letter_prefix="energybus/dead_letter",
        worker_id="w1",
        series=bound,
        ingest_series=ingest,
        max_ingest_bytes=ingest_bytes,
    )
    dispatcher.route("mqtt", [*ven.sources[0].patterns, *ven.command_filters], ven)
    bus = FakeBus()
    dispatcher.attach(bus)
    return dispatcher, bus, sink, metrics


def test_a_flood_of_entity_ids_is_bounded_in_the_worker() -> None:
    """Each message names new circuits: past the bound their values are refused, in one
    dead letter per message that lists them all, counted one by one, and nothing of
    them reaches the historian or availability; the message's known series go on."""
    bound = SeriesBound(max_series_per_site=5, max_series=100)
    dispatcher, bus, sink, metrics = _worker(bound)
    acks = AckQueue(lambda mid: None)
    for n in range(4):
        circuits = [{"id": f"c{n}-{i}", "currentKw": 1.0} for i in range(2)]
        body = msgspec.json.encode(_metering(timestamp=1729700000 + n, circuits=circuits))
        dispatcher.handle(Delivery("mqtt", "volttron/metering", body, AT, acks.add(n)))
    # ven-1's active_power and the circuits of the first two messages are 5 series.
    assert bound.series == 5
    stored = {(r.device_id, r.metric_name) for r in sink.rows}
    assert ("load.ven-1", "active_power") in stored and len(stored) == 5
    assert sum(1 for r in sink.rows if r.device_id == "load.ven-1") == 4  # every message
    letters = [json.loads(p) for t, p, _, _ in bus.published if "dead_letter" in t]
    assert [x["reason"] for x in letters] == ["too_many_series"] * 2
    assert all(len(x["refusals"]) == 2 for x in letters)  # both new circuits, one letter
    assert (
        _count(metrics, "energybus_rejections_total", source="ven", reason="too_many_series") == 4
    )
    assert metrics.registry.get_sample_value("energybus_series") == 5
    assert len(dispatcher.availability) == 5  # the admitted entities only


def test_the_bus_ingest_is_held_to_its_size_and_the_same_bound() -> None:
    bound = SeriesBound(max_series_per_site=2, max_series=100)
    dispatcher, bus, sink, metrics = _worker(bound, ingest_bytes=64)
    acks = AckQueue(lambda mid: None)
    dispatcher.ingest("s/energy/load/x/active_power/value", b" " * 61 + b"1500", acks.add(1))
    for n, entity in enumerate(["a", "b", "c", "a"]):
        dispatcher.ingest(f"s/energy/load/{entity}/active_power/value", b"1", acks.add(2 + n))
    letters = [json.loads(p) for _, p, _, _ in bus.published]
    assert [(x["source"], x["reason"]) for x in letters] == [
        ("bus", "too_large"),
        ("bus", "too_many_series"),
    ]
    assert letters[0]["size"] == 65 and "payload" not in letters[0]
    assert "worker.max_payload_bytes" in letters[0]["message"]
    assert [r.device_id for r in sink.rows] == ["load.a", "load.b", "load.a"]
    assert _count(metrics, "energybus_rejections_total", source="bus", reason="too_large") == 1


def test_a_flood_on_the_bus_ingest_leaves_the_sources_their_room() -> None:
    """Any publisher on the bus can invent series: the ingest's budget is its own, so
    once it is full the sources' new series are still taken."""
    bound = SeriesBound(max_series_per_site=100, max_series=3)
    ingest = SeriesBound(max_series_per_site=100, max_series=3)
    dispatcher, _bus, sink, metrics = _worker(bound, ingest=ingest)
    acks = AckQueue(lambda mid: None)
    for n in range(5):
        dispatcher.ingest(f"invented-{n}/energy/load/x/active_power/value", b"1", acks.add(n))
    assert ingest.series == 3 and bound.series == 0
    body = msgspec.json.encode(_metering())
    dispatcher.handle(Delivery("mqtt", "volttron/metering", body, AT, acks.add(9)))
    assert bound.series == 1
    assert ("load.ven-1", "active_power") in {(r.device_id, r.metric_name) for r in sink.rows}
    assert metrics.registry.get_sample_value("energybus_ingest_series") == 3
    assert (
        _count(metrics, "energybus_rejections_total", source="bus", reason="too_many_series") == 2
    )


def test_worker_limits_are_configured_and_checked(tmp_path: Any) -> None:
    config = tmp_path / "site.toml"
    config.write_text("[adapters.ven]\n")
    worker = load_config(config).worker
    assert (worker.max_payload_bytes, worker.max_series_per_site, worker.max_series) == (
        16_384,
        10_000,
        100_000,
    )
    config.write_text("[worker]\nmax_series_per_site = 0\n[adapters.ven]\n")
    with pytest.raises(Exception, match="max_series_per_site"):
        load_config(config)


# The CLI ------------------------------------------------------------------------------------


def test_normalize_refuses_an_oversized_input_in_one_line() -> None:
    payload = json.dumps(_metering(note="n" * 300_000))
    result = run("normalize", "--adapter", "ven", "--topic", "volttron/metering", stdin=payload)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: too_large: the message is {len(payload):,} bytes; at most 262,144 are taken"
        " (adapters.ven.max_payload_bytes)\n"
    )


def test_normalize_stream_refuses_a_line_too_deep_to_read_and_goes_on() -> None:
    deep = '{"topic": "volttron/metering", "payload": ' + "[" * 5000 + "]" * 5000 + "}"
    fine = json.dumps({"topic": "volttron/metering", "payload": _metering()})
    result = run("normalize", "--adapter", "ven", "--stream", stdin=f"{deep}\n{fine}\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "error: line 1: too_deep: JSON nested too deeply to decode\n"
    assert "Traceback" not in result.stderr
    assert "ven-1/energy/load/ven-1/active_power/value" in result.stdout


def test_invented_ven_ids_past_the_bound_are_refused_and_the_known_go_on() -> None:
    """A VEN not listed is taken (``accept_unlisted``), but only so many: a flood of
    invented venIds would otherwise grow the adapter's records without end."""
    options = VenOptions(site="s", max_unlisted=2, vens={"listed": VenEntry()})
    pipeline = Pipeline(create_adapter("ven", options=options))

    def codes(ven: str) -> list[str]:
        body = msgspec.json.encode(_metering(venId=ven))
        return [r.code for r in pipeline.feed("volttron/metering", body, received_at=AT).rejections]

    assert codes("a") == [] and codes("b") == []
    refused = pipeline.feed(
        "volttron/metering", msgspec.json.encode(_metering(venId="c")), received_at=AT
    ).rejections
    assert [r.code for r in refused] == ["too_many_series"]
    assert "adapters.ven.max_unlisted" in refused[0].message
    assert codes("a") == [] and codes("listed") == [] and codes("d") == ["too_many_series"]
