"""docs/configuration.md is what the schemas say, and says something of every key."""

from __future__ import annotations

from tests.docs.markdown import ROOT
from tools import config_reference


def test_every_key_has_a_description() -> None:
    missing = config_reference.undocumented()
    assert not missing, f"add a docstring under each of these fields: {missing}"


def test_the_committed_reference_is_generated_from_the_schemas() -> None:
    committed = (ROOT / config_reference.TARGET).read_text()
    assert committed == config_reference.render(), (
        f"docs/configuration.md is out of date: run {config_reference.REGENERATE}"
    )


def test_the_reference_covers_the_worker_and_every_adapter() -> None:
    text = config_reference.render()
    for table in ("[worker]", "[mqtt]", "[mqtt.tls]", "[historian]", "[[historian.counters]]"):
        assert f"`{table}`" in text, table
    for adapter in ("ven", "cpi", "voke", "modbus"):
        assert f"## `[adapters.{adapter}]`" in text, adapter
    assert "### `[adapters.modbus.devices.<key>]`" in text
    assert "| `port` | integer | `1883` | >= 1, <= 65535 |" in text
    assert "| `api_key` | string | required |" in text
