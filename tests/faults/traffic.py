"""The fault suite's sources and their valid traffic.

Every message is new: its own observation time per device, and for the signed sources
its own signature and id. So the historian's key, the VEN's repeat check and the
replay guards each see a message once, unless a fault repeats it; and a message
broken on purpose (tests/faults/malformed.py) starts from one of these.

The same site configuration drives the worker and the ledger's own translation of what
was sent (tests/faults/ledger.py), so both run the very same adapters and options.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec

from energybus.adapters import Pipeline
from energybus.adapters.signing import Signer
from energybus.worker.config import load_config
from tests.voke import Org

ROOT: Final = Path(__file__).resolve().parents[2]
MAPS: Final = ROOT / "tests" / "maps"
VEN_EXAMPLE: Final[dict[str, Any]] = json.loads(
    (ROOT / "examples" / "ven_metering.json").read_text()
)
PLANT: Final = "plant-1"
"""The CPI plant's id (its topics are ``cpi/plant-1/...``)."""
VOKE_PLANT: Final = "P-1"
MODBUS_DEVICES: Final = {"bat": "test_battery", "meter": "eastron_sdm630"}
"""Two polled devices by map: a battery inverter (tests/maps) and a meter (packaged)."""


def simulated_map(name: str) -> str:
    """What the simulator loads for a map the worker finds by ``name``: the tests' file
    (the worker's ``mapping`` directory), else the packaged map."""
    path = MAPS / f"{name}.toml"
    return str(path) if path.exists() else name


class Doc(NamedTuple):
    """A source message before it is encoded: what malformed inputs are made from."""

    adapter: str
    topic: str
    """The MQTT topic, or for Voke the routing key (``vcp.<org>.event.telemetry``)."""
    document: dict[str, Any]
    signer: Signer | None

    def encode(self) -> bytes:
        return msgspec.json.encode(self.document)

    def resigned(self, document: dict[str, Any]) -> dict[str, Any]:
        """``document`` with a valid signature again (after a change), if the source signs."""
        if self.signer is not None:
            document["sig"] = self.signer.sign(document)
        return document


