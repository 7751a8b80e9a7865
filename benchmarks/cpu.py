"""CPU time per component, read from ``/proc``, so that a figure says where the time went.

A component is a process and everything it started: the worker, Mosquitto, the
PostgreSQL server with its backends, Node-RED, the load generator. Its CPU time is the
user and system time of every live process of its tree, plus what each of them has
collected from children that already exited (``cutime``/``cstime``): a PostgreSQL
backend that ends within the window is counted too, in its postmaster's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["Meter", "machine_busy", "own_seconds", "tree_seconds"]

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, list[str]] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return int(rest[1]), rest  # ppid, the fields from state on


def tree_seconds(root: int) -> float:
    """CPU seconds of ``root``'s process tree so far (0 when it is gone)."""
    table: dict[int, tuple[int, list[str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None:
                table[int(entry)] = stat
    if root not in table:
        return 0.0
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    ticks = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        rest = table[pid][1]
        # utime and stime, then cutime and cstime: what the children this process
        # reaped had used (a PostgreSQL backend that ended is in the postmaster's).
        ticks += int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        stack.extend(children.get(pid, ()))
    return ticks / _TICK


def own_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` alone, none of its children's (0 when it is gone): with
    :func:`tree_seconds`, what a process did and what the processes it started did
    (Node-RED, and the energybus processes its flows run)."""
    stat = _stat(pid)
    if stat is None:
        return 0.0
    rest = stat[1]
    return (int(rest[11]) + int(rest[12])) / _TICK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    total = sum(fields[:8])
    return (total - idle) / _TICK, total / _TICK


class Meter:
    """CPU seconds per component between :meth:`start` and :meth:`stop`."""

    def __init__(self, components: Mapping[str, int]) -> None:
        self.components = dict(components)
        self._start: dict[str, float] = {}
        self._machine = (0.0, 0.0)
        self.seconds: dict[str, float] = {}
        self.machine_cores_busy = 0.0

    def start(self) -> None:
        self._start = {name: tree_seconds(pid) for name, pid in self.components.items()}
        self._machine = machine_busy()

    def stop(self, wall: float) -> dict[str, float]:
        """Cores used per component over ``wall`` seconds, and the machine's in all."""
        self.seconds = {
            name: tree_seconds(pid) - self._start[name] for name, pid in self.components.items()
        }
        busy, total = machine_busy()
        cores = os.cpu_count() or 1
        busy0, total0 = self._machine
        self.machine_cores_busy = (busy - busy0) / max(total - total0, 1e-9) * cores
        used = {name: round(s / wall, 3) for name, s in self.seconds.items()}
        used["machine"] = round(self.machine_cores_busy, 3)
        return used
