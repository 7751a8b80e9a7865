"""What ``energybus watch`` shows, built from what it has seen: pure, no I/O.

:class:`Board` takes the messages of the bus (canonical series, dead letters, the
workers' status), the historian's row counts and recent command records, and the
worker's metrics, each as it comes; :func:`render` draws it as lines of text at a
moment, for a terminal (ANSI colours) or a log. Time is always passed in, so the same
state draws the same table, and tests need no clock.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import msgspec

from energybus.commands import FINAL_STATES
from energybus.errors import PayloadError, TopicError
from energybus.payloads import DECODE_ERRORS, Envelope, decode_last, decode_meta, decode_value
from energybus.topics import parse_topic

__all__ = ["Board", "CommandLine", "Entity", "Series", "format_value", "render"]

RATE_WINDOW_S: Final = 10.0
"""Arrivals counted for a series' rate."""
_FIRST: Final = (
    "soc",
    "active_power",
    "power_setpoint",
    "max_charge_power",
    "shed_power",
    "import_power",
    "export_power",
    "charge_power",
    "discharge_power",
    "voltage",
    "voltage_l1",
    "current",
    "frequency",
    "temperature",
)
"""Metrics shown first in an entity's row, when it has them; the rest follow by name."""
_SCALED: Final = frozenset({"W", "Wh", "VA", "var"})
"""Units shown with k or M when large: a site's powers and energies span six decades."""
_dead_letter: Final = msgspec.json.Decoder(dict[str, object])

_RESET: Final = "\x1b[0m"
_STYLES: Final = {
    "bold": "\x1b[1m",
    "dim": "\x1b[2m",
    "green": "\x1b[32m",
    "yellow": "\x1b[33m",
    "red": "\x1b[31m",
}
_STATE_STYLE: Final = {
    "confirmed": "green",
    "sent": "yellow",
    "accepted": "yellow",
    "rejected": "red",
    "expired": "red",
    "refused": "red",
}


@dataclass
class Series:
    """The newest of one series, as the bus said it."""

    value: object = None
    unit: str | None = None
    observed_at: float | None = None
    """Device time of the newest value (Unix seconds), when it carried one."""
    seen_at: float | None = None
    """When the newest live value arrived."""
    source: str | None = None
    states: dict[str, str] | None = None
    availability: str | None = None
    arrivals: deque[float] = field(default_factory=deque)


@dataclass
class Entity:
    site: str
    entity_type: str
    entity_id: str
    series: dict[str, Series] = field(default_factory=dict)

    @property
    def offline(self) -> bool:
        """Whether the worker said a series of it went ``offline`` (it says so for all
        the entity's series at once, when the entity falls silent)."""
        return any(s.availability == "offline" for s in self.series.values())

    @property
    def name(self) -> str:
        return f"{self.site}/{self.entity_type}/{self.entity_id}"

    @property
    def source(self) -> str:
        found = {s.source for s in self.series.values() if s.source}
        return ",".join(sorted(found)) or "?"

    def live(self) -> bool:
        """Whether a value of it arrived live (not only retained from before)."""
        return any(s.seen_at is not None for s in self.series.values())


@dataclass(frozen=True)
class CommandLine:
    """One command record, as the historian has it (``command_logs``)."""

    accepted_at: datetime
    adapter: str
    series: str
    """``site/type/id/metric``."""
    value: object
    state: str
    updated_at: datetime | None = None
    response_status: str | None = None
    why: str | None = None
    """The code and reason of a refusal, rejection or expiry."""


