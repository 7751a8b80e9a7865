"""A Voke / CPI plant, played over MQTT: signed telemetry, and signed ACKs to commands.

docs/adapters.md ("Voke / CPI plants") is the format, and ``mappings/cpi.toml`` names the
signals each device template sends and the actions it takes. The plant (``plantId``) is
itself a device (template ``plant``) with three sub-devices by externalId: ``B1``
(battery), ``M1`` (the grid meter) and ``PV1`` (pv), following the same physics as a Voke
plant (:mod:`.plant`). Every interval each device publishes one telemetry message on
``cpi/{plantId}/telemetry``.

Every message is signed with the plant's secret by the adapter's own rules
(:mod:`energybus.adapters.signing`: HMAC-SHA256 over the RFC 8785 form). A command on
``cpi/{plantId}/commands`` is checked as a plant checks it (signature, ``ts`` inside the
replay window, ``cmdId`` not seen before): one that fails is counted and dropped,
unanswered; one that passes is carried out on the model and answered on
``cpi/{plantId}/commands/ack`` with status ``ok``, or ``error`` and the reason when the
device has no such action or cannot do it.

:class:`CpiMessages` is the plant without I/O (:class:`~.mqtt.Player` runs it).
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from energybus.adapters.plants import unix_ms
from energybus.adapters.signing import ReplayGuard, Signer
from energybus.errors import SourceError
from energybus.mappings import mapping_path

from .mqtt import Outgoing
from .plant import PlantModel

__all__ = ["DEVICES", "CpiMessages", "actions", "check_plant_id", "site_config"]

# externalId (None: the plant itself) -> device template in mappings/cpi.toml.
DEVICES: Final[Mapping[str | None, str]] = {
    None: "plant",
    "B1": "battery",
    "M1": "meter",
    "PV1": "pv",
}
_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.Decoder().decode


def check_plant_id(plant_id: str) -> str:
    """``plant_id`` if it can be a topic level (``cpi/{plantId}/...``), else ValueError."""
    if not plant_id or any(c in plant_id for c in "/+#"):
        raise ValueError(f"plant id {plant_id!r} cannot be a topic level")
    return plant_id


def actions() -> dict[str, dict[str, str | None]]:
    """template -> action key -> the payload field carrying its value (None: a trigger),
    as ``mappings/cpi.toml`` declares them: the plant's firmware knows its templates."""
    templates = tomllib.loads(mapping_path("cpi").read_text())["templates"]
    return {
        name: {key: action.get("param") for key, action in template.get("actions", {}).items()}
        for name, template in templates.items()
    }


