"""The Node-RED examples (examples/node-red) in a real Node-RED: deploying them, and the
throughput of the two that run ``energybus normalize``.

    ./dev bench --only nodered-exec --rates 5,10,20
    ./dev bench --only nodered-stream --rates 250,500,1000

Mosquitto and Node-RED start afresh under ``.run/bench`` (Node-RED from
``tools/nodered.py``, with this interpreter's ``energybus`` first on its ``PATH``). At
each rate the flow (``1-exec`` or ``2-stream``) is deployed with a site of the run's own
(``examples/node-red/site.toml`` with its site replaced), and the load generator
(``benchmarks/load.py``, a process of its own) publishes VEN metering messages (10
circuits, 10 loads: 48 samples each) at the rate for ``--seconds``. Every message gives
one retained ``soc/last`` of its battery; a subscriber counts them, and the latency of
each is from the message's timestamp (its publish time) to its arrival. Then the run
waits for the output to drain, at most ``--drain`` seconds (or until nothing moved for
10 s past half of that), and only then is anything missing counted as lost.

CPU is read from ``/proc`` over the run: Node-RED's own process, the energybus
processes its flow started (all that Node-RED's process tree used beyond Node-RED
itself: the exec flow's short-lived processes once reaped, the stream flow's two
long-running ones), Mosquitto, the load generator (its own report) and the subscriber
(this process); and the machine's in all, so that what other processes took of it
(``elsewhere``) is seen too.

The tests (tests/test_nodered_examples.py) deploy the same flow files through
:func:`deploy_example`, so what is measured here is what is tested there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.cpu import Meter, own_seconds, tree_seconds
from benchmarks.load import start as start_load
from benchmarks.nodered import deploy
from benchmarks.worker import RUN, _BusMeter, _percentiles, _wait_drained, fresh_services
from tools import nodered, services

__all__ = [
    "BENCHMARKS",
    "EXAMPLES",
    "FLOWS",
    "bench_flow",
    "deploy_example",
    "node_red_env",
    "running_node_red",
    "site_config",
]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "node-red"
FLOWS = {
    "exec": EXAMPLES / "1-exec" / "flow.json",
    "stream": EXAMPLES / "2-stream" / "flow.json",
    "publish": EXAMPLES / "3-publish" / "flow.json",
    "validate": EXAMPLES / "4-validate" / "flow.json",
}
BENCHMARKS = {"nodered-exec": "exec", "nodered-stream": "stream"}
DEFAULT_RATES = {"exec": "5,10,20", "stream": "250,500,1000"}
CPI_SECRET_ENV = "CPI_SECRET"
"""The variable examples/node-red/site.toml reads its CPI plant's secret from."""


def node_red_env(cpi_secret: str) -> dict[str, str]:
    """What Node-RED adds to its environment for the examples: ``energybus`` from this
    interpreter's environment first on ``PATH`` (the flows run it by name), and the CPI
    plant's secret that the site configuration names."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"PATH": path, CPI_SECRET_ENV: cpi_secret}


def site_config(path: Path, site: str) -> Path:
    """``examples/node-red/site.toml`` written to ``path`` with ``site`` for its own."""
    text = (EXAMPLES / "site.toml").read_text()
    if text.count('site = "home"') != 2:
        raise ValueError("examples/node-red/site.toml no longer names its site 'home' twice")
    path.write_text(text.replace('site = "home"', f'site = "{site}"'))
    return path


def deploy_example(
    url: str,
    name: str,
    *,
    mqtt_port: int,
    site: str,
    client_id: str,
    config: Path | None = None,
) -> None:
    """Deploy the example flow ``name`` (a key of :data:`FLOWS`) as its file says, with
    its placeholders filled: the broker's port, the MQTT client id, the site (3-publish,
    4-validate) and the site configuration (1-exec, 2-stream)."""
    values = {"CONFIG": str(config)} if config is not None else None
    deploy(
        url,
        mqtt_port=mqtt_port,
        site=site,
        client_id=client_id,
        path=FLOWS[name],
        values=values,
    )


@contextmanager
def running_node_red(
    run_dir: Path, cpi_secret: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Node-RED on a free port with its userDir under ``run_dir``, set up to run the
    examples (:func:`node_red_env`); stopped, with what its flows started, on exit."""
    process, url = nodered.start_nodered(
        run_dir, services.free_port(), env=node_red_env(cpi_secret)
    )
    try:
        yield process, url
    finally:
        nodered.stop_nodered(process)


