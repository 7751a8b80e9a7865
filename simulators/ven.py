"""A VEN (a Volttron-based demand-response node), played over MQTT in its own format.

docs/adapters.md ("VEN") and ``mappings/ven.toml`` are the format. The VEN publishes its
metering on ``volttron/metering`` every interval: its load (what it uses, what it sheds,
the baseline), its battery's state of charge, its panel and each breaker circuit, and the
sheddable loads. It takes commands on ``ven/cmd/{venId}`` and answers each on
``ven/ack/{venId}``:

- ``event``: sheds the sheddable circuits, least important first, until the requested
  reduction is covered, and answers ``accepted`` with ``actual_shed_kw``, what those
  circuits drew; when the event's duration is over it restores them by itself and says
  so with a restore ACK that answers no command;
- ``restore``: ends the event, answers ``success``;
- ``ping``: answers ``pong``;
- anything else is answered ``rejected`` with the reason; a message that is no command
  at all (not a JSON object, no ``op``) is counted and not answered.

:class:`VenMessages` is the VEN without I/O (:class:`~.mqtt.Player` runs it).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from .mqtt import Outgoing
from .plant import clamp

__all__ = ["CIRCUITS", "METERING_TOPIC", "Circuit", "VenMessages", "site_config"]

METERING_TOPIC: Final = "volttron/metering"
_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.Decoder().decode


@dataclass(frozen=True)
class Circuit:
    """A breaker circuit: ``kw`` is its typical draw; ``priority`` orders shedding (the
    highest number goes first); a critical circuit is never shed."""

    id: str
    name: str
    load_type: str
    breaker_a: int
    kw: float
    priority: int
    critical: bool = False


CIRCUITS: Final = (
    Circuit("circuit_1", "Main HVAC", "hvac", 30, 3.2, 2),
    Circuit("circuit_2", "Water heater", "water_heater", 20, 2.4, 3),
    Circuit("circuit_3", "EV charger", "ev_charger", 40, 6.6, 4),
    Circuit("circuit_4", "Kitchen", "appliance", 20, 0.9, 1, critical=True),
)
_UNMETERED_KW: Final = 0.6  # lighting and plugs on no listed circuit
_PANEL_A: Final = 200
_PANEL_KW: Final = 48.0


class VenMessages:
    """The VEN ``ven_id``: its metering and its answers, without I/O. ``seed`` makes the
    values reproducible."""

    def __init__(self, *, ven_id: str = "ven-1", seed: int | None = None) -> None:
        if not ven_id or "/" in ven_id or "+" in ven_id or "#" in ven_id:
            raise ValueError(f"ven_id {ven_id!r} cannot be a topic level")
        self.ven_id = ven_id
        self._rng = random.Random(seed)
        self._phase = self._rng.uniform(0, 2 * math.pi)
        self._soc = self._rng.uniform(45, 85)
        self._last: float | None = None
        self._event: dict[str, Any] | None = None  # event_id, requested_kw, shed ids, ends_at
        self.commands = 0
        self.events = 0
        self.restores = 0
        self.pings = 0
        self.rejected = 0
        self.malformed = 0

    @property
    def filters(self) -> tuple[str, ...]:
        return (f"ven/cmd/{self.ven_id}",)

    @property
    def ack_topic(self) -> str:
        return f"ven/ack/{self.ven_id}"

    # What the circuits draw --------------------------------------------------------------

    def _draw(self, circuit: Circuit, now: float) -> float:
        """What ``circuit`` would draw at ``now`` if it were on (kW)."""
        index = CIRCUITS.index(circuit)
        cycle = math.sin(2 * math.pi * now / (300 + 60 * index) + self._phase + index)
        noise = self._rng.gauss(0, 0.03)
        return round(max(0.0, circuit.kw * (0.75 + 0.25 * cycle + noise)), 2)

    def _shed_ids(self) -> frozenset[str]:
        return frozenset(self._event["shed"]) if self._event is not None else frozenset()

    # Telemetry -----------------------------------------------------------------------------

    def telemetry(self, now: float) -> list[Outgoing]:
        """The metering message at ``now``, after a restore ACK if an event just ended."""
        out = []
        event = self._event
        if event is not None and now >= event["ends_at"]:
            self._event = None
            self.restores += 1
            ack = {"op": "restore", "status": "success", "ts": int(now)}
            out.append(Outgoing(self.ack_topic, _encode(ack)))
        out.append(self.metering(now))
        return out

    def metering(self, now: float) -> Outgoing:
        """One ``volttron/metering`` message, as the VEN sends it every interval."""
        shed = self._shed_ids()
        circuits = []
        loads = []
        baseline = used = _UNMETERED_KW
        shed_kw = 0.0
        voltage = round(240 + self._rng.gauss(0, 0.8), 1)
        for circuit in CIRCUITS:
            natural = self._draw(circuit, now)
            on = circuit.id not in shed
            kw = natural if on else 0.0
            baseline += natural
            used += kw
            shed_kw += natural - kw
            circuits.append(
                {
                    "id": circuit.id,
                    "name": circuit.name,
                    "breakerAmps": circuit.breaker_a,
                    "currentKw": kw,
                    "currentAmps": round(kw * 1000 / voltage, 2),
                    "enabled": on,
                    "critical": circuit.critical,
                }
            )
            if not circuit.critical:
                loads.append(
                    {
                        "loadId": circuit.id,
                        "name": circuit.name,
                        "type": circuit.load_type,
                        "capacityKw": circuit.kw,
                        "currentPowerKw": kw,
                        "shedCapabilityKw": kw,
                        "enabled": on,
                        "priority": circuit.priority,
                    }
                )
        if self._last is not None:
            # The battery covers part of the load and recharges slowly: its charge wanders.
            hours = max(0.0, now - self._last) / 3600
            self._soc = clamp(self._soc + self._rng.gauss(0, 40) * hours, 20.0, 95.0)
        self._last = now
        body: dict[str, Any] = {
            "venId": self.ven_id,
            "timestamp": round(now, 3),
            "usedPowerKw": round(used, 2),
            "shedPowerKw": round(shed_kw, 2),
            "requestedReductionKw": self._event["requested_kw"] if self._event else 0.0,
            "baselinePowerKw": round(baseline, 2),
            "batterySOC": round(self._soc, 1),
            "panelAmperageRating": _PANEL_A,
            "panelVoltage": voltage,
            "panelMaxKw": _PANEL_KW,
            "currentAmps": round(used * 1000 / voltage, 2),
            "panelUtilizationPercent": round(used / _PANEL_KW * 100, 1),
            "circuits": circuits,
            "loads": loads,
        }
        if self._event is not None:
            body["eventId"] = self._event["event_id"]
        return Outgoing(METERING_TOPIC, _encode(body))

    # Commands ------------------------------------------------------------------------------

    def answer(self, topic: str, payload: bytes, now: float) -> list[Outgoing]:
        """The ACK of a command on ``ven/cmd/{venId}`` (none for what is no command)."""
        if topic != self.filters[0]:
            return []
        try:
            command = _decode(payload)
        except msgspec.DecodeError:
            command = None
        if not isinstance(command, dict) or not isinstance(command.get("op"), str):
            self.malformed += 1
            return []
        self.commands += 1
        op: str = command["op"]
        ack: dict[str, Any] = {"op": op, "ts": int(now)}
        if op == "event":
            ack |= self._start_event(command, now)
        elif op == "restore":
            self._event = None
            self.restores += 1
            ack["status"] = "success"
        elif op == "ping":
            self.pings += 1
            ack["status"] = "pong"
        else:
            self.rejected += 1
            ack |= {"status": "rejected", "reason": f"unknown op {op!r}"}
        if "correlationId" in command:
            ack["correlationId"] = command["correlationId"]
        return [Outgoing(self.ack_topic, _encode(ack))]

    def _start_event(self, command: dict[str, Any], now: float) -> dict[str, Any]:
        requested = command.get("shed_kw")
        duration = command.get("duration_sec", 3600)
        number = (int, float)
        if (
            isinstance(requested, bool)
            or not isinstance(requested, number)
            or not 0 < requested < 1e6
            or isinstance(duration, bool)
            or not isinstance(duration, number)
            or not duration > 0
        ):
            self.rejected += 1
            return {"status": "rejected", "reason": "shed_kw and duration_sec must be positive"}
        shed: list[dict[str, Any]] = []
        covered = 0.0
        for circuit in sorted(CIRCUITS, key=lambda c: -c.priority):
            if covered >= requested:
                break
            if circuit.critical:
                continue
            kw = self._draw(circuit, now)
            shed.append({"loadId": circuit.id, "name": circuit.name, "shedKw": kw})
            covered += kw
        event_id = command.get("event_id")
        self._event = {
            "event_id": event_id if isinstance(event_id, str) else f"evt-{int(now)}",
            "requested_kw": float(requested),
            "shed": [s["loadId"] for s in shed],
            "ends_at": now + duration,
        }
        self.events += 1
        return {
            "status": "accepted",
            "event_id": self._event["event_id"],
            "requested_shed_kw": float(requested),
            "actual_shed_kw": round(covered, 2),
            "circuits_curtailed": shed,
        }

    def summary(self) -> str:
        line = (
            f"commands: {self.commands} received, {self.events} events, "
            f"{self.restores} restores, {self.pings} pings, {self.rejected} rejected"
        )
        if self.malformed:
            line += f", {self.malformed} malformed"
        return line


def site_config(*, ven_id: str, site: str) -> str:
    """The ``[adapters.ven]`` configuration that takes this VEN's metering onto ``site``."""
    quoted = _encode(ven_id).decode()  # a JSON string is a TOML basic string
    return (
        f"# The VEN `energybus simulate ven --ven-id {ven_id}` plays.\n"
        f"[adapters.ven]\nsite = {_encode(site).decode()}\n\n[adapters.ven.vens.{quoted}]\n"
    )
