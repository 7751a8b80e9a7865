"""The dispatcher with a fake bus and a fake historian: routing, dead letters,
acknowledgement order, availability and commands, without a broker or a database."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from energybus.adapters import (
    Adapter,
    Formatted,
    Normalized,
    Pipeline,
    Plan,
    SourceDeclaration,
    create_adapter,
)
from energybus.adapters.mapping import Compiler, Document, MappingDocument
from energybus.admission import Admitted
from energybus.commands import CommandRecord
from energybus.errors import CommandError
from energybus.filters import canonical_filter
from energybus.rows import Row, reading_rows
from energybus.samples import Reading
from energybus.topics import Topic
from energybus.worker.acks import AckQueue, Entry
from energybus.worker.availability import Availability
from energybus.worker.dispatch import Dispatcher
from energybus.worker.metrics import Metrics
from energybus.worker.sources import Delivery, MemorySource

AT = datetime(2024, 10, 23, 16, 13, 21, tzinfo=UTC)
METERING = msgspec.json.encode(
    {"venId": "v1", "timestamp": 1729700000, "batterySOC": 50.0, "usedPowerKw": 1.0}
)


class FakeBus:
    def __init__(self) -> None:
        self.room = True
        self.published: list[tuple[str, bytes, int, bool]] = []
        self.tokens: list[Any] = []

    async def wait_room(self) -> None:
        await asyncio.sleep(0)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, token: Any) -> None:
        self.published.append((topic, payload, qos, retain))
        if token is not None:
            self.tokens.append(token)

    def flush(self) -> None:
        pass

    def flush_soon(self) -> None:
        pass

    def topics(self) -> list[str]:
        return [p[0] for p in self.published]


class FakeSink:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.commands: list[CommandRecord] = []
        self.held: list[Entry] = []

    def add(
        self,
        readings: Sequence[Reading],
        commands: Sequence[CommandRecord],
        entry: Entry | None,
        rows: Sequence[Row] = (),
    ) -> None:
        self.rows += [row for reading in readings for row in reading_rows(reading)]
        self.rows += rows
        self.commands += commands
        if entry is not None:
            entry.hold()
            self.held.append(entry)

    def commit(self) -> None:
        held, self.held = self.held, []
        for entry in held:
            entry.release()


def _dispatcher(
    member: tuple[int, int] | None = None,
) -> tuple[Dispatcher, FakeBus, FakeSink, Metrics]:
    metrics = Metrics()
    sink = FakeSink()
    ven = Pipeline(create_adapter("ven"))
    dispatcher = Dispatcher(
        pipelines={"ven": ven},
        sink=sink,
        metrics=metrics,
        availability=Availability(timeout_s=60),
        dead_letter_prefix="energybus/dead_letter",
        worker_id="w1",
        member=member,
    )
    dispatcher.route("mqtt", [*ven.sources[0].patterns, *ven.command_filters], ven)
    bus = FakeBus()
    dispatcher.attach(bus)
    return dispatcher, bus, sink, metrics


def _setting(
    *pipelines: Pipeline, member: tuple[int, int] | None = None
) -> tuple[Dispatcher, FakeSink, FakeBus, Metrics]:
    """A dispatcher taking the ``set`` commands of ``pipelines``, routed in that order."""
    sink, bus, metrics = FakeSink(), FakeBus(), Metrics()
    dispatcher = Dispatcher(
        pipelines={p.name: p for p in pipelines},
        sink=sink,
        metrics=metrics,
        availability=Availability(timeout_s=60),
        dead_letter_prefix="energybus/dead_letter",
        worker_id="w1" if member is None else f"w{member[0]}",
        member=member,
    )
    for pipeline in pipelines:
        dispatcher.route("mqtt", list(pipeline.command_filters), pipeline)
    dispatcher.attach(bus)
    return dispatcher, sink, bus, metrics


def _count(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_message_is_acknowledged_only_after_pubacks_and_commit_in_order() -> None:
    dispatcher, bus, sink, _ = _dispatcher()
    acked: list[int] = []
    acks = AckQueue(acked.append)
    for mid in (1, 2):
        dispatcher.handle(Delivery("mqtt", "volttron/metering", METERING, AT, acks.add(mid)))
    assert "v1/energy/storage/v1-battery/soc/value" in bus.topics()
    assert {r.metric_name for r in sink.rows} == {"soc", "active_power"}
    assert acked == []  # publishes without PUBACK, rows not committed
    for token in bus.tokens:
        dispatcher.on_puback(token, 0)
    assert acked == []  # rows still not committed
    sink.commit()
    assert acked == [1, 2]


def test_refusals_are_dead_lettered_with_reason_and_counted() -> None:
    dispatcher, bus, sink, metrics = _dispatcher()
    acked: list[int] = []
    acks = AckQueue(acked.append)
    dispatcher.handle(Delivery("mqtt", "volttron/metering", b'{"venId":"v\xff"}', AT, acks.add(1)))
    dispatcher.handle(Delivery("mqtt", "somewhere/else", b"{}", AT, acks.add(2)))
    letters = [(t, json.loads(p)) for t, p, _, _ in bus.published]
    assert [t for t, _ in letters] == ["energybus/dead_letter/ven", "energybus/dead_letter/router"]
    first = letters[0][1]
    assert first["reason"] == "invalid_utf8" and first["topic"] == "volttron/metering"
    assert first["payload_base64"]  # the original, kept whole
    assert letters[1][1]["reason"] == "unrouted"
    assert _count(metrics, "energybus_rejections_total", source="ven", reason="invalid_utf8") == 1
    assert _count(metrics, "energybus_rejections_total", source="router", reason="unrouted") == 1
    assert acked == []  # acknowledged only once the dead letters are safe
    for token in bus.tokens:
        dispatcher.on_puback(token, 0)
    assert acked == [1, 2]
    assert sink.rows == []


def test_an_adapter_bug_is_a_dead_letter_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher, bus, _, metrics = _dispatcher()
    pipeline = dispatcher.pipelines["ven"]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a defect")

    pipeline.adapter.normalize = broken  # type: ignore[method-assign]
    acks = AckQueue(lambda mid: None)
    dispatcher.handle(Delivery("mqtt", "volttron/metering", METERING, AT, acks.add(1)))
    assert bus.topics() == ["energybus/dead_letter/ven"]
    assert json.loads(bus.published[0][1])["reason"] == "worker_error"
    assert _count(metrics, "energybus_rejections_total", source="ven", reason="worker_error") == 1
    assert "ven failed on a message from volttron/metering" in caplog.text


def test_availability_online_on_first_sight_offline_after_silence() -> None:
    dispatcher, bus, _, _ = _dispatcher()
    acks = AckQueue(lambda mid: None)
    dispatcher.handle(Delivery("mqtt", "volttron/metering", METERING, AT, acks.add(1)))
    online = [p for p in bus.published if p[0].endswith("/availability")]
    assert ("v1/energy/storage/v1-battery/soc/availability", b"online", 1, True) in online
    dispatcher.availability.timeout_s = 0.0
    bus.published.clear()
    dispatcher.housekeeping(AT)
    offline = {t for t, p, _, retain in bus.published if p == b"offline" and retain}
    assert "v1/energy/load/v1/active_power/availability" in offline


def test_a_command_is_sent_then_marked_sent_on_its_puback() -> None:
    dispatcher, bus, sink, _ = _dispatcher()
    acks = AckQueue(lambda mid: None)
    dispatcher.handle(Delivery("mqtt", "volttron/metering", METERING, AT, acks.add(1)))
    bus.published.clear()
    bus.tokens.clear()
    now = datetime.now(UTC)
    dispatcher.handle(
        Delivery("mqtt", "v1/energy/load/v1/shed_power/set", b"2000", now, acks.add(2))
    )
    assert bus.topics() == ["ven/cmd/v1"]
    assert [c.state for c in sink.commands] == ["accepted"]
    for token in bus.tokens:
        dispatcher.on_puback(token, 0)
    assert [c.state for c in sink.commands] == ["accepted", "sent"]


def test_the_gate_is_closed_without_a_bus_and_a_memory_source_waits_for_it() -> None:
    async def main() -> list[int]:
        dispatcher, bus, sink, _ = _dispatcher()
        dispatcher.detach()
        assert not dispatcher.is_open()
        source = MemorySource(name="mem", deliver=dispatcher.handle, gate=dispatcher)
        dispatcher.bind("mem", dispatcher.pipelines["ven"])
        task = asyncio.create_task(source.run())
        source.put("volttron/metering", METERING)
        await asyncio.sleep(0.05)
        assert bus.published == []  # held while the bus is away
        dispatcher.attach(bus)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if bus.published:
                break
        for token in bus.tokens:
            dispatcher.on_puback(token, 0)
        sink.commit()
        task.cancel()
        return source.acked

    assert asyncio.run(main()) == [1]


def _pubacks(dispatcher: Dispatcher, bus: FakeBus) -> None:
    tokens, bus.tokens = bus.tokens, []
    for token in tokens:
        dispatcher.on_puback(token, 0)


def test_no_message_can_stop_a_source(caplog: pytest.LogCaptureFixture) -> None:
    """Messages that once escaped the dispatcher (a venId whose topics are too long; a
    defect after translation) become dead letters and are acknowledged."""
    dispatcher, bus, sink, _ = _dispatcher()
    acked: list[int] = []
    acks = AckQueue(acked.append)
    long_ven = msgspec.json.encode({"venId": "a" * 32750, "usedPowerKw": 1})
    dispatcher.handle(Delivery("mqtt", "volttron/metering", long_ven, AT, acks.add(1)))
    long_circuit = msgspec.json.encode(
        {"venId": "v2", "circuits": [{"id": "c" * 70000, "currentKw": 1, "currentAmps": 2}]}
    )
    dispatcher.handle(Delivery("mqtt", "volttron/metering", long_circuit, AT, acks.add(2)))

    def broken(*args: Any) -> None:
        raise RuntimeError("a defect after translation")

    dispatcher.availability.seen = broken  # type: ignore[method-assign,assignment]
    dispatcher.handle(Delivery("mqtt", "volttron/metering", METERING, AT, acks.add(3)))
    letters = [json.loads(p) for t, p, _, _ in bus.published if "dead_letter" in t]
    assert [x["reason"] for x in letters] == ["too_long", "too_long", "worker_error"]
    # One dead letter for the circuit's two refused values, both listed.
    assert [r["reason"] for r in letters[1]["refusals"]] == ["too_long", "too_long"]
    assert "a defect after translation" in caplog.text
    _pubacks(dispatcher, bus)
    sink.commit()
    assert acked == [1, 2, 3]


def test_bus_ingest_refuses_what_the_historian_cannot_hold() -> None:
    dispatcher, bus, sink, _ = _dispatcher()
    acked: list[int] = []
    acks = AckQueue(acked.append)
    huge = b"1" + b"0" * 400
    dispatcher.ingest("s/energy/load/x/custom_thing/value", huge, acks.add(1))
    dispatcher.ingest("s/energy/load/x/active_power/value", b"1e305", acks.add(2))
    dispatcher.ingest("s/energy/load/x/active_power/value", b"1500", acks.add(3))
    reasons = [json.loads(p)["reason"] for _, p, _, _ in bus.published]
    assert reasons == ["non_finite", "implausible_value"]
    assert [r.value for r in sink.rows] == [1500.0]
    _pubacks(dispatcher, bus)
    sink.commit()
    assert acked == [1, 2, 3]


def test_commands_outside_the_plausible_range_are_refused() -> None:
    dispatcher, bus, sink, _ = _dispatcher()
    acks = AckQueue(lambda mid: None)
    dispatcher.handle(Delivery("mqtt", "volttron/metering", METERING, AT, acks.add(1)))
    bus.published.clear()
    for value in (b"1" + b"0" * 400, b"1e308"):
        topic = "v1/energy/load/v1/shed_power/set"
        dispatcher.handle(Delivery("mqtt", topic, value, datetime.now(UTC), acks.add(2)))
    reasons = [json.loads(p)["reason"] for _, p, _, _ in bus.published]
    assert reasons == ["non_finite", "invalid_value"]  # not a double; beyond 10 GW
    # Nothing was sent, and both are on the record.
    assert [(c.state, c.code, c.value) for c in sink.commands] == [
        ("refused", "non_finite", None),
        ("refused", "invalid_value", 1e308),
    ]


def test_the_gate_does_not_wait_on_a_dead_bus() -> None:
    from energybus.worker.bus import BusError

    class DeadBus(FakeBus):
        async def wait_room(self) -> None:
            raise BusError("bus connection lost")

    async def main() -> None:
        dispatcher, _, _, _ = _dispatcher()
        dead = DeadBus()
        dead.room = False
        dispatcher.attach(dead)
        await asyncio.wait_for(dispatcher.wait_open(), 1)  # returns; the caller checks again
        assert not dispatcher.is_open()

    asyncio.run(main())


def test_a_paused_memory_source_keeps_what_it_did_not_hand_over() -> None:
    async def main() -> tuple[int, list[int]]:
        dispatcher, _, _, _ = _dispatcher()
        dispatcher.detach()
        source = MemorySource(name="mem", deliver=dispatcher.handle, gate=dispatcher)
        task = asyncio.create_task(source.run())
        source.put("volttron/metering", METERING)
        await asyncio.sleep(0.02)
        source.pause()
        await asyncio.sleep(0.02)
        task.cancel()
        return len(source.pending), source.acked

    assert asyncio.run(main()) == (1, [])


def test_static_fields_keep_their_type_across_vens() -> None:
    """1, 1.0 and true are equal as dict keys; meta must still say what each VEN sent."""
    pipeline = Pipeline(create_adapter("ven"))

    def meta(ven: str, critical: object) -> Any:
        body = {"venId": ven, "circuits": [{"id": "c", "currentKw": 1.0, "critical": critical}]}
        out = pipeline.feed("volttron/metering", msgspec.json.encode(body), received_at=AT)
        return next(
            json.loads(m.payload)["attributes"]["critical"]
            for m in out.messages
            if m.topic == f"{ven}/energy/load/c/active_power/meta"
        )

    assert meta("w1", 1) == 1
    assert meta("w2", True) is True


def _voke_pipeline(site: str = "hq") -> Pipeline:
    """A Voke org ``acme`` whose plant P-1 (site ``site``) has a battery B1."""
    from energybus.adapters.voke import VokeOptions

    options = {
        "orgs": {
            "acme": {
                "api_key": "k",
                "signing_keys": ["s"],
                "site": site,
                "plants": {"P-1": {"targets": {"B1": {"template": "battery"}}}},
            }
        }
    }
    return Pipeline(create_adapter("voke", options=msgspec.convert(options, VokeOptions)))


def _cpi_pipeline() -> Pipeline:
    """A CPI plant p1 (site hq) with a battery B1: its device is p1-b1."""
    from energybus.adapters.cpi import CpiOptions

    options = {"site": "hq", "plants": {"p1": {"targets": {"B1": {"template": "battery"}}}}}
    return Pipeline(create_adapter("cpi", options=msgspec.convert(options, CpiOptions)))


def test_a_command_for_an_outlet_leaves_by_it_and_a_failure_rejects_it() -> None:
    """A Voke command goes to the org's AMQP connection, not the bus; if that connection
    cannot take it, the record is rejected with the reason and the set acknowledged."""
    from energybus.messages import Message

    voke = _voke_pipeline()
    sink = FakeSink()
    dispatcher = Dispatcher(
        pipelines={"voke": voke},
        sink=sink,
        metrics=Metrics(),
        availability=Availability(timeout_s=60),
        dead_letter_prefix="energybus/dead_letter",
        worker_id="w1",
    )
    dispatcher.route("mqtt", list(voke.command_filters), voke)

    class Outlet:
        def __init__(self) -> None:
            self.sent: list[tuple[Message, Any]] = []

        def publish(self, message: Message, token: Any) -> None:
            self.sent.append((message, token))

    outlet = Outlet()
    dispatcher.outlet("vcp.acme.command", outlet)
    bus = FakeBus()
    dispatcher.attach(bus)
    acked: list[int] = []
    acks = AckQueue(acked.append)
    topic = "hq/energy/storage/p-1-b1/power_setpoint/set"
    for packet_id in (1, 2):
        dispatcher.handle(Delivery("mqtt", topic, b"1000", datetime.now(UTC), acks.add(packet_id)))
    assert bus.published == []  # nothing of a Voke command goes on the bus
    assert [m.topic for m, _ in outlet.sent] == ["vcp.acme.command"] * 2
    assert json.loads(outlet.sent[0][0].payload)["payload"] == {"kw": 1.0}
    assert acked == []  # each set waits for its command's fate
    outlet.sent[0][1].release()  # the broker confirmed the first
    outlet.sent[1][1].fail("the broker could not route it")
    assert [(c.state, c.reason) for c in sink.commands] == [
        ("accepted", None),
        ("accepted", None),
        ("sent", None),
        ("rejected", "the broker could not route it"),
    ]
    assert acked == []
    sink.commit()  # the accepted records are stored
    assert acked == [1, 2]

    # Lost after it was written: the record waits (for the answer, or to expire) and its
    # set is acknowledged, not sent again.
    dispatcher.handle(Delivery("mqtt", topic, b"1000", datetime.now(UTC), acks.add(3)))
    outlet.sent[2][1].uncertain("no confirmation from the broker")
    sink.commit()
    assert [c.state for c in sink.commands[4:]] == ["accepted"]
    assert acked == [1, 2, 3]
    assert voke.adapter.commands.get(sink.commands[4].id) is not None

    # A destination the adapter declared, without a connection: never onto the bus.
    dispatcher._outlets.clear()
    dispatcher.handle(Delivery("mqtt", topic, b"1000", datetime.now(UTC), acks.add(4)))
    assert bus.published == []
    # (the rejection comes before the accepted snapshot; the historian keeps the later state)
    last_two = [(c.state, c.reason) for c in sink.commands[-2:]]
    assert ("rejected", "no connection carries commands to vcp.acme.command") in last_two


def test_a_set_two_adapters_take_goes_to_the_adapter_of_its_device() -> None:
    """CPI and Voke plants both take power_setpoint: each command reaches the adapter that
    knows its device, whatever order the adapters were routed in; a set for a device
    neither knows is refused by the first, as when one adapter takes it alone."""
    voke = _voke_pipeline()
    cpi = _cpi_pipeline()
    assert "+/energy/+/+/power_setpoint/set" in set(cpi.command_filters) & set(voke.command_filters)
    for first, second in ((cpi, voke), (voke, cpi)):
        dispatcher, sink, _, _ = _setting(first, second)
        dispatcher.outlet("vcp.acme.command", type("Outlet", (), {"publish": lambda *a: None})())
        acks = AckQueue(lambda packet_id: None)
        for packet_id, device in enumerate(("p-1-b1", "p1-b1", "nobody"), start=1):
            topic = f"hq/energy/storage/{device}/power_setpoint/set"
            dispatcher.handle(Delivery("mqtt", topic, b"1000", AT, acks.add(packet_id)))
        assert [(c.adapter, c.entity_id, c.state) for c in sink.commands] == [
            ("voke", "p-1-b1", "accepted"),
            ("cpi", "p1-b1", "accepted"),
            (first.name, "nobody", "refused"),
        ]


def test_a_set_is_handled_by_its_sites_member_whichever_adapter_takes_it() -> None:
    """Two members of a partitioned group, each with a Voke org whose plant is on one of
    its own sites (worker/config.py refuses any other) and the same CPI plant. A ``set``
    for a device no adapter knows goes first to Voke, an adapter without MQTT sources: it
    is still left to the site's member, so across the group it is refused once, and the
    Voke plant's ``set`` is taken once, by its member."""
    assert [zlib.crc32(site.encode()) % 2 for site in ("hq", "site-a")] == [0, 1]
    records: list[tuple[str, str, str]] = []
    elsewhere = 0.0
    for index, site in enumerate(("hq", "site-a")):
        voke = _voke_pipeline(site)
        cpi = _cpi_pipeline()
        dispatcher, sink, _, metrics = _setting(voke, cpi, member=(index, 2))
        dispatcher.outlet("vcp.acme.command", type("Outlet", (), {"publish": lambda *a: None})())
        acks = AckQueue(lambda packet_id: None)
        for packet_id, device in enumerate(("p-1-b1", "nobody"), start=1):
            topic = f"hq/energy/storage/{device}/power_setpoint/set"
            dispatcher.handle(Delivery("mqtt", topic, b"1000", AT, acks.add(packet_id)))
        records += [(c.adapter, c.entity_id, c.state) for c in sink.commands]
        elsewhere += sum(
            _count(metrics, "energybus_messages_elsewhere_total", adapter=name)
            for name in ("voke", "cpi")
        )
    assert records == [("voke", "p-1-b1", "accepted"), ("voke", "nobody", "refused")]
    assert elsewhere == 2  # both sets, at the member of site-a