class Board:
    """Everything the view draws, updated piece by piece as it arrives."""

    def __init__(self, *, prefix: str = "energybus") -> None:
        self.prefix = prefix
        self.entities: dict[tuple[str, str, str], Entity] = {}
        self.dead_letters: Counter[tuple[str, str]] = Counter()
        self.last_dead_letter: tuple[float, str, str, str] | None = None
        """(when, source, reason, original topic) of the newest dead letter."""
        self.workers: dict[str, str] = {}
        self.first_value_at: float | None = None
        """When the first live canonical value arrived."""
        self.rows: dict[str, int] | None = None
        self.commands: list[CommandLine] = []
        self.metric_samples: dict[str, float] = {}
        """The worker's newest metrics, ``name{label="value",...}`` to value."""
        self._scrapes: deque[tuple[float, dict[str, float]]] = deque()
        self.source_rates: dict[str, float] = {}
        """Source messages per second, per adapter, over the scrapes of the last
        :data:`RATE_WINDOW_S`."""
        self.problems: dict[str, str] = {}
        """What could not be read (``database``, ``metrics``, ``bus``), in one line each."""

    # The bus ------------------------------------------------------------------------------

    def message(self, topic: str, payload: bytes, *, retain: bool, at: float) -> None:
        """One message from the bus, received at ``at`` (Unix seconds). Anything that is
        not what it claims to be is skipped: the view shows, it does not judge."""
        prefix = self.prefix + "/"
        if topic.startswith(prefix):
            self._own(topic[len(prefix) :], payload, at)
            return
        try:
            parsed = parse_topic(topic)
        except TopicError:
            return
        key = (parsed.site, parsed.entity_type, parsed.entity_id)
        entity = self.entities.get(key)
        if entity is None:
            entity = self.entities[key] = Entity(*key)
        stream = parsed.stream
        if stream == "set":
            return
        series = entity.series.get(parsed.metric)
        if series is None:
            series = entity.series[parsed.metric] = Series()
        if stream == "availability":
            series.availability = payload.decode("utf-8", "replace")
            return
        try:
            if stream == "meta":
                meta = decode_meta(payload)
                series.unit = meta.unit if meta.unit is not None else series.unit
                series.source = meta.source
                states = (meta.attributes or {}).get("states")
                if isinstance(states, str):
                    pairs = (item.strip().partition("=") for item in states.split(","))
                    series.states = {code: name for code, _, name in pairs}
            elif stream == "last":
                last = decode_last(payload)
                if series.observed_at is None or last.observed_at.timestamp() >= (
                    series.observed_at
                ):
                    series.value = last.value
                    series.observed_at = last.observed_at.timestamp()
                    series.unit = last.unit or series.unit
            elif stream == "value" and not retain:
                decoded = decode_value(payload)
                if isinstance(decoded, Envelope):
                    series.value = decoded.value
                    if decoded.observed_at is not None:
                        series.observed_at = decoded.observed_at.timestamp()
                else:
                    series.value = decoded
                series.seen_at = at
                series.arrivals.append(at)
                while series.arrivals and series.arrivals[0] < at - RATE_WINDOW_S:
                    series.arrivals.popleft()
                if self.first_value_at is None:
                    self.first_value_at = at
        except PayloadError:
            return

    def _own(self, rest: str, payload: bytes, at: float) -> None:
        kind, _, name = rest.partition("/")
        if kind == "dead_letter":
            try:
                letter = _dead_letter.decode(payload)
            except DECODE_ERRORS:  # nested past what the decoder follows, too
                letter = {}
            reason = str(letter.get("reason", "?"))
            self.dead_letters[(name, reason)] += 1
            self.last_dead_letter = (at, name, reason, str(letter.get("topic", "")))
        elif kind == "worker" and name.endswith("/status"):
            self.workers[name.removesuffix("/status")] = payload.decode("utf-8", "replace")

    # The historian and the worker ---------------------------------------------------------

    def set_rows(self, rows: dict[str, int]) -> None:
        self.rows = dict(rows)
        self.problems.pop("database", None)

    def set_commands(self, commands: list[CommandLine]) -> None:
        self.commands = list(commands)
        self.problems.pop("database", None)

    def set_metrics(self, samples: dict[str, float], *, at: float) -> None:
        """The worker's metrics at ``at``, as ``name{label="value",...}`` to value (the
        Prometheus text format's sample names). Source rates are taken over the scrapes
        of the last :data:`RATE_WINDOW_S`, since sources report every few seconds."""
        self.problems.pop("metrics", None)
        self.metric_samples = samples
        scrapes = self._scrapes
        scrapes.append((at, samples))
        while len(scrapes) > 2 and scrapes[1][0] <= at - RATE_WINDOW_S:
            scrapes.popleft()
        since, before = scrapes[0]
        if at <= since:
            return
        self.source_rates = {
            _label(name, "adapter"): max(0.0, value - before.get(name, 0.0)) / (at - since)
            for name, value in samples.items()
            if name.startswith("energybus_messages_in_total{")
        }

    def problem(self, part: str, text: str) -> None:
        self.problems[part] = text

    # Questions ------------------------------------------------------------------------------

    def sources(self) -> set[str]:
        """The adapters whose series have had a live value."""
        return {
            s.source
            for e in self.entities.values()
            for s in e.series.values()
            if s.source and s.seen_at is not None
        }

    def total(self, metric: str) -> dict[str, float]:
        """A counter of the worker's metrics summed per value of its first label."""
        out: dict[str, float] = {}
        for name, value in self.metric_samples.items():
            if name.startswith(metric + "{"):
                label = name[len(metric) + 1 :].partition("=")[0]
                key = _label(name, label)
                out[key] = out.get(key, 0.0) + value
        return out

    def command_states(self) -> dict[str, str]:
        """The newest command's state per series (``site/type/id/metric``)."""
        out: dict[str, str] = {}
        for line in sorted(self.commands, key=lambda c: c.accepted_at):
            out[line.series] = line.state
        return out


