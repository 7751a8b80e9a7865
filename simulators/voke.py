"""Voke ESM, played over RabbitMQ: the VCP wire format from Voke's side.

docs/adapters.md ("Voke ESM partner (`voke`): the VCP wire format") is the format;
``mappings/voke.toml`` names the fields a device of each template sends. The simulator
declares what Voke declares when Voke ESM is enabled for an organisation (the topic
exchange ``vcp`` and seven durable queues, each bound under its own name), publishes
telemetry, status, alarm and execution events, and answers the commands it consumes
from ``vcp.{org}.command``.

Two layers, so that a load generator can use the first without any I/O:

- :class:`VokeMessages` builds signed message bodies for a set of plants whose devices
  follow a small physical model (PV output and load wobble, the battery's state of charge
  follows its power, energy counters only grow), with ``seq`` counted per plant.
- :class:`VokeSimulator` connects, declares (:func:`declare`), publishes telemetry at a
  steady rate with publisher confirms (a count it returns is a count the broker took),
  raises and clears alarms, changes plant modes, and answers commands (``ack``,
  ``nack`` or ``none``) after a delay.

Every plant ``P-1`` .. ``P-N`` is itself a device (``device`` null, template ``plant``)
with three sub-devices: ``B1`` (battery), ``M1`` (meter) and ``P1`` (pv);
:func:`site_config` prints the site configuration that matches. Neither the signing key
nor a password is ever put into a message, an error or a repr; :func:`mask_url` hides a
URL's password.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    DeliveryError,
    PublishError,
)
from pamqp.exceptions import PAMQPException

from energybus.adapters.signing import Signer
from energybus.errors import SourceError

from .plant import PlantModel

__all__ = [
    "ACTIONS",
    "ALARM_CODES",
    "DEVICES",
    "EVENT_TYPES",
    "EXCHANGE",
    "EXECUTION_STATES",
    "INBOUND_TYPES",
    "MODES",
    "Built",
    "Stats",
    "VokeConnectionError",
    "VokeMessages",
    "VokeSimulator",
    "check_org",
    "declare",
    "mask_url",
    "plant_ids",
    "queue_names",
    "routing_key",
    "site_config",
]

EXCHANGE: Final = "vcp"
# Voke -> partner, on vcp.{org}.event.<type>; partner -> Voke, on vcp.{org}.<type>.
EVENT_TYPES: Final = ("telemetry", "status", "alarm", "execution")
INBOUND_TYPES: Final = ("command", "config", "schedule")
# externalId (None: the plant itself) -> device template in mappings/voke.toml.
DEVICES: Final[Mapping[str | None, str]] = {
    None: "plant",
    "B1": "battery",
    "M1": "meter",
    "P1": "pv",
}
# template -> action -> the payload field carrying its value (None: a trigger).
ACTIONS: Final[Mapping[str, Mapping[str, str | None]]] = {
    "plant": {"set_mode": "mode"},
    "battery": {"set_power": "kw", "stop": None},
    "meter": {},
    "pv": {"set_limit": "kw"},
}
MODES: Final = ("AUTO", "MANUAL", "SELF_CONSUMPTION", "BACKUP", "TRADING", "MAINTENANCE")
ALARM_CODES: Final = ("OVERTEMP", "COMM_LOSS", "GRID_FAULT", "BMS_FAULT")
EXECUTION_STATES: Final = ("RECEIVED", "DISPATCHED", "EXECUTING", "COMPLETED", "FAILED", "EXPIRED")
# The alarms each template raises.
_DEVICE_ALARMS: Final[Mapping[str, tuple[str, ...]]] = {
    "plant": ("GRID_FAULT", "COMM_LOSS"),
    "battery": ("OVERTEMP", "BMS_FAULT", "COMM_LOSS"),
    "meter": ("COMM_LOSS",),
    "pv": ("OVERTEMP", "COMM_LOSS"),
}
_ORG: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_BATCH: Final = 500  # telemetry publishes in flight at once, when catching up
# What a broker that is unreachable, refuses the login or goes away raises.
# (aio-pika 9 lets pamqp's errors through, e.g. when the broker refuses the vhost.)
_BROKER_ERRORS: Final = (
    OSError,
    TimeoutError,
    AMQPError,
    ChannelInvalidStateError,
    PAMQPException,
)
_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.Decoder().decode

Answer = Literal["ack", "nack", "none"]
Kind = Literal["realtime", "meter"]


# Names ------------------------------------------------------------------------------------


def check_org(org: str) -> str:
    """``org`` if it is a usable organisation slug (a routing-key word and a TOML bare key:
    letters, digits, ``_`` and ``-``), else ValueError."""
    if not _ORG.fullmatch(org):
        raise ValueError(
            f"org {org!r} must be 1 to 64 letters, digits, '_' or '-' (a routing-key word)"
        )
    return org


def routing_key(*, org: str, type: str) -> str:
    """The routing key, and queue name, of messages of ``type`` for ``org``."""
    if type in EVENT_TYPES:
        return f"vcp.{org}.event.{type}"
    if type in INBOUND_TYPES:
        return f"vcp.{org}.{type}"
    raise ValueError(f"no VCP queue carries {type!r}")


def queue_names(*, org: str) -> list[str]:
    """The seven queues of ``org``: four event queues, then command, config, schedule."""
    return [routing_key(org=org, type=t) for t in (*EVENT_TYPES, *INBOUND_TYPES)]


def plant_ids(count: int) -> list[str]:
    """The simulated plants: ``P-1`` .. ``P-<count>``."""
    if count < 1:
        raise ValueError(f"plants must be at least 1, not {count}")
    return [f"P-{n}" for n in range(1, count + 1)]


def site_config(*, org: str, plants: int | Sequence[str], site: str | None = None) -> str:
    """The site configuration (TOML) of the plants the simulator plays for ``org``:
    ``[adapters.voke.orgs.<org>.plants.<plantId>]`` with ``targets.<externalId> =
    {template}`` per sub-device; the plant's own template is the default, ``plant``."""
    check_org(org)
    ids = plant_ids(plants) if isinstance(plants, int) else list(plants)
    lines = [
        f"# The plants `energybus simulate voke --org {org} --plants {len(ids)}` plays.",
        "# Each plant is itself a device (template plant, the default).",
    ]
    for plant in ids:
        table = f"adapters.voke.orgs.{org}.plants.{plant}"
        lines += ["", f"[{table}]"]
        if site is not None:
            lines.append(f"site = {_toml_string(site)}")
        lines.append(f"[{table}.targets]")
        lines += [
            f'{device} = {{ template = "{template}" }}'
            for device, template in DEVICES.items()
            if device is not None
        ]
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    return _encode(text).decode("utf-8")  # a JSON string is a TOML basic string