class _Plugin(Adapter[Document, MappingDocument]):
    """A plug-in adapter that takes ``power_setpoint`` sets and keeps the default
    ``knows_target``."""

    name: ClassVar[str] = "plugin"
    options_type: ClassVar[type[Document]] = Document
    mapping_type: ClassVar[type[MappingDocument]] = MappingDocument
    sources = (SourceDeclaration(transport="mqtt", patterns=("plugin/+",)),)
    command_filters = (canonical_filter("set", metric="power_setpoint"),)

    @classmethod
    def load_plan(cls, source: str | Path | None = None) -> tuple[Any, Plan]:
        return None, Plan()

    @classmethod
    def compile(cls, document: Any, compiler: Compiler) -> Plan:
        return Plan()

    def normalize(self, topic: str, payload: bytes, received_at: datetime) -> Normalized:
        return Normalized()

    def format(self, command: Admitted, *, received_at: datetime) -> Formatted:
        raise CommandError("unknown_target", "no such device", topic=str(command.topic))


class _Broken(_Plugin):
    def knows_target(self, parsed: Topic) -> bool:
        raise RuntimeError("a defect")


def _with_cpi(first: Pipeline) -> tuple[Dispatcher, FakeSink, FakeBus]:
    dispatcher, sink, bus, _ = _setting(first, _cpi_pipeline())
    return dispatcher, sink, bus