class Traffic:
    """Makes valid messages of each source; thread-safe, as several senders use it."""

    def __init__(
        self, tag: str, org: Org, cpi_key: str, *, vens: int = 5, devices: int = 10
    ) -> None:
        self.tag = tag
        self.org = org
        self.cpi_key = cpi_key
        self.cpi_signer = Signer([cpi_key])
        self.vens = [f"ven-{tag}-{i}" for i in range(vens)]
        self.devices = [f"B{i}" for i in range(1, devices + 1)]
        self.cpi_site = f"cpi-{tag}"
        self.voke_site = f"voke-{tag}"
        self.modbus_site = f"mb-{tag}"
        self._lock = threading.Lock()
        self._stamps: dict[str, int] = {}
        self._energy: dict[str, float] = {}
        self._random = random.Random(tag)

    @property
    def sites(self) -> list[str]:
        """Every site the traffic reaches (a VEN's site is its kebab-case id)."""
        return [*self.vens, self.cpi_site, self.voke_site, self.modbus_site]

    def stamp(self, key: str) -> int:
        """Now in Unix ms, later than every earlier stamp of ``key``: one device never
        observes twice at the same time."""
        with self._lock:
            ms = max(int(time.time() * 1000), self._stamps.get(key, 0) + 1)
            self._stamps[key] = ms
            return ms

    def _uniform(self, low: float, high: float, digits: int = 1) -> float:
        with self._lock:
            return round(self._random.uniform(low, high), digits)

    def _pick(self, n: int) -> int:
        with self._lock:
            return self._random.randrange(n)

    def ven(self, n: int) -> Doc:
        ven = self.vens[n % len(self.vens)]
        document = copy.deepcopy(VEN_EXAMPLE)
        document["venId"] = ven
        document["timestamp"] = self.stamp(ven) / 1000
        document["usedPowerKw"] = self._uniform(0, 12, 3)
        document["batterySOC"] = self._uniform(10, 95)
        for circuit in document["circuits"]:
            circuit["currentKw"] = self._uniform(0, 5, 3)
            circuit["currentAmps"] = self._uniform(0, 20, 2)
        return Doc("ven", "volttron/metering", document, None)

    def cpi(self, n: int) -> Doc:
        target = self.devices[n % len(self.devices)]
        power = self._uniform(-50, 50)
        document: dict[str, Any] = {
            "ts": self.stamp(f"cpi/{target}"),
            "target": target,
            "values": {
                "soc": self._uniform(10, 90),
                "soh": 97.5,
                "p_charge": max(-power, 0.0),
                "p_discharge": max(power, 0.0),
                "t_cell_max": 200 + self._pick(150),
                "status": self._pick(8),
            },
        }
        document["sig"] = self.cpi_signer.sign(document)
        return Doc("cpi", f"cpi/{PLANT}/telemetry", document, self.cpi_signer)

    def voke(self, n: int) -> Doc:
        device = self.devices[n % len(self.devices)]
        with self._lock:
            energy = self._energy[device] = self._energy.get(device, 10_000.0) + 0.5
        values = {
            "socPct": self._uniform(10, 90),
            "sohPct": 97.5,
            "powerKw": self._uniform(-50, 50),
            "voltageV": self._uniform(700, 800),
            "currentA": self._uniform(-60, 60),
            "cellTempMaxC": self._uniform(20, 35),
            "state": self._pick(5),
            "chargedKwh": energy,
        }
        ts = self.stamp(f"voke/{device}")
        body = self.org.envelope(
            "telemetry", VOKE_PLANT, device, ts, kind="realtime", values=values
        )
        topic = f"vcp.{self.org.slug}.event.telemetry"
        return Doc("voke", topic, msgspec.json.decode(body), self.org.signer)

    def modbus_set(self, n: int) -> Doc:
        """A Profile B setpoint for the battery: only ever sent broken (malformed.py)."""
        document = {
            "value": float(self._pick(6000) - 3000),
            "unit": "W",
            "event_id": f"evt-{self.tag}-{n}",
            "duration_s": 60,
        }
        topic = f"{self.modbus_site}/energy/storage/bat/power_setpoint/set"
        return Doc("modbus", topic, document, None)

    def make(self, adapter: str, n: int) -> Doc:
        makers = {"ven": self.ven, "cpi": self.cpi, "voke": self.voke, "modbus": self.modbus_set}
        return makers[adapter](n)

    # The site configuration ------------------------------------------------------------

    def environ(self) -> dict[str, str]:
        """The secrets the configuration reads from the environment."""
        return {"FAULTS_CPI_KEY": self.cpi_key, **self.org.environ()}

    def adapters_config(self, modbus_ports: dict[str, int]) -> str:
        """The ``[adapters.*]`` tables: VEN (each VEN its own site), a signed CPI plant,
        a Voke org and the two Modbus devices, every device of CPI and Voke a battery."""
        targets = "".join(f'{d} = {{ template = "battery" }}\n' for d in self.devices)
        voke_plant = (
            f"[adapters.voke.orgs.{self.org.slug}.plants.{VOKE_PLANT}]\n"
            f'site = "{self.voke_site}"\n'
            f"[adapters.voke.orgs.{self.org.slug}.plants.{VOKE_PLANT}.targets]\n{targets}"
        )
        # A generous timeout: the simulated devices answer from a thread of the test
        # process, which the senders keep busy; an answer later than the worker waits is
        # no answer to it, yet the simulator counted it as served.
        devices = "".join(
            f'[adapters.modbus.devices.{name}]\nmap = "{path}"\nport = {modbus_ports[name]}\n'
            "interval_s = 0.25\ntimeout_s = 2.0\nretries = 0\noffline_after = 2\n"
            for name, path in MODBUS_DEVICES.items()
        )
        return (
            "[adapters.ven]\n"
            f"[adapters.cpi.plants.{PLANT}]\n"
            f'site = "{self.cpi_site}"\nsecrets = ["${{FAULTS_CPI_KEY}}"]\n'
            f"[adapters.cpi.plants.{PLANT}.targets]\n{targets}"
            f"[adapters.voke]\n{self.org.config(voke_plant)}"
            f'[adapters.modbus]\nsite = "{self.modbus_site}"\nmapping = "{MAPS}"\n'
            f"command_max_age_s = 30\n{devices}"
        )

    def pipelines(self, config: Path) -> dict[str, Pipeline]:
        """The adapters of ``config``, built as the worker builds them: the ledger's
        translation of what was sent."""
        built = load_config(config, environ=self.environ()).built
        return {name: Pipeline(adapter) for name, adapter in built.items()}