def _run_one(
    kind: str,
    rate: int,
    seconds: float,
    drain: float,
    mqtt: services.Service,
    node_red: tuple[subprocess.Popen[bytes], str],
) -> dict[str, object]:
    process, url = node_red
    site = f"nr-{kind}-{rate}-{int(time.time()) % 100000}"
    config = site_config(RUN / f"{site}.toml", site)
    deploy_example(url, kind, mqtt_port=mqtt.port, site=site, client_id=site, config=config)
    with _BusMeter(mqtt.port, site) as meter:
        load = start_load(mqtt.port, rate, seconds, site)
        cpu = Meter({"broker": mqtt.pid})
        cpu.start()
        node_red_own = own_seconds(process.pid)
        node_red_all = tree_seconds(process.pid)
        meter_cpu = time.process_time()
        started = time.monotonic()
        out, _ = load.communicate(timeout=seconds + 180)
        report = json.loads(out)
        sent, published = int(report["sent"]), float(report["seconds"])
        drained, waited = _wait_drained(lambda: meter.count, sent, drain, quiet=10.0)
        wall = time.monotonic() - started
        cores = cpu.stop(wall)
        own = own_seconds(process.pid) - node_red_own
        children = tree_seconds(process.pid) - node_red_all - own
        cores["nodered"] = round(own / wall, 3)
        cores["energybus"] = round(children / wall, 3)
        cores["load_generator"] = round(float(report["cpu_seconds"]) / wall, 3)
        cores["meter"] = round((time.process_time() - meter_cpu) / wall, 3)
        # The machine is shared: what the rest of it used is not this flow's.
        ours = sum(v for k, v in cores.items() if k != "machine")
        cores["elsewhere"] = round(max(cores["machine"] - ours, 0.0), 3)
        latency = _percentiles(meter.latencies)
        on_bus = meter.count
        span = meter.last_arrival - float(report["started_at"])
    config.unlink()
    lost = max(sent - on_bus, 0)
    return {
        "figure": "VEN metering messages through a Node-RED example flow, Mosquitto in to"
        " canonical out",
        "flow": FLOWS[kind].parent.name,
        "target_messages_per_second": rate,
        "messages_sent": sent,
        "messages_per_second": round(sent / published),
        "delivered_messages_per_second": round(on_bus / span, 1) if span > 0 else None,
        "drained_s": round(waited, 2) if drained else None,
        "not_drained_after_s": None if drained else round(waited, 1),
        "lost_messages": lost,
        "p50_s": latency[0],
        "p99_s": latency[1],
        "cores": cores,
        "cpu_ms_per_message": {
            "nodered": round(own / max(on_bus, 1) * 1000, 3),
            "energybus": round(children / max(on_bus, 1) * 1000, 3),
        },
        "sustained": bool(drained and lost == 0 and latency[1] is not None and latency[1] < 1.0),
    }


def bench_flow(
    kind: str, rates: list[int], seconds: float, drain: float
) -> list[dict[str, object]]:
    """Each rate in turn through the example flow ``kind`` (``exec`` or ``stream``), on a
    Mosquitto and a Node-RED started for the benchmark."""
    mqtt = fresh_services("mosquitto")["mosquitto"]
    results: list[dict[str, object]] = []
    try:
        with running_node_red(RUN, "bench-cpi-secret") as node_red:
            for rate in rates:
                results.append(_run_one(kind, rate, seconds, drain, mqtt, node_red))
                print(json.dumps({"benchmark": f"nodered-{kind}", **results[-1]}), file=sys.stderr)
    finally:
        services.stop("mosquitto", run_dir=RUN)
    return results


def selected(argv: list[str]) -> bool:
    """Whether ``./dev bench``'s arguments ask for one of these benchmarks."""
    return any(a in argv for a in BENCHMARKS) and "--only" in argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(BENCHMARKS), required=True)
    parser.add_argument("--rates", help="VEN messages/s to offer, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load per rate")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds to wait for output")
    parser.add_argument("--out", type=Path, help="also append each figure to this file")
    args = parser.parse_args(argv)
    kind = BENCHMARKS[args.only]
    rates = [int(r) for r in (args.rates or DEFAULT_RATES[kind]).split(",")]
    for figure in bench_flow(kind, rates, args.seconds, args.drain):
        line = json.dumps({"benchmark": args.only, "machine_cores": os.cpu_count(), **figure})
        print(line, flush=True)
        if args.out is not None:
            with args.out.open("a") as out:
                out.write(line + "\n")
