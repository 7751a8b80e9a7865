"""The contract's own speed: topic validation, rendering, and CLI start-up.

Each figure is per core: the loops run in one process on one core. Output is one JSON
object per figure, so runs can be compared over time.

    ./dev bench                      # all figures
    ./dev bench --only render        # one of: validate, render, startup, admission, ven, cpi,
                                     # worker, tls, historian, voke, voke-restart,
                                     # modbus-decode, modbus-poll, scale
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from energybus import Message, Renderer, Sample, make_sample, validate_topic


def _rate(loop: Callable[[], int], seconds: float, windows: int = 20) -> float:
    """Throughput of ``loop`` (which returns how many items it did): the best window.

    The best of many short windows is the figure least disturbed by whatever else the
    machine does; the median would measure the neighbours as much as the code.
    """
    rates = []
    for _ in range(windows):
        done = 0
        start = time.perf_counter()
        deadline = start + seconds / windows
        while time.perf_counter() < deadline:
            done += loop()
        rates.append(done / (time.perf_counter() - start))
    return max(rates)


def bench_validate(seconds: float) -> dict[str, object]:
    topics = [
        f"site-{i % 7}/energy/{et}/device-{i}/metric_{i % 13}/value"
        for i, et in zip(
            range(1000), ["source", "storage", "grid", "load", "transfer"] * 200, strict=True
        )
    ]

    def loop() -> int:
        for topic in topics:
            if validate_topic(topic) is not None:
                raise AssertionError(topic)
        return len(topics)

    return {
        "figure": "topics validated per second per core",
        "value": round(_rate(loop, seconds)),
        "goal": 500_000,
    }


def _samples(count: int, series: int, *, shared_time: bool) -> list[Sample]:
    """Samples over ``series`` series whose values change every time (dedupe never hides work).

    With ``shared_time``, the samples of one tick share one datetime object, as the
    samples an adapter makes from one source message do; without, every sample has its own.
    """
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ticks = [t0 + timedelta(seconds=tick) for tick in range(count // series + 1)]
    return [
        make_sample(
            "vad",
            "load",
            f"circuit-{i % series}",
            "active_power",
            1000.0 + i * 0.5,
            observed_at=ticks[i // series] if shared_time else t0 + timedelta(seconds=i // series),
            unit="W",
        )
        for i in range(count)
    ]


class _RenderLoop:
    """Feeds a warm renderer fresh samples: each a change, so each gives ``value`` and ``last``."""

    chunk = 10_000

    def __init__(self, *, shared_time: bool) -> None:
        self.samples = _samples(40 * self.chunk, 100, shared_time=shared_time)
        self.out: list[Message] = []
        self.renderer = Renderer(source="bench")
        self.at = self.chunk
        for sample in self.samples[: self.chunk]:  # warm: topics and meta already built
            self.renderer.render_into(sample, self.out)
        self.rendered = self.messages = 0

    def __call__(self) -> int:
        if self.at + self.chunk > len(self.samples):  # start over so time moves forward
            self.renderer, self.at = Renderer(source="bench"), 0
        render_into, out = self.renderer.render_into, self.out
        out.clear()
        for sample in self.samples[self.at : self.at + self.chunk]:
            render_into(sample, out)
        self.at += self.chunk
        self.rendered += self.chunk
        self.messages += len(out)
        return self.chunk


def bench_render(seconds: float) -> dict[str, object]:
    shared = _RenderLoop(shared_time=True)
    shared_rate = _rate(shared, seconds / 2)
    own = _RenderLoop(shared_time=False)
    own_rate = _rate(own, seconds / 2)
    return {
        "figure": "samples rendered to wire messages per second per core "
        "(100 samples per observation time, as from one source message)",
        "value": round(shared_rate),
        "messages_per_sample": round(shared.messages / shared.rendered, 3),
        "every_sample_its_own_time": round(own_rate),
        "goal": 1_000_000,
    }


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def bench_startup(runs: int) -> dict[str, object]:
    exe = Path(sys.executable).with_name("energybus")
    command = str(exe) if exe.exists() else shutil.which("energybus")
    if command is None:
        raise SystemExit("the energybus console script is not installed")
    topic = "vad/energy/source/pv-roof-1/active_power/value"
    baseline_cmd = [sys.executable, "-c", "import msgspec"]
    validate_cmd = [command, "validate", topic]
    for _ in range(3):  # warm the page cache for both, untimed
        _seconds(baseline_cmd)
        _seconds(validate_cmd)
    # Interleaved, so that both see the same machine state.
    base_times, validate_times = [], []
    for _ in range(runs):
        base_times.append(_seconds(baseline_cmd))
        validate_times.append(_seconds(validate_cmd))
    baseline = statistics.median(base_times)
    validate = statistics.median(validate_times)
    return {
        "figure": "median start-up of `energybus validate <topic>` / `python -c 'import msgspec'`",
        "value": round(validate / baseline, 3),
        "validate_ms": round(validate * 1000, 1),
        "import_msgspec_ms": round(baseline * 1000, 1),
        "runs": runs,
        "goal": 1.5,
    }


def bench_admission(seconds: float) -> dict[str, object]:
    """Microseconds per command through the admission gate (one core): a Profile B set
    with the retained, payload, unit and age checks, then the same with 100 interlock
    rules, every one matching the topic (the worst case a site's table can give)."""
    from energybus.admission import Gate, Interlock

    topic = "vad/energy/storage/battery-main/power_setpoint/set"
    now = datetime.now(UTC)
    payload = json.dumps(
        {"value": 1500, "unit": "W", "observed_at": now.isoformat().replace("+00:00", "Z")}
    ).encode()
    locks = [
        Interlock(filter="+/energy/storage/+/power_setpoint/set", min=-1e6 - i, max=1e6 + i)
        for i in range(100)
    ]

    def per_command(gate: Gate) -> float:
        admit = gate.admit

        def loop() -> int:
            for _ in range(1000):
                admit(topic, payload, retain=False, received_at=now)
            return 1000

        return 1e6 / _rate(loop, seconds / 2)

    return {
        "figure": "admission gate, microseconds per command (Profile B set, one core)",
        "value": round(per_command(Gate()), 2),
        "with_100_interlocks": round(per_command(Gate(interlocks=locks)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        choices=[
            "validate",
            "render",
            "startup",
            "admission",
            "ven",
            "cpi",
            "worker",
            "tls",
            "historian",
            "voke",
            "voke-restart",
            "modbus-decode",
            "modbus-poll",
            "scale",
        ],
    )
    parser.add_argument(
        "--rates",
        default="500,1000,1500,2000,2500",
        help="worker: VEN messages/s to try, comma-separated",
    )
    parser.add_argument(
        "--modes",
        help="worker: which of historian, bus, nodered to run at each rate (default: all);"
        " tls: which of plain, tls (default: both);"
        " voke: which of voke, cpi (default: both);"
        " scale: which of single, shared, members (default: all)",
    )
    parser.add_argument(
        "--drain", type=float, default=60.0, help="worker: seconds to wait for the output"
    )
    parser.add_argument(
        "--out", type=Path, help="also append each figure as a JSON line to this file"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="time per throughput figure")
    parser.add_argument("--runs", type=int, default=41, help="process starts per start-up figure")
    args = parser.parse_args()
    cores = os.cpu_count()
    from benchmarks.adapters import bench_cpi, bench_ven
    from benchmarks.modbus import bench_modbus_decode, bench_modbus_poll
    from benchmarks.scale import bench_scale
    from benchmarks.tls import bench_tls
    from benchmarks.voke import bench_voke, bench_voke_restart
    from benchmarks.worker import bench_historian, bench_worker

    rates = [int(r) for r in args.rates.split(",")]

    figures: dict[str, Callable[[], dict[str, object] | list[dict[str, object]]]] = {
        "validate": lambda: bench_validate(args.seconds),
        "render": lambda: bench_render(args.seconds),
        "startup": lambda: bench_startup(args.runs),
        "admission": lambda: bench_admission(args.seconds),
        "ven": lambda: bench_ven(args.seconds, _rate),
        "cpi": lambda: bench_cpi(args.seconds, _rate),
        "worker": lambda: bench_worker(
            rates,
            4 * args.seconds,
            args.drain,
            (args.modes or "historian,bus,nodered").split(","),
        ),
        "tls": lambda: bench_tls(
            rates, 4 * args.seconds, args.drain, (args.modes or "plain,tls").split(",")
        ),
        "historian": lambda: bench_historian(),
        "voke": lambda: bench_voke(
            rates, 4 * args.seconds, args.drain, (args.modes or "voke,cpi").split(",")
        ),
        "voke-restart": lambda: bench_voke_restart(rates[0], 4 * args.seconds, args.drain),
        "modbus-decode": lambda: bench_modbus_decode(args.seconds, _rate),
        "modbus-poll": lambda: bench_modbus_poll(max(args.seconds, 5.0)),
        "scale": lambda: bench_scale(
            rates,
            4 * args.seconds,
            args.drain,
            (args.modes or "single,shared,members").split(","),
        ),
    }
    for name, run in figures.items():
        if args.only in (None, name):
            result = run()
            for figure in result if isinstance(result, list) else [result]:
                line = json.dumps({"benchmark": name, "machine_cores": cores, **figure})
                print(line, flush=True)
                if args.out is not None:
                    with args.out.open("a") as out:
                        out.write(line + "\n")


if __name__ == "__main__":
    main()