class CpiMessages:
    """The CPI plant ``plant_id``, signing with ``secret``, without I/O. ``seed`` makes
    the values reproducible."""

    def __init__(
        self,
        *,
        plant_id: str = "PLANT-1",
        secret: str | bytes,
        seed: int | None = None,
        replay_window_s: float = 300.0,
    ) -> None:
        self.plant_id = check_plant_id(plant_id)
        self._signer = Signer([secret])
        self._guard = ReplayGuard(window_s=replay_window_s)
        self._rng = random.Random(seed)
        self.model = PlantModel(id=plant_id, rng=self._rng)
        self._actions = actions()
        self.contactor_closed = True
        self.commands = 0
        self.acked = 0
        self.errors = 0
        self.refused = 0  # bad signature, outside the window, a cmdId seen before

    def __repr__(self) -> str:
        return f"CpiMessages(plant_id={self.plant_id!r})"  # never the secret

    @property
    def filters(self) -> tuple[str, ...]:
        return (f"cpi/{self.plant_id}/commands",)

    def _signed(self, kind: str, body: dict[str, Any]) -> Outgoing:
        body["sig"] = self._signer.sign(body)
        return Outgoing(f"cpi/{self.plant_id}/{kind}", _encode(body))

    # Telemetry -----------------------------------------------------------------------------

    def telemetry(self, now: float) -> list[Outgoing]:
        """One signed telemetry message per device at ``now``, the plant itself first."""
        ts = int(now * 1000)
        self.model.advance(ts)
        out = []
        for target, template in DEVICES.items():
            body: dict[str, Any] = {"ts": ts}
            if target is not None:
                body["target"] = target
            body["values"] = self.values(template)
            out.append(self._signed("telemetry", body))
        return out

    def values(self, template: str) -> dict[str, float | int]:
        """The signals a device of ``template`` sends, in the units mappings/cpi.toml reads
        (tenths of kW for ``p_total`` and ``p_ac``, tenths of V and °C, hundredths of Hz)."""
        m, r = self.model, self._rng
        status = 1 | (2 if m.alarms else 0)
        if template == "plant":
            return {"p_total": round(m.grid_kw * 10), "status": status}
        if template == "meter":
            grid = m.grid_kw
            out: dict[str, float | int] = {
                "p_import": round(max(grid, 0.0), 2),
                "p_export": round(max(-grid, 0.0), 2),
            }
            for phase in (1, 2, 3):
                out[f"u_l{phase}"] = round((230 + r.gauss(0, 1.2)) * 10)
            out |= {
                "freq": round((50 + r.gauss(0, 0.015)) * 100),
                "e_import": round(m.import_kwh, 3),
                "e_export": round(m.export_kwh, 3),
                "ct_ratio": 200,
            }
            return out
        if template == "battery":
            power = m.battery_kw
            heat = 24 + 12 * abs(power) / m.battery_max_kw + r.gauss(0, 0.2)
            return {
                "soc": round(m.soc, 1),
                "soh": round(m.soh, 1),
                "p_charge": round(max(-power, 0.0), 2),
                "p_discharge": round(max(power, 0.0), 2),
                "t_cell_max": round(heat * 10),
                "status": status | (4 if self.contactor_closed else 0),
            }
        return {"p_ac": round(m.pv_kw * 10), "e_total": round(m.pv_kwh, 3), "status": status}

    # Commands ------------------------------------------------------------------------------

    def answer(self, topic: str, payload: bytes, now: float) -> list[Outgoing]:
        """The signed ACK of a command, or nothing for one the plant does not trust."""
        if topic != self.filters[0]:
            return []
        received = datetime.fromtimestamp(now, UTC)
        try:
            command = _decode(payload)
            if not isinstance(command, dict):
                raise SourceError("wrong_type", "a command is a JSON object")
            self._signer.verify(command)
            self._guard.check_time(unix_ms(command), received)
            cmd_id = command.get("cmdId")
            if not isinstance(cmd_id, str):
                raise SourceError("missing_field", "no cmdId")
            self._guard.check_and_remember(cmd_id, received, "this cmdId")
        except (msgspec.DecodeError, SourceError):
            self.refused += 1
            return []
        self.commands += 1
        reason = self._carry_out(command)
        ack: dict[str, Any] = {"cmdId": cmd_id, "status": "ok" if reason is None else "error"}
        if reason is None:
            self.acked += 1
        else:
            self.errors += 1
            ack["reason"] = reason
        ack["ts"] = int(now * 1000)
        return [self._signed("commands/ack", ack)]

    def _carry_out(self, command: dict[str, Any]) -> str | None:
        """Carry out ``command`` on the model: None when done, else why not."""
        target = command.get("target")
        if target not in DEVICES:
            return f"unknown target {target!r}"
        template = DEVICES[target]
        action = command.get("action")
        known = self._actions.get(template, {})
        if action not in known:
            return f"COMMAND_ACTION_NOT_IN_TEMPLATE: template {template} has no action {action!r}"
        param = known[action]
        if param is None:
            if action == "open_contactor":
                self.contactor_closed = False
                self.model.setpoint_kw = 0.0
            return None  # a reboot: back at once
        payload = command.get("payload")
        value: Any = payload.get(param) if isinstance(payload, dict) else None
        if type(value) not in (int, float) or not math.isfinite(value):
            return f"COMMAND_PARAMS_INVALID: {action} needs a number in payload.{param}"
        if action == "set_power":
            # The model's setpoint discharges when positive; the template's kw charges
            # when negative: the same convention.
            self.contactor_closed = True
            return self.model.hold_power(float(value))
        if action == "set_limit":
            return self.model.limit_pv(float(value))
        return None

    def summary(self) -> str:
        return (
            f"commands: {self.commands} received, {self.acked} ok, {self.errors} error, "
            f"{self.refused} refused (signature, time or replay)"
        )


def site_config(*, plant_id: str, site: str, secret_env: str) -> str:
    """The ``[adapters.cpi]`` configuration of the plant this simulator plays; its secret
    from the environment variable ``secret_env``."""
    key = _encode(plant_id).decode()  # a JSON string is a TOML basic string
    table = f"adapters.cpi.plants.{key}"
    lines = [
        f"# The plant `energybus simulate cpi --plant {plant_id}` plays.",
        f"[{table}]",
        f"site = {_encode(site).decode()}",
        f'secrets = ["${{{secret_env}}}"]',
        f"[{table}.targets]",
        *(f'{t} = {{ template = "{name}" }}' for t, name in DEVICES.items() if t is not None),
    ]
    return "\n".join(lines) + "\n"