def test_a_plug_in_routed_first_does_not_take_the_sets_of_anothers_devices() -> None:
    dispatcher, sink, _ = _with_cpi(Pipeline(_Plugin()))
    acks = AckQueue(lambda packet_id: None)
    for packet_id, device in enumerate(("p1-b1", "nobody"), start=1):
        topic = f"hq/energy/storage/{device}/power_setpoint/set"
        dispatcher.handle(Delivery("mqtt", topic, b"1000", AT, acks.add(packet_id)))
    assert [(c.adapter, c.entity_id, c.state) for c in sink.commands] == [
        ("cpi", "p1-b1", "accepted"),
        ("plugin", "nobody", "refused"),  # claimed by none: the first routed refuses it
    ]


def test_a_knows_target_that_raises_is_a_dead_letter_not_a_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher, sink, bus = _with_cpi(Pipeline(_Broken()))
    acked: list[int] = []
    acks = AckQueue(acked.append)
    topic = "hq/energy/storage/p1-b1/power_setpoint/set"
    with caplog.at_level("ERROR", "energybus.worker"):
        dispatcher.handle(Delivery("mqtt", topic, b"1000", AT, acks.add(1)))
    assert sink.commands == []
    assert bus.topics() == ["energybus/dead_letter/router"]
    assert b"worker_error" in bus.published[0][1]
    for token in bus.tokens:
        dispatcher.on_puback(token, 0)
    assert acked == [1]
    assert "router failed on a message from " + topic in caplog.text


