"""The examples are part of the documentation, so they run in CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_render_samples_example() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "render_samples.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vad/energy/storage/battery-main/soc/meta qos=1 retain=true {")
    assert '"historian":{"mode":"sample"}' in lines[0]
    assert lines[1] == "vad/energy/storage/battery-main/soc/value qos=1 retain=false 85.5"
    assert lines[2] == (
        "vad/energy/storage/battery-main/soc/last qos=1 retain=true "
        '{"value":85.5,"unit":"%","observed_at":"2024-10-23T16:13:20Z","quality":"good"}'
    )
    assert lines[3] == "unchanged value -> ['last']"
    assert "device_id='storage.battery-main'" in lines[4] and "quality='degraded'" in lines[4]
    assert lines[5] == "1.1 kW -> 1100.0 W"


def test_example_topics_cover_valid_and_invalid() -> None:
    from energybus import validate_topic

    topics = (EXAMPLES / "topics.txt").read_text().splitlines()
    verdicts = [validate_topic(topic) is None for topic in topics]
    assert any(verdicts) and not all(verdicts)


def test_normalize_ven_example() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "normalize_ven.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "15 values, 45 messages"
    assert lines[1] == "ven-042/energy/load/ven-042/active_power/value 8200.0"
    assert lines[-1] == "ven/cmd/ven-042 event accepted"


def _run(example: str) -> list[str]:
    """The lines an example prints; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / example)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_voke_partner_example() -> None:
    assert _run("voke_partner.py") == [
        "acme-hq/energy/storage/p-17-b1/soc/value 55.5",
        "acme-hq/energy/storage/p-17-b1/active_power/value -2500.0",
        "forged: bad_signature",
        "vcp.acme.command set_power {'kw': 3.0} accepted",
        "answer: confirmed acme-hq/energy/storage/p-17-b1/power_setpoint/last",
    ]


def test_modbus_battery_example() -> None:
    assert _run("modbus_battery.py") == [
        "lab/energy/storage/battery/max_charge_power/value 0",
        "lab/energy/storage/battery/soc/value 42.0",
        "12000 W: interlock - interlock: above the maximum 10000",
        "3000 W: write [3000] at 40152",
        "answer: confirmed lab/energy/storage/battery/max_charge_power/value",
    ]
