"""Entity availability: ``online`` on first sight and on return, ``offline`` after silence.

Tracked per entity (site, type, id): the first value of a metric publishes that
series' retained ``availability`` as ``online``; an entity silent for
``availability_timeout_s`` goes ``offline`` on every series it has, and back
``online`` with its next value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from energybus.errors import EnergyBusError
from energybus.samples import Reading
from energybus.topics import build_topic

__all__ = ["Availability"]

Publish = Callable[[str, bytes], None]
"""Publishes a retained QoS 1 availability message."""


class _Entity:
    __slots__ = ("metrics", "online", "seen")

    def __init__(self) -> None:
        self.metrics: set[str] = set()
        self.online = True
        self.seen = 0.0


class Availability:
    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._entities: dict[tuple[str, str, str], _Entity] = {}

    def __len__(self) -> int:
        return len(self._entities)

    def seen(self, readings: Iterable[Reading], publish: Publish) -> None:
        now = time.monotonic()
        entities = self._entities
        for reading in readings:
            key = (reading.site, reading.entity_type, reading.entity_id)
            entity = entities.get(key)
            if entity is None:
                entity = entities[key] = _Entity()
            entity.seen = now
            if not entity.online:
                entity.online = True
                _announce(publish, key, entity.metrics, b"online")
            known = entity.metrics
            for value in reading.values:
                metric = value[0]
                if metric not in known:
                    known.add(metric)
                    _announce(publish, key, (metric,), b"online")

    def gone(self, keys: Iterable[tuple[str, str, str]], publish: Publish) -> None:
        """The source says these entities are unreachable: ``offline`` now; their next
        value brings them back."""
        for key in keys:
            entity = self._entities.get(key)
            if entity is not None and entity.online:
                entity.online = False
                _announce(publish, key, entity.metrics, b"offline")

    def sweep(self, publish: Publish | None, freshness: Callable[[str, str, float], None]) -> None:
        """Report each entity's age and mark the silent ones offline (when ``publish``
        is given, i.e. the bus is up; otherwise they are marked at the next sweep)."""
        now = time.monotonic()
        timeout = self.timeout_s
        for key, entity in self._entities.items():
            age = now - entity.seen
            freshness(key[0], f"{key[1]}.{key[2]}", age)
            if entity.online and age > timeout and publish is not None:
                entity.online = False
                _announce(publish, key, entity.metrics, b"offline")


def _announce(
    publish: Publish, key: tuple[str, str, str], metrics: Iterable[str], state: bytes
) -> None:
    site, entity_type, entity_id = key
    for metric in metrics:
        try:
            topic = build_topic(site, entity_type, entity_id, metric, "availability")
        except EnergyBusError:  # the renderer refuses such series first; never publish one
            continue
        publish(topic, state)