def test_a_set_several_adapters_take_goes_to_the_one_that_owns_the_device() -> None:
    """CPI, Voke and Modbus batteries all take ``power_setpoint``: a set for the Modbus
    battery is the Modbus adapter's (its refusals counted and dead-lettered there), one
    for the CPI battery the CPI adapter's, one for no device refused by the first."""
    from pathlib import Path

    from energybus.adapters.cpi import CpiOptions
    from energybus.adapters.modbus import ModbusOptions

    maps = Path(__file__).resolve().parent / "maps"
    cpi = Pipeline(
        create_adapter(
            "cpi",
            options=msgspec.convert(
                {"plants": {"p1": {"site": "s1", "targets": {"B1": {"template": "battery"}}}}},
                CpiOptions,
            ),
        )
    )
    modbus = Pipeline(
        create_adapter(
            "modbus",
            options=msgspec.convert(
                {"site": "s1", "mapping": str(maps), "devices": {"bat": {"map": "test_battery"}}},
                ModbusOptions,
            ),
        )
    )
    dispatcher, _, bus, metrics = _setting(cpi, modbus)
    acks = AckQueue(lambda mid: None)
    now = datetime.now(UTC)
    for entity in ("bat", "p1-b1", "nobody"):
        topic = f"s1/energy/storage/{entity}/power_setpoint/set"
        dispatcher.handle(Delivery("mqtt", topic, b'{"value": "x"}', now, acks.add(1)))
    dispatcher.handle(
        Delivery("mqtt", "s1/energy/storage/p1-b1/power_setpoint/set", b"1000", now, acks.add(2))
    )
    letters = [(t, json.loads(p)["reason"]) for t, p, _, _ in bus.published if "dead" in t]
    assert letters == [
        ("energybus/dead_letter/modbus", "wrong_type"),
        ("energybus/dead_letter/cpi", "wrong_type"),
        ("energybus/dead_letter/cpi", "wrong_type"),
    ]
    assert (
        _count(metrics, "energybus_command_refusals_total", adapter="modbus", reason="wrong_type")
        == 1
    )
    assert "cpi/p1/commands" in bus.topics()
