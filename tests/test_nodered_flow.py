"""The benchmark's Node-RED flow: its readable source is what the flow file carries, and
its placeholders are all filled when it is deployed."""

from __future__ import annotations

import json

import pytest

from benchmarks.nodered import FLOW, flow

HERE = FLOW.parent


def test_the_function_code_in_the_flow_is_the_readable_source() -> None:
    nodes = json.loads(FLOW.read_text())
    (function,) = [n for n in nodes if n["type"] == "function"]
    assert function["initialize"] == (HERE / "ven-init.js").read_text()
    assert function["func"] == (HERE / "ven-func.js").read_text()


def test_deploying_fills_every_placeholder() -> None:
    filled = json.dumps(flow(mqtt_port=18830, site="b1000", client_id="bench-b1000"))
    assert "@@" not in filled
    (broker,) = [n for n in json.loads(filled) if n["type"] == "mqtt-broker"]
    assert (broker["port"], broker["clientid"]) == (18830, "bench-b1000")
    with pytest.raises(ValueError, match=r"^site: "):
        flow(mqtt_port=18830, site="not a site/", client_id="x")
