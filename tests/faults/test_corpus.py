"""The malformed inputs of the fault suite, through the adapters alone: each category of
each source is refused whole, with its one reason, whatever hypothesis draws. The fault
test relies on exactly that when it compares the worker's counts with what was sent."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings

from energybus.adapters import Pipeline
from tests.faults.malformed import DIALECTS, Mutation, apply, draw, strategy
from tests.faults.traffic import MODBUS_DEVICES, Traffic
from tests.voke import Org
from tools.services import Service

CASES = [(adapter, c) for adapter, d in sorted(DIALECTS.items()) for c in d.categories]


def _traffic() -> Traffic:
    # Nothing connects: the broker's address is only written into the configuration.
    rabbitmq = Service("rabbitmq", "127.0.0.1", 5672, 0, "/nonexistent", "amqp://127.0.0.1:5672")
    org = Org("org-corpus", "key", f"sig-{uuid.uuid4().hex}", "org-corpus", rabbitmq)
    return Traffic("corpus", org, f"cpi-{uuid.uuid4().hex}")


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Traffic, dict[str, Pipeline]]:
    traffic = _traffic()
    config = tmp_path_factory.mktemp("corpus") / "site.toml"
    config.write_text(traffic.adapters_config(dict.fromkeys(MODBUS_DEVICES, 1502)))
    return traffic, traffic.pipelines(config)


@pytest.mark.parametrize(("adapter", "category"), CASES)
def test_each_malformed_input_is_refused_whole_with_its_reason(
    offline: tuple[Traffic, dict[str, Pipeline]], adapter: str, category: str
) -> None:
    traffic, pipelines = offline
    pipeline = pipelines[adapter]
    dialect = DIALECTS[adapter]
    made = iter(range(10**9))

    @settings(
        max_examples=8 if category == "oversized" else 60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy(dialect, category))
    def refused(mutation: Mutation) -> None:
        sent: list[bytes] = []
        if category == "replayed":
            original = traffic.make(adapter, next(made))
            first = pipeline.feed(original.topic, original.encode(), received_at=datetime.now(UTC))
            assert first.readings and not first.rejections
            sent.append(original.encode())
        doc = traffic.make(adapter, next(made))
        payload = apply(mutation, doc, sent)
        expected = dialect.reason(category, payload, pipeline.max_payload_bytes)
        out = pipeline.feed(doc.topic, payload, received_at=datetime.now(UTC))
        shown = payload[:120]
        assert [r.code for r in out.rejections] == [expected], (shown, out.rejections)
        assert not out.readings, shown
        assert not out.messages, shown
        assert not out.duplicate

    refused()


def test_the_corpus_draws_the_same_inputs_for_the_same_seed() -> None:
    dialect = DIALECTS["cpi"]
    first = draw(strategy(dialect, "wrong_type"), 50, seed=7)
    assert first == draw(strategy(dialect, "wrong_type"), 50, seed=7)
    assert len(first) == 50
    assert len({repr(m) for m in first}) > 10
