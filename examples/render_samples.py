"""From a device reading to bus messages and historian rows, with the energybus library.

Run: python examples/render_samples.py
"""

from __future__ import annotations

from datetime import UTC, datetime

import energybus


def main() -> None:
    # A battery reports 85.5 % at its own clock time; the id comes from the source's naming.
    battery = energybus.to_kebab("Battery_Main")
    observed = datetime(2024, 10, 23, 16, 13, 20, tzinfo=UTC)
    sample = energybus.make_sample(
        "vad", "storage", battery, "soc", 85.5, observed_at=observed, unit="%"
    )

    renderer = energybus.Renderer(source="example")
    for message in renderer.render(sample):
        flags = f"qos={message.qos} retain={str(message.retain).lower()}"
        print(f"{message.topic} {flags} {message.payload.decode()}")

    # The same value again is held back by dedupe; only the retained `last` moves on.
    again = energybus.make_sample(
        "vad", "storage", battery, "soc", 85.5, observed_at=observed.replace(second=25), unit="%"
    )
    streams = [m.topic.rsplit("/", 1)[1] for m in renderer.render(again)]
    print(f"unchanged value -> {streams}")

    # A consumer on the bus: route by filter, then map to the historian.
    topic = "vad/energy/storage/battery-main/soc/value"
    assert energybus.matches(energybus.CANONICAL_FILTERS["value"], topic)
    row = energybus.historian_row(topic, b"85.5", received_at=observed)
    print(f"historian row: {row}")

    # Source units convert once, at mapping load, then per value.
    to_watts = energybus.conversion("kW")
    print(f"1.1 kW -> {to_watts(1.1)} {to_watts.unit}")


if __name__ == "__main__":
    main()