def _label(sample: str, label: str) -> str:
    marker = f'{label}="'
    start = sample.find(marker)
    if start < 0:
        return ""
    start += len(marker)
    return sample[start : sample.find('"', start)]


# Drawing ----------------------------------------------------------------------------------


def format_value(value: object, unit: str | None, states: dict[str, str] | None = None) -> str:
    """A value for people: booleans as on/off, state codes by name, W and Wh with k or M
    when large, at most four significant digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if not isinstance(value, int | float):
        return str(value)
    if states is not None:
        code = str(int(value)) if float(value).is_integer() else str(value)
        if code in states:
            return states[code]
    if not math.isfinite(value):
        return str(value)
    suffix = ""
    if unit in _SCALED:
        for step, prefix in ((1e6, "M"), (1e3, "k")):
            if abs(value) >= step:
                value, suffix = value / step, prefix
                break
    text = f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
    if unit:
        return f"{text} {suffix}{unit}"
    return text


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _values(entity: Entity, room: int) -> str:
    """As many of the entity's newest values as fit in ``room``, the most telling first,
    then how many more it has."""
    order = sorted(
        (item for item in entity.series.items() if item[1].value is not None),
        key=lambda item: (_FIRST.index(item[0]) if item[0] in _FIRST else len(_FIRST), item[0]),
    )
    parts = [f"{m} {format_value(s.value, s.unit, s.states)}" for m, s in order]
    for shown in range(len(parts), 0, -1):
        rest = len(parts) - shown
        text = "  ".join(parts[:shown]) + (f"  +{rest}" if rest else "")
        if len(text) <= room:
            return text
    return parts[0][:room] if parts else ""


def _style(text: str, style: str | None, color: bool) -> str:
    if not color or style is None:
        return text
    return f"{_STYLES[style]}{text}{_RESET}"


def render(
    board: Board,
    now: float,
    *,
    width: int = 120,
    color: bool = False,
    title: str = "energybus watch",
    notes: list[str] | None = None,
    max_commands: int = 8,
) -> list[str]:
    """The view at ``now`` (Unix seconds) as lines at most ``width`` wide (ANSI codes
    aside): the entities with their newest values, age and rate, then the sources, the
    historian, the dead letters and the newest commands."""
    width = max(width, 60)
    lines: list[str] = []
    clock = datetime.fromtimestamp(now).strftime("%H:%M:%S")
    workers = ", ".join(f"{name} {status}" for name, status in sorted(board.workers.items()))
    head = f"{title}  {clock}" + (f"  worker {workers}" if workers else "")
    lines.append(_style(head[:width], "bold", color))
    lines.extend(note[:width] for note in notes or [])
    lines.append("")

    name_w = max([len(e.name) for e in board.entities.values()] + [6])
    name_w = min(name_w, width // 3)
    source_w = max([len(e.source) for e in board.entities.values()] + [6])
    fixed = name_w + source_w + 7 + 8 + 8 + 5
    room = max(20, width - fixed)
    header = (
        f"{'ENTITY':<{name_w}}  {'SOURCE':<{source_w}}  {'VALUES':<{room}}  {'AGE':>6}  {'RATE':>6}"
    )
    lines.append(_style(header[:width], "bold", color))
    for key in sorted(board.entities):
        entity = board.entities[key]
        if not any(s.value is not None for s in entity.series.values()):
            continue
        newest = max(
            (s.observed_at or s.seen_at or 0.0 for s in entity.series.values()), default=0.0
        )
        age = now - newest if newest else None
        arrivals = sum(
            sum(1 for t in s.arrivals if t >= now - RATE_WINDOW_S) for s in entity.series.values()
        )
        rate = f"{arrivals / RATE_WINDOW_S:.1f}/s"
        offline = entity.offline
        line = (
            f"{entity.name[:name_w]:<{name_w}}  {entity.source:<{source_w}}  "
            f"{_values(entity, room):<{room}}  {_age(age):>6}  {rate:>6}"
        )
        if offline:
            line = f"{line}  offline"
        stale = age is None or age > 60
        lines.append(_style(line, "red" if offline else "dim" if stale else None, color))
    if not board.entities:
        lines.append("(no canonical series yet)")

    lines.append("")
    totals = board.total("energybus_messages_in_total")
    rates = "  ".join(
        f"{adapter} {board.source_rates.get(adapter, 0.0):.1f} msg/s ({count:,.0f} in)"
        for adapter, count in sorted(totals.items())
    )
    lines.append(f"{_style('sources', 'bold', color)}    {rates or '-'}")
    if board.rows is not None:
        rows = "  ".join(f"{table} {count:,}" for table, count in board.rows.items())
        lines.append(f"{_style('historian', 'bold', color)}  {rows}")
    dead = sum(board.dead_letters.values())
    text = f"{dead} seen"
    if board.metric_samples:
        rejected = sum(board.total("energybus_rejections_total").values())
        text += f", {rejected:,.0f} refusals counted by the worker"
    if dead:
        worst = ", ".join(
            f"{source} {reason} x{count}"
            for (source, reason), count in board.dead_letters.most_common(4)
        )
        text += f": {worst}"
        if board.last_dead_letter is not None:
            at, _, _, topic = board.last_dead_letter
            text += f"; newest {_age(now - at)} ago, from {topic}"
    lines.append(
        f"{_style('dead letters', 'bold', color)}  "
        + _style(text[: width - 14], "red" if dead else None, color)
    )
    for part, problem in sorted(board.problems.items()):
        lines.append(_style(f"{part}: {problem}"[:width], "red", color))

    lines.append("")
    lines.append(_style("commands (newest first)", "bold", color))
    if not board.commands:
        lines.append("(none yet)")
    recent = sorted(board.commands, key=lambda c: c.accepted_at, reverse=True)[:max_commands]
    series_w = max([len(c.series) for c in recent] + [6])
    for command in recent:
        took = ""
        if command.state in FINAL_STATES and command.updated_at is not None:
            took = f"in {(command.updated_at - command.accepted_at).total_seconds():.1f}s"
        answer = command.response_status or ""
        detail = command.why or answer
        site, entity_type, entity_id, metric = (command.series.split("/") + [""] * 4)[:4]
        target = board.entities.get((site, entity_type, entity_id))
        series = target.series.get(metric) if target is not None else None
        value = format_value(command.value, series.unit if series else None)
        state = _style(f"{command.state:<9}", _STATE_STYLE.get(command.state), color)
        line = (
            f"{command.accepted_at.strftime('%H:%M:%S')}  {command.adapter:<6}  "
            f"{command.series:<{series_w}}  {value:>8}  {state}  {took:>8}  {detail}"
        )
        lines.append(line)
    return lines
