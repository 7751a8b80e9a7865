"""The load generator, a process of its own so that its CPU is counted apart.

Publishes VEN metering messages (10 circuits, 10 loads) on ``volttron/metering`` at QoS 1
at a fixed rate: each message from one of 200 VENs, with its own timestamp (the publish
time, which is what latency is measured from) and new circuit readings. Prints the
number sent, the time it took and its own CPU time as JSON once every publish has its
PUBACK.

    python -m benchmarks.load --port 1883 --rate 1000 --seconds 20 --tag run-1

On a locked-down broker it connects over TLS with a client certificate and logs in
(``--ca``, ``--cert``, ``--key``, ``--username``; the password in the environment,
benchmarks/access.py's ``MQTT_PASSWORD``), as every client of a site would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.access import MQTT_PASSWORD, MqttLogin
from benchmarks.adapters import ven_messages


def template() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(ven_messages(1, circuits=10)[0])
    return body


CHILDREN: list[subprocess.Popen[bytes]] = []
"""Every process a benchmark run started (load generators, workers): ended by
:func:`end_children` however the run ends."""


def end_children() -> None:
    """SIGTERM to every child still running, then SIGKILL to what 30 s did not end."""
    for child in CHILDREN:
        if child.poll() is None:
            child.terminate()
    for child in CHILDREN:
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def paced(
    port: int,
    rate: int,
    seconds: float,
    client_id: str,
    make: Callable[[int], tuple[str, bytes]],
    login: MqttLogin | None = None,
) -> tuple[int, float, float]:
    """Publish ``make(n)`` (a topic and a payload) for n = 0, 1, ... at ``rate`` a second
    for ``seconds``, at QoS 1. Messages sent, the seconds from the first publish to the
    last PUBACK, and the wall-clock time of the first publish."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if login is not None:
        client.tls_set_context(login.context())
        client.username_pw_set(login.username, login.password)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    sent = 0
    started_at = time.time()
    start = time.perf_counter()
    infos = []
    while True:
        now = time.perf_counter()
        if now - start >= seconds:
            break
        due = int((now - start) * rate)
        while sent < due:
            topic, payload = make(sent)
            infos.append(client.publish(topic, payload, qos=1))
            sent += 1
        time.sleep(0.001)
    for info in infos:
        info.wait_for_publish(120)
    elapsed = time.perf_counter() - start
    client.loop_stop()
    client.disconnect()
    return sent, elapsed, started_at


def publish_at(
    port: int, rate: int, seconds: float, tag: str, login: MqttLogin | None = None
) -> tuple[int, float, float]:
    """VEN metering: each message from one of 200 VENs, with its own timestamp and new
    circuit readings."""
    body = template()
    rnd = random.Random(rate)

    def make(n: int) -> tuple[str, bytes]:
        body["venId"] = f"ven-{tag}-{n % 200}"
        body["timestamp"] = time.time()
        for circuit in body["circuits"]:
            circuit["currentKw"] = round(rnd.uniform(0, 8), 3)
        return "volttron/metering", json.dumps(body).encode()

    return paced(port, rate, seconds, f"bench-load-{tag}", make, login)


def start(
    port: int, rate: int, seconds: float, tag: str, login: MqttLogin | None = None
) -> subprocess.Popen[bytes]:
    """This load generator as a process of its own (so its CPU is counted apart); it
    prints its report, one JSON line, on standard output when done."""
    env = dict(os.environ)
    if login is not None:
        env[MQTT_PASSWORD] = login.password
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.load", "--port", str(port), "--rate", str(rate),
         "--seconds", str(seconds), "--tag", tag, *(login.args() if login else [])],
        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent, env=env,
    )  # fmt: skip
    CHILDREN.append(process)
    return process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--ca", type=Path, help="TLS: the CA that signed the broker's certificate")
    parser.add_argument("--cert", type=Path, help="TLS: the client certificate")
    parser.add_argument("--key", type=Path, help="TLS: the client certificate's key")
    parser.add_argument("--username", help=f"the login; its password in ${MQTT_PASSWORD}")
    args = parser.parse_args()
    login = None
    if args.ca is not None:
        if args.cert is None or args.key is None or args.username is None:
            parser.error("--ca goes with --cert, --key and --username")
        password = os.environ.get(MQTT_PASSWORD)
        if password is None:
            parser.error(f"--username needs its password in ${MQTT_PASSWORD}")
        login = MqttLogin(args.ca, args.cert, args.key, args.username, password)
    sent, elapsed, started_at = publish_at(args.port, args.rate, args.seconds, args.tag, login)
    cpu = time.process_time()  # this process's CPU, import and all: it is counted apart
    report = {"sent": sent, "seconds": elapsed, "started_at": started_at, "cpu_seconds": cpu}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