_ENCODED: Final = "in a password, / ? # @ and : must be percent-encoded: %2F %3F %23 %40 %3A"


def mask_url(url: str) -> str:
    """``url`` with its password, if any, replaced by ``***``: everything between the
    user name and the last ``@``, so that a password whose ``/``, ``?`` or ``#`` was not
    percent-encoded (which ends the host part early for :func:`urlsplit`) is masked
    whole too."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostport = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{hostport}"


def _with_vhost(url: str, vhost: str | None) -> str:
    """``url`` with ``vhost`` as its path; ValueError, in words that show the URL only
    masked, when it cannot be connected to as it is meant: yarl, under aio-pika, would
    say why in an exception quoting the part at fault, a piece of the password."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"{mask_url(url)} is not an amqp:// or amqps:// URL")
    try:
        parts.port  # noqa: B018 - raises on a port that is no number
    except ValueError:
        raise ValueError(f"{mask_url(url)}: the port must be a number ({_ENCODED})") from None
    if "#" in url or parts.netloc.count("@") > 1 or "@" in parts.path + parts.query:
        raise ValueError(f"{mask_url(url)}: an @ or # outside the user part ({_ENCODED})")
    if vhost is None:
        return url
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


def _vhost_of(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


# The plants' physics ------------------------------------------------------------------------


class _Plant(PlantModel):
    """A plant's model with the fields Voke's devices send (mappings/voke.toml)."""

    def values(self, template: str, kind: Kind) -> dict[str, float | int]:
        r = self.rng
        if kind == "meter":
            if template == "plant":
                return {
                    "importEnergyKwh": round(self.import_kwh, 4),
                    "exportEnergyKwh": round(self.export_kwh, 4),
                }
            if template == "battery":
                return {
                    "chargedKwh": round(self.charged_kwh, 4),
                    "dischargedKwh": round(self.discharged_kwh, 4),
                }
            return {"energyKwh": round(self.load_kwh if template == "meter" else self.pv_kwh, 4)}
        if template == "plant":
            flags = 1 | (2 if self.alarms else 0) | (4 if self.has_alarm("GRID_FAULT") else 0)
            return {
                "gridPowerKw": round(self.grid_kw, 3),
                "reactivePowerKvar": round(0.1 * self.grid_kw + r.gauss(0, 0.2), 3),
                "frequencyHz": round(50 + r.gauss(0, 0.015), 3),
                "statusFlags": flags,
            }
        if template == "battery":
            power = self.battery_kw
            voltage = 360 + 0.6 * self.soc + r.gauss(0, 0.3)
            heat = 15.0 if ("B1", "OVERTEMP") in self.alarms else 0.0
            if self.has_alarm("BMS_FAULT"):
                state = 3
            elif power > 0.05:
                state = 2
            elif power < -0.05:
                state = 1
            else:
                state = 0 if self.setpoint_kw == 0 else 4
            return {
                "socPct": round(self.soc, 2),
                "sohPct": round(self.soh, 2),
                "powerKw": round(power, 3),
                "voltageV": round(voltage, 1),
                "currentA": round(power * 1000 / voltage, 2),
                "cellTempMaxC": round(
                    24 + 12 * abs(power) / self.battery_max_kw + heat + r.gauss(0, 0.2), 1
                ),
                "state": state,
            }
        if template == "meter":
            volts = [230 + r.gauss(0, 1.2) for _ in range(3)]
            out: dict[str, float | int] = {"activePowerKw": round(self.load_kw, 3)}
            for n, v in enumerate(volts, start=1):
                out[f"voltageL{n}V"] = round(v, 1)
            for n, v in enumerate(volts, start=1):
                out[f"currentL{n}A"] = round(self.load_kw * 1000 / 3 / v, 2)
            return out
        alarm = 2 if any(d == "P1" for d, _ in self.alarms) else 0
        return {
            "powerKw": round(self.pv_kw, 3),
            "dcPowerKw": round(self.pv_kw / 0.97, 3),
            "statusFlags": 1 | alarm,
        }


# Messages --------------------------------------------------------------------------------


class Built(NamedTuple):
    """One signed message, ready to publish: its ``type``, envelope ``id`` (the AMQP
    message_id), ``routing_key`` and encoded ``body``."""

    type: str
    id: str
    routing_key: str
    body: bytes


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class VokeMessages:
    """Signed VCP messages from Voke for ``plants`` of ``org``, without I/O.

    ``plants`` is a count (``P-1`` .. ``P-N``) or the plant ids. Each plant follows a
    small model: telemetry advances it to the message's ``ts``, so values move with time
    and energy counters only grow; :meth:`apply` carries out a command. ``seed`` makes the
    values reproducible (ids stay random: they are the receiver's replay keys).
    """

    def __init__(
        self,
        *,
        org: str,
        signing_key: str | bytes,
        plants: int | Sequence[str] = 1,
        seed: int | None = None,
    ) -> None:
        self.org = check_org(org)
        self._signer = Signer([signing_key])
        self._rng = random.Random(seed)
        ids = plant_ids(plants) if isinstance(plants, int) else list(plants)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError("plants must name at least one plant, each once")
        self._plants = {p: _Plant(id=p, rng=self._rng) for p in ids}
        self._seq: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"VokeMessages(org={self.org!r}, plants={len(self._plants)})"  # never the key

    @property
    def plants(self) -> tuple[str, ...]:
        return tuple(self._plants)

    def devices(self) -> list[tuple[str, str | None]]:
        """Every (plant, externalId) pair, the plant itself (None) first in each plant."""
        return [(plant, device) for plant in self._plants for device in DEVICES]

    def seq(self, plant: str) -> int:
        """The ``seq`` of the last message built for ``plant`` (0: none yet)."""
        return self._seq.get(plant, 0)

    def mode(self, plant: str) -> str:
        return self._plant(plant).mode

    def active_alarms(self, plant: str) -> set[tuple[str | None, str]]:
        """(device, code) of the alarms raised and not cleared on ``plant``."""
        return set(self._plant(plant).alarms)

    # builders

    def telemetry(
        self, *, plant: str, device: str | None, ts_ms: int | None = None, kind: Kind = "realtime"
    ) -> Built:
        """A telemetry message of ``device`` (None: the plant): ``realtime`` values, or the
        energy counters for ``kind="meter"``."""
        model = self._plant(plant)
        template = self._template(device)
        ts = _now_ms() if ts_ms is None else ts_ms
        model.advance(ts)
        values = model.values(template, kind)
        return self._build("telemetry", plant, device, ts, {"kind": kind, "values": values})

    def status_answer(
        self,
        *,
        plant: str,
        device: str | None,
        cmd_id: str,
        ack: bool,
        reason: str | None = None,
        ts_ms: int | None = None,
    ) -> Built:
        """The ACK of command ``cmd_id``, or its NACK with ``reason``."""
        fields: dict[str, Any] = {"cmdId": cmd_id, "status": "ACK" if ack else "NACK"}
        if not ack:
            fields["reason"] = reason or "refused"
        return self._build("status", plant, device, _ts(ts_ms), fields)

    def mode_change(self, *, plant: str, mode: str, ts_ms: int | None = None) -> Built:
        """The plant's operating mode changed to ``mode`` (the plant's model follows)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is none of {', '.join(MODES)}")
        self._plant(plant).mode = mode
        fields = {"event": "mode_change", "mode": mode}
        return self._build("status", plant, None, _ts(ts_ms), fields)

    def alarm(
        self,
        *,
        plant: str,
        device: str | None,
        code: str,
        severity: Literal["warning", "critical"],
        active: bool,
        message: str,
        ts_ms: int | None = None,
    ) -> Built:
        """Alarm ``code`` raised (``active``) or cleared on ``device``."""
        if code not in ALARM_CODES:
            raise ValueError(f"alarm code {code!r} is none of {', '.join(ALARM_CODES)}")
        self._template(device)
        alarms = self._plant(plant).alarms
        if active:
            alarms.add((device, code))
        else:
            alarms.discard((device, code))
        fields = {"code": code, "severity": severity, "active": active, "message": message}
        return self._build("alarm", plant, device, _ts(ts_ms), fields)

    def execution(
        self,
        *,
        plant: str,
        device: str | None,
        cmd_id: str,
        state: str,
        reason: str | None = None,
        ts_ms: int | None = None,
    ) -> Built:
        """Command ``cmd_id`` reached ``state`` (RECEIVED ... EXPIRED)."""
        if state not in EXECUTION_STATES:
            raise ValueError(f"state {state!r} is none of {', '.join(EXECUTION_STATES)}")
        fields: dict[str, Any] = {"cmdId": cmd_id, "state": state}
        if reason is not None:
            fields["reason"] = reason
        return self._build("execution", plant, device, _ts(ts_ms), fields)

    # commands

    def apply(self, *, plant: str, device: str | None, action: str, payload: Any) -> str | None:
        """Carry out a command on the model: None when done, else why not (a NACK reason)."""
        model = self._plants.get(plant)
        if model is None:
            return f"unknown_plant: no plant {plant!r} in org {self.org}"
        if device not in DEVICES:
            return f"unknown_target: plant {plant} has no device {device!r}"
        template = DEVICES[device]
        actions = ACTIONS[template]
        if action not in actions:
            return f"COMMAND_ACTION_NOT_IN_TEMPLATE: template {template} has no action {action!r}"
        param = actions[action]
        value: float | None = None
        if param is not None:
            raw = payload.get(param) if isinstance(payload, dict) else None
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
                return f"bad_payload: {action} needs a number in payload.{param}"
            value = float(raw)
        if action == "set_power":
            assert value is not None
            return model.hold_power(value)
        if action == "set_limit":
            assert value is not None
            return model.limit_pv(value)
        if action == "stop":
            model.setpoint_kw = 0.0
        elif action == "set_mode":
            assert value is not None
            if not value.is_integer() or not 0 <= value < len(MODES):
                return f"out_of_range: mode {value:g} is not a mode code 0..{len(MODES) - 1}"
            model.mode = MODES[int(value)]
            if model.mode in ("AUTO", "SELF_CONSUMPTION"):
                model.setpoint_kw = None
        return None

    # internals

    def _plant(self, plant: str) -> _Plant:
        try:
            return self._plants[plant]
        except KeyError:
            raise ValueError(f"no plant {plant!r} (plants: {', '.join(self._plants)})") from None

    @staticmethod
    def _template(device: str | None) -> str:
        try:
            return DEVICES[device]
        except KeyError:
            raise ValueError(f"no device {device!r} (devices: B1, M1, P1, None)") from None

    def _build(
        self, type: str, plant: str, device: str | None, ts: int, fields: Mapping[str, Any]
    ) -> Built:
        seq = self._seq.get(plant, 0) + 1
        self._seq[plant] = seq
        message_id = str(uuid.uuid4())
        body: dict[str, Any] = {
            "v": 1,
            "type": type,
            "id": message_id,
            "org": self.org,
            "plant": plant,
            "device": device,
            "ts": ts,
            "seq": seq,
            **fields,
        }
        body["sig"] = self._signer.sign(body)
        return Built(type, message_id, routing_key(org=self.org, type=type), _encode(body))


def _ts(ts_ms: int | None) -> int:
    return _now_ms() if ts_ms is None else ts_ms


# The broker -------------------------------------------------------------------------------


async def declare(channel: AbstractChannel, *, org: str) -> AbstractExchange:
    """Declare what Voke asserts when Voke ESM is enabled for ``org``: the durable topic
    exchange ``vcp`` and the seven durable queues, each bound under its own name."""
    check_org(org)
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    for name in queue_names(org=org):
        queue = await channel.declare_queue(name, durable=True)
        await queue.bind(exchange, routing_key=name)
    return exchange


@dataclass
class Stats:
    """What a run did. ``published`` counts broker-confirmed messages per type."""

    published: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TYPES, 0))
    commands: int = 0  # messages received on vcp.{org}.command
    acked: int = 0  # answered ACK
    nacked: int = 0  # answered NACK
    unanswered: int = 0  # left unanswered on purpose (answer "none")
    expired: int = 0  # past expires_at when due: execution EXPIRED, no status
    bad_signatures: int = 0  # refused, not answered
    malformed: int = 0  # not a command at all (not JSON, no cmdId ...), not answered
    unroutable: int = 0  # publishes the broker returned or refused (a queue is missing)

    def summary(self) -> str:
        p = self.published
        line = (
            f"published {p['telemetry']} telemetry, {p['status']} status, {p['alarm']} alarm, "
            f"{p['execution']} execution; commands: {self.commands} received, "
            f"{self.acked} ACK, {self.nacked} NACK, {self.unanswered} unanswered, "
            f"{self.expired} expired, {self.bad_signatures} bad signatures"
        )
        if self.malformed:
            line += f", {self.malformed} malformed"
        if self.unroutable:
            line += f"; {self.unroutable} publishes unroutable"
        return line


class VokeConnectionError(RuntimeError):
    """The broker could not be reached, refused the login, or went away. The message names
    the URL with its password masked; ``stats`` is what the run did before."""

    def __init__(self, message: str, stats: Stats) -> None:
        super().__init__(message)
        self.stats = stats


class VokeSimulator:
    """Voke ESM for one organisation on a RabbitMQ broker.

    ``rate`` is telemetry messages per second over all devices, on a steady schedule
    (message k is due ``k / rate`` s after the start, so there is no drift); every
    ``meter_interval_s`` each device's meter reading takes the next slots. An alarm is
    raised every ``alarm_every_s`` and cleared a little later; a plant changes mode every
    ``mode_every_s`` (None: never). Commands are answered after ``answer_delay_s``:
    ``ack`` (RECEIVED, ACK, COMPLETED; a command the model cannot carry out is NACKed),
    ``nack`` (RECEIVED, NACK, FAILED) or ``none`` (no answer, so the sender expires it).
    """

    def __init__(
        self,
        *,
        url: str,
        org: str,
        signing_key: str | bytes,
        vhost: str | None = None,
        plants: int = 1,
        rate: float = 1.0,
        answer: Answer = "ack",
        answer_delay_s: float = 0.5,
        meter_interval_s: float = 60.0,
        alarm_every_s: float | None = 120.0,
        mode_every_s: float | None = 300.0,
        seed: int | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError(f"rate must be a positive number of messages per second, not {rate}")
        if answer not in ("ack", "nack", "none"):
            raise ValueError(f"answer must be ack, nack or none, not {answer!r}")
        for name, value in (
            ("answer_delay_s", answer_delay_s),
            ("meter_interval_s", meter_interval_s),
            ("alarm_every_s", alarm_every_s),
            ("mode_every_s", mode_every_s),
        ):
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, not {value}")
        if not meter_interval_s > 0:
            raise ValueError("meter_interval_s must be > 0")
        self._url = _with_vhost(url, vhost)
        self.url = mask_url(self._url)
        self.vhost = _vhost_of(self._url)
        self.org = check_org(org)
        self._password = urlsplit(self._url).password
        self.messages = VokeMessages(org=org, signing_key=signing_key, plants=plants, seed=seed)
        self._signer = Signer([signing_key])
        self.rate = rate
        self.answer: Answer = answer
        self.answer_delay_s = answer_delay_s
        self.meter_interval_s = meter_interval_s
        self.alarm_every_s = alarm_every_s or None
        self.mode_every_s = mode_every_s or None
        self.connect_timeout_s = connect_timeout_s
        self._rng = random.Random(None if seed is None else seed + 1)
        self.stats = Stats()
        self._exchange: AbstractExchange | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[asyncio.Future[bool]] = set()
        self._failure: BaseException | None = None
        self._failed = asyncio.Event()

    def __repr__(self) -> str:
        return f"VokeSimulator(url={self.url!r}, org={self.org!r})"  # password masked, no key

    # running

    async def run(
        self,
        *,
        stop: asyncio.Event | None = None,
        duration_s: float | None = None,
        count: int | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> Stats:
        """Play Voke until ``stop`` is set, ``duration_s`` has passed or ``count`` telemetry
        messages are confirmed, whichever comes first; what was done. ``on_ready`` is
        called once connected and declared. Raises :class:`VokeConnectionError`."""
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        self.stats = stats = Stats()
        self._failure = None
        self._failed = asyncio.Event()
        stop = stop or asyncio.Event()
        connecting = asyncio.ensure_future(
            aio_pika.connect(self._url, timeout=self.connect_timeout_s)
        )
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():  # stopped while connecting
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            return stats
        try:
            connection = connecting.result()
        except _BROKER_ERRORS as error:
            raise VokeConnectionError(
                f"cannot connect to {self.url}: {self._reason(error)}", stats
            ) from None
        try:
            await self._play(connection, stop, duration_s, count, on_ready)
        except _BROKER_ERRORS as error:
            raise VokeConnectionError(
                f"lost the broker at {self.url}: {self._reason(error)}", stats
            ) from None
        finally:
            await self._cancel_tasks()
            await self._settle()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)
        return stats

    async def _play(
        self,
        connection: AbstractConnection,
        stop: asyncio.Event,
        duration_s: float | None,
        count: int | None,
        on_ready: Callable[[], None] | None,
    ) -> None:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=100)
        self._exchange = await declare(channel, org=self.org)
        commands = await channel.get_queue(routing_key(org=self.org, type="command"))
        await commands.consume(self._on_command)
        if on_ready is not None:
            on_ready()
        workers = [asyncio.create_task(self._telemetry(count), name="telemetry")]
        if self.alarm_every_s is not None:
            workers.append(asyncio.create_task(self._alarms(self.alarm_every_s), name="alarms"))
        if self.mode_every_s is not None:
            workers.append(asyncio.create_task(self._modes(self.mode_every_s), name="modes"))
        waiting = asyncio.create_task(stop.wait(), name="stop")
        failed = asyncio.create_task(self._failed.wait(), name="failed")
        try:
            done, _ = await asyncio.wait(
                [waiting, failed, *workers],
                timeout=duration_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in done:
                if task in workers and not task.cancelled():
                    task.result()  # a worker's failure (the broker went away) is raised
            if self._failure is not None:
                raise self._failure
        finally:
            for task in (waiting, failed, *workers):
                task.cancel()
            await asyncio.gather(waiting, failed, *workers, return_exceptions=True)

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` beside the workers; its failure ends the run."""
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            if self._failure is None:
                self._failure = error
            self._failed.set()

    def _reason(self, error: BaseException) -> str:
        """Why the broker failed us, in words, without the password."""
        args = error.args
        frame = next((a for a in args if hasattr(a, "reply_text")), None)
        if isinstance(error, TimeoutError):
            text = f"no answer within {self.connect_timeout_s:g} s"
        elif frame is not None:  # aio-pika 9: the broker's Connection.Close frame
            text = f"{frame.reply_text} ({frame.reply_code})"
        elif len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
            text = f"{args[1]} ({args[0]})"  # a reply code and text
        else:
            text = str(error).strip() or type(error).__name__
        if "Connection.Close" in text:  # aio-pika 10 names the frame only
            text = (
                f"the broker closed the connection instead of opening vhost {self.vhost!r} "
                "(no such vhost, or the user may not use it)"
            )
        if self._password:
            text = text.replace(self._password, "***")
        return text

    async def _publish(self, built: Built) -> bool:
        """Publish and wait for the broker's confirm; counted when the broker took it.

        The publish outlives the cancellation of its caller (a stop), and a run waits for
        the publishes in flight before it ends, so that what the broker took is counted."""
        task = asyncio.ensure_future(self._confirmed(built))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    async def _confirmed(self, built: Built) -> bool:
        exchange = self._exchange
        assert exchange is not None
        message = aio_pika.Message(
            built.body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=built.id,
            app_id="voke-simulator",
        )
        try:
            await exchange.publish(message, routing_key=built.routing_key, mandatory=True)
        except (PublishError, DeliveryError):
            self.stats.unroutable += 1
            return False
        self.stats.published[built.type] += 1
        return True

    async def _settle(self, timeout_s: float = 5.0) -> None:
        """Wait for the publishes in flight (their confirms), then give up on the rest."""
        pending = list(self._inflight)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)  # retrieved: never logged

    async def _telemetry(self, count: int | None) -> None:
        loop = asyncio.get_running_loop()
        devices = self.messages.devices()
        cycle: Iterator[tuple[str, str | None]] = itertools.cycle(devices)
        readings: deque[tuple[str, str | None]] = deque()
        start = loop.time()
        next_meter = start + self.meter_interval_s
        issued = 0
        published = self.stats.published
        while count is None or published["telemetry"] < count:
            now = loop.time()
            while now >= next_meter:
                if not readings:  # a round still queued is not queued twice
                    readings.extend(devices)
                next_meter += self.meter_interval_s
            due = int((now - start) * self.rate) + 1 - issued
            if count is not None:
                due = min(due, count - published["telemetry"])
            due = min(due, _MAX_BATCH)
            if due > 0:
                batch = []
                for _ in range(due):
                    kind: Kind = "meter" if readings else "realtime"
                    plant, device = readings.popleft() if readings else next(cycle)
                    batch.append(self.messages.telemetry(plant=plant, device=device, kind=kind))
                issued += due
                await asyncio.gather(*(self._publish(b) for b in batch))
                continue
            await asyncio.sleep(max(0.0, start + issued / self.rate - loop.time()))

    async def _alarms(self, every_s: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in itertools.count(1):
            await asyncio.sleep(max(0.0, start + n * every_s - loop.time()))
            self._raise_alarm(every_s)

    def _raise_alarm(self, every_s: float) -> None:
        r = self._rng
        candidates = [
            (plant, device, code)
            for plant, device in self.messages.devices()
            for code in _DEVICE_ALARMS[DEVICES[device]]
            if (device, code) not in self.messages.active_alarms(plant)
        ]
        if not candidates:
            return
        plant, device, code = r.choice(candidates)
        severity: Literal["warning", "critical"] = (
            "critical" if code in ("GRID_FAULT", "BMS_FAULT") or r.random() < 0.3 else "warning"
        )
        where = "the plant" if device is None else device
        text = {
            "OVERTEMP": f"temperature of {where} above its limit",
            "COMM_LOSS": f"no data from {where} for 30 s",
            "GRID_FAULT": "grid voltage out of range at the point of connection",
            "BMS_FAULT": "battery management system reports a fault; the PCS is held",
        }[code]
        clear_after = min(every_s / 2, 30.0) * r.uniform(0.5, 1.0)

        def build(*, active: bool, message: str) -> Built:
            return self.messages.alarm(
                plant=plant,
                device=device,
                code=code,
                severity=severity,
                active=active,
                message=message,
            )

        async def raise_then_clear() -> None:
            await self._publish(build(active=True, message=text))
            await asyncio.sleep(clear_after)
            await self._publish(build(active=False, message=f"cleared: {text}"))

        self._spawn(raise_then_clear())

    async def _modes(self, every_s: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in itertools.count(1):
            await asyncio.sleep(max(0.0, start + n * every_s - loop.time()))
            plant = self._rng.choice(self.messages.plants)
            current = self.messages.mode(plant)
            mode = self._rng.choice([m for m in MODES if m != current])
            await self._publish(self.messages.mode_change(plant=plant, mode=mode))

    # commands

    async def _on_command(self, message: AbstractIncomingMessage) -> None:
        self.stats.commands += 1
        try:
            body = _decode(message.body)
        except msgspec.DecodeError:
            body = None
        if not isinstance(body, dict):
            self.stats.malformed += 1
            await message.ack()
            return
        try:
            self._signer.verify(body)
        except SourceError:
            self.stats.bad_signatures += 1
            await message.ack()
            return
        cmd_id, plant, device = body.get("cmdId"), body.get("plant"), body.get("device")
        if (
            not isinstance(cmd_id, str)
            or not isinstance(plant, str)
            or not (device is None or isinstance(device, str))
        ):
            self.stats.malformed += 1
            await message.ack()
            return
        if self.answer == "none":
            self.stats.unanswered += 1
            await message.ack()
            return
        self._spawn(self._answer(message, body, cmd_id, plant, device))

    async def _answer(
        self,
        message: AbstractIncomingMessage,
        body: dict[str, Any],
        cmd_id: str,
        plant: str,
        device: str | None,
    ) -> None:
        await asyncio.sleep(self.answer_delay_s)
        build = self.messages
        expires_at = body.get("expires_at")
        if isinstance(expires_at, int | float) and _now_ms() > expires_at:
            await self._publish(
                build.execution(plant=plant, device=device, cmd_id=cmd_id, state="EXPIRED")
            )
            self.stats.expired += 1
            await message.ack()
            return
        await self._publish(
            build.execution(plant=plant, device=device, cmd_id=cmd_id, state="RECEIVED")
        )
        reason = self._refusal(body)
        if reason is None and self.answer == "nack":
            reason = "refused by the simulator (answer policy nack)"
        if reason is None:
            action, payload = body.get("action"), body.get("payload")
            assert isinstance(action, str)
            reason = build.apply(plant=plant, device=device, action=action, payload=payload)
        if reason is None:
            await self._publish(
                build.status_answer(plant=plant, device=device, cmd_id=cmd_id, ack=True)
            )
            await self._publish(
                build.execution(plant=plant, device=device, cmd_id=cmd_id, state="COMPLETED")
            )
            self.stats.acked += 1
            if body.get("action") == "set_mode":
                await self._publish(build.mode_change(plant=plant, mode=build.mode(plant)))
        else:
            await self._publish(
                build.status_answer(
                    plant=plant, device=device, cmd_id=cmd_id, ack=False, reason=reason
                )
            )
            await self._publish(
                build.execution(
                    plant=plant, device=device, cmd_id=cmd_id, state="FAILED", reason=reason
                )
            )
            self.stats.nacked += 1
        await message.ack()

    def _refusal(self, body: Mapping[str, Any]) -> str | None:
        if body.get("v") != 1:
            return f"unsupported_version: v {body.get('v')!r}, not 1"
        if body.get("type") != "command":
            return f"not a command: type {body.get('type')!r}"
        if body.get("org") != self.org:
            return f"org_mismatch: {body.get('org')!r} on the queue of {self.org}"
        if body.get("plant") not in self.messages.plants:
            return f"unknown_plant: no plant {body.get('plant')!r} in org {self.org}"
        if not isinstance(body.get("action"), str):
            return "bad_command: action must be a string"
        return None
