"""The worker on locked-down services, with exactly the rights of docs/security.md.

Every connection is TLS with verification: both MQTT connections with a client
certificate and a password, PostgreSQL with ``sslmode=verify-full`` as the writer role,
RabbitMQ over ``amqps`` as a Voke partner with the documented permissions. The ACL, the
roles and the permissions are read from docs/security.md itself, so the document is
what is tested. The simulators play the platforms over TLS too, and every secret they
and the worker were given is searched for in everything they printed, the metrics and
the dead letters.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest

from energybus.simulators.voke import declare
from tests.docs.markdown import ROOT, blocks
from tests.helpers import wait_until
from tests.security.secrets import assert_no_secret, no_traceback
from tests.workers import ENERGYBUS, Collector, Login, WorkerProcess, execute, publish, query
from tools import services
from tools.pki import Pki
from tools.services import Service

pytestmark = pytest.mark.services

DOC = ROOT / "docs" / "security.md"
SITE = "plant-a"
OTHER_SITE = "plant-b"  # a site the worker's ACL does not give it

# Known secrets, with the characters that change under URL-encoding and base64.
SECRETS = {
    "worker MQTT password": "wrk pw/+=&%?#:@1",
    "platform MQTT password": "plt pw/+=&%?#:@2",
    "writer database password": "wrt pw/+=&%?#:@3",
    "owner database password": "own pw/+=&%?#:@4",
    "reader database password": "rdr pw/+=&%?#:@5",
    "Voke API key": "vk-api/+=&%?#:@6",
    "Voke platform password": "vk-plt/+=&%?#:@7",
    "Voke signing key": "vk-sign/+=&%?#:@8",
    "CPI secret": "cpi-sec/+=&%?#:@9",
}


def document_file(name: str) -> str:
    """The content docs/security.md gives for the file ``name``."""
    for block in blocks(DOC):
        if block.file == name:
            return block.text
    raise AssertionError(f"docs/security.md shows no file {name}")


def rabbitmq_permissions() -> tuple[str, str, str]:
    """configure, write, read of the documented ``rabbitmqctl set_permissions``."""
    for block in blocks(DOC):
        for line in block.text.splitlines():
            if line.startswith("rabbitmqctl set_permissions"):
                words = line.split()
                return tuple(w.strip("'") for w in words[-3:])  # type: ignore[return-value]
    raise AssertionError("docs/security.md shows no rabbitmqctl set_permissions")


def _dsn(postgres: Service, user: str, password: str, ca: Path) -> str:
    return (
        f"postgresql://{user}:{quote(password, safe='')}@{postgres.host}:{postgres.port}"
        f"/energybus?sslmode=verify-full&sslrootcert={ca}"
    )


@dataclass
class Site:
    """The locked-down services, set up as docs/security.md says."""

    mosquitto: Service
    postgres: Service
    rabbitmq: Service
    pki: Pki
    admin: Login
    platform: Login
    writer_dsn: str
    reader_dsn: str
    owner_dsn: str
    init_output: str


@pytest.fixture(scope="module")
def site(
    secure_mosquitto: Service, secure_postgres: Service, secure_rabbitmq: Service, pki: Pki
) -> Site:
    admin_password = services.credentials(secure_mosquitto)["admin"]
    users = {
        "admin": admin_password,
        "energybus-worker": SECRETS["worker MQTT password"],
        "platform": SECRETS["platform MQTT password"],
    }
    acl = (
        document_file("worker.acl")
        + "\nuser admin\ntopic readwrite #\n"
        + "\nuser platform\ntopic readwrite volttron/#\ntopic readwrite ven/#\n"
        + "topic readwrite cpi/#\n"
    )
    services.mosquitto_users(secure_mosquitto, users, acl)

    superuser = _dsn(
        secure_postgres, "energybus", services.credentials(secure_postgres)["energybus"], pki.ca
    )
    execute(superuser, document_file("roles.sql"))
    for role, secret in (
        ("energybus_owner", "owner database password"),
        ("energybus_writer", "writer database password"),
        ("energybus_reader", "reader database password"),
    ):
        execute(superuser, f"ALTER ROLE {role} PASSWORD '{SECRETS[secret]}'")
    owner = _dsn(secure_postgres, "energybus_owner", SECRETS["owner database password"], pki.ca)
    init = subprocess.run(
        [
            *ENERGYBUS,
            *("historian", "init"),
            *("--writer", "energybus_writer", "--reader", "energybus_reader"),
        ],
        env={**os.environ, "ENERGYBUS_DSN": owner},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr

    services.rabbitmq_tenants(
        secure_rabbitmq,
        {
            "acme": (SECRETS["Voke API key"], "acme"),
            "voke": (SECRETS["Voke platform password"], "acme"),
        },
        permissions={"acme": rabbitmq_permissions()},
    )  # as _voke_partner, before the Site exists
    asyncio.run(_declare_voke(secure_rabbitmq, pki))
    client = (pki.ca, pki.client_cert, pki.client_key)
    return Site(
        mosquitto=secure_mosquitto,
        postgres=secure_postgres,
        rabbitmq=secure_rabbitmq,
        pki=pki,
        admin=Login("admin", admin_password, *client),
        platform=Login("platform", SECRETS["platform MQTT password"], *client),
        writer_dsn=_dsn(
            secure_postgres, "energybus_writer", SECRETS["writer database password"], pki.ca
        ),
        reader_dsn=_dsn(
            secure_postgres, "energybus_reader", SECRETS["reader database password"], pki.ca
        ),
        owner_dsn=owner,
        init_output=init.stdout + init.stderr,
    )


async def _declare_voke(rabbitmq: Service, pki: Pki) -> None:
    """The exchange and queues Voke makes when ESM is enabled for ``acme``, made as the
    platform (the partner may not create them)."""
    connection = await aio_pika.connect(
        host=rabbitmq.host,
        port=rabbitmq.port,
        login="voke",
        password=SECRETS["Voke platform password"],
        virtualhost="acme",
        ssl=True,
        ssl_context=ssl.create_default_context(cafile=str(pki.ca)),
    )
    async with connection:
        await declare(await connection.channel(), org="acme")


def worker_config(path: Path, site: Site, metrics_port: int) -> Path:
    """The demo's site on ``plant-a``, every connection locked down; one CPI plant
    reports about ``plant-b``, which the worker's ACL does not give it."""
    pki = site.pki
    path.write_text(
        f"""
[worker]
data_dir = "{path.parent / "data"}"
metrics_port = {metrics_port}
shutdown_timeout_s = 20

[mqtt]
host = "{site.mosquitto.host}"
port = {site.mosquitto.port}
client_id = "energybus"
username = "energybus-worker"
password = "${{EB_MQTT_PASSWORD}}"
reconnect_min_s = 0.2
reconnect_max_s = 2
session_expiry_s = 120
ingest_session_expiry_s = 120

[mqtt.tls]
ca_file = "{pki.ca}"
cert_file = "{pki.client_cert}"
key_file = "{pki.client_key}"

[historian]
dsn = "${{EB_WRITER_DSN}}"
batch_interval_s = 0.05
retry_s = 0.5

[adapters.ven]
site = "{SITE}"

[adapters.cpi.plants.PLANT-1]
site = "{SITE}"
secrets = ["${{ENERGYBUS_CPI_SECRET}}"]
[adapters.cpi.plants.PLANT-1.targets]
B1 = {{ template = "battery", entity_id = "cpi-battery" }}

[adapters.cpi.plants.PLANT-2]
site = "{OTHER_SITE}"
secrets = ["${{ENERGYBUS_CPI_SECRET}}"]
[adapters.cpi.plants.PLANT-2.targets]
B1 = {{ template = "battery", entity_id = "cpi-battery" }}

[adapters.voke.orgs.acme]
uri = "amqps://{site.rabbitmq.host}:{site.rabbitmq.port}"
vhost = "acme"
api_key = "${{EB_VOKE_API_KEY}}"
signing_keys = ["${{ENERGYBUS_VOKE_SIGNING_KEY}}"]
ca_file = "{pki.ca}"
[adapters.voke.orgs.acme.plants.P-1]
site = "{SITE}"
[adapters.voke.orgs.acme.plants.P-1.targets]
B1 = {{ template = "battery", entity_id = "voke-battery" }}
"""
    )
    return path


def environ(site: Site) -> dict[str, str]:
    return {
        **os.environ,
        "EB_MQTT_PASSWORD": SECRETS["worker MQTT password"],
        "EB_WRITER_DSN": site.writer_dsn,
        "EB_VOKE_API_KEY": SECRETS["Voke API key"],
        "ENERGYBUS_VOKE_SIGNING_KEY": SECRETS["Voke signing key"],
        "ENERGYBUS_CPI_SECRET": SECRETS["CPI secret"],
        "ENERGYBUS_MQTT_PASSWORD": SECRETS["platform MQTT password"],
    }


def tls_options(site: Site) -> list[str]:
    pki = site.pki
    return [
        "--host",
        site.mosquitto.host,
        "--port",
        str(site.mosquitto.port),
        "--username",
        "platform",
        "--ca-file",
        str(pki.ca),
        "--cert-file",
        str(pki.client_cert),
        "--key-file",
        str(pki.client_key),
    ]


class Simulator:
    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*ENERGYBUS, "simulate", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def text(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        """Its exit status; killed (and -9) when SIGINT does not end it in 30 s, so that
        no simulator outlives its test."""
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def counted(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def stored(dsn: str, site_name: str, device: str) -> int:
    rows = query(
        dsn,
        "SELECT count(*) FROM energybus.measurements WHERE site = $1 AND device_id = $2",
        site_name,
        device,
    )
    return int(rows[0][0])


def test_the_worker_works_with_exactly_the_documented_rights_over_tls(
    site: Site, tmp_path: Path
) -> None:
    metrics_port = services.free_port()
    config = worker_config(tmp_path / "site.toml", site, metrics_port)
    env = environ(site)
    voke_url = (
        f"amqps://voke:{quote(SECRETS['Voke platform password'], safe='')}"
        f"@{site.rabbitmq.host}:{site.rabbitmq.port}/acme?cafile={site.pki.ca}"
    )
    simulators = {
        "ven": Simulator(
            ["ven", "--interval", "0.5", *tls_options(site)], tmp_path / "ven.log", env
        ),
        "cpi": Simulator(
            ["cpi", "--plant", "PLANT-1", "--interval", "0.5", *tls_options(site)],
            tmp_path / "cpi.log",
            env,
        ),
        "cpi-2": Simulator(
            ["cpi", "--plant", "PLANT-2", "--interval", "0.5", *tls_options(site)],
            tmp_path / "cpi-2.log",
            env,
        ),
        "voke": Simulator(
            ["voke", "--org", "acme", "--url", voke_url, "--rate", "5", "--answer-delay", "0"],
            tmp_path / "voke.log",
            env,
        ),
    }
    collector = Collector(site.mosquitto, ["+/energy/#", "energybus/#"], login=site.admin)
    worker = WorkerProcess(config, tmp_path / "worker.log", env=env)
    try:
        worker.start()
        worker.wait_for_log("acme: connected to", timeout=60)
        for device in ("load.ven-1", "storage.cpi-battery", "storage.voke-battery"):
            wait_until(
                functools.partial(stored, site.reader_dsn, SITE, device),
                60,
                f"rows of {device}, read as the reader role",
            )
        # The publishes about plant-b are refused by the broker, counted, and said once.
        failures = 'energybus_publish_failures_total{reason="0x87"}'
        wait_until(lambda: counted(metrics(metrics_port), failures) > 0, 30, "a refusal counted")
        wait_until(
            lambda: "refused a publish on plant-b/energy/" in worker.text(), 10, "the refusal said"
        )
        wait_until(
            lambda: stored(site.reader_dsn, OTHER_SITE, "storage.cpi-battery") > 0,
            20,
            "the refused samples' rows, still stored",
        )
        # A refusal is final: once plant-b stops reporting and what it sent is handled,
        # the count stops too (no resend makes it grow by itself).
        assert simulators.pop("cpi-2").stop() == 0
        steady: list[float] = []

        def settled() -> bool:
            time.sleep(0.5)  # three reads 1 s apart alike: what plant-b sent is handled
            steady.append(counted(metrics(metrics_port), failures))
            return len(steady) >= 3 and steady[-1] == steady[-3]

        wait_until(settled, 30, "the refusals to end with plant-b's reports")
        time.sleep(3)
        assert counted(metrics(metrics_port), failures) == steady[-1]
        # Commands through the rights: each set is read from the bus and written to its
        # plant (an MQTT topic of the ACL, the vcp exchange of the Voke permissions), and
        # the plant's signed answer read back.
        for entity in ("cpi-battery", "voke-battery"):
            set_topic = f"{SITE}/energy/storage/{entity}/power_setpoint/set"
            publish(site.mosquitto, [(set_topic, b"-1500")], login=site.admin)
            wait_until(
                functools.partial(
                    query,
                    site.reader_dsn,
                    "SELECT 1 FROM energybus.command_logs WHERE state = 'confirmed'"
                    " AND entity_id = $1 AND site = $2",
                    entity,
                    SITE,
                ),
                30,
                f"the command to {entity} confirmed",
            )
        # A refused message: dead-lettered through the ACL, with nothing secret in it.
        publish(site.mosquitto, [("cpi/PLANT-1/telemetry", b"{not json")], login=site.platform)
        wait_until(
            lambda: any(t == "energybus/dead_letter/cpi" for t in collector.topics()),
            20,
            "the dead letter",
        )
        # A retained set is refused and deleted at the broker, through the ACL's sets.
        retained = f"{SITE}/energy/storage/cpi-battery/power_setpoint/set"
        publish(site.mosquitto, [(retained, b"-1200")], login=site.admin, retain=True)
        worker.wait_for_log(f"clearing the retained set on {retained}")

        def deleted() -> bool:
            probe = Collector(site.mosquitto, [retained], login=site.admin)
            try:
                time.sleep(0.5)  # a retained message comes at once with the subscription
                return not probe.payloads(retained)
            finally:
                probe.close()

        wait_until(deleted, 20, "the retained set deleted at the broker")
        page = metrics(metrics_port)
        assert counted(page, failures) == steady[-1]  # the deletion was not refused
        assert worker.alive()
    finally:
        outputs = dict(simulators)
        codes = {name: sim.stop() for name, sim in outputs.items()}
        code = worker.stop() if worker.alive() else None
        collector.close()
    assert code == 0 and set(codes.values()) == {0}, (code, codes)
    assert not any(t.startswith(f"{OTHER_SITE}/") for t in collector.topics())
    assert any(t.startswith(f"{SITE}/energy/") for t in collector.topics())
    assert worker.text().count("refused a publish on") == 1
    printed = {
        "worker log": worker.text(),
        "metrics": page,
        "dead letters": "\n".join(
            payload.decode(errors="replace")
            for topic, payload, _ in collector.messages
            if topic.startswith("energybus/")
        ),
        "historian init": site.init_output,
        **{f"simulate {name}": sim.text() for name, sim in outputs.items()},
    }
    assert_no_secret(printed, SECRETS)
    no_traceback(printed.values())


def test_the_plan_and_the_errors_of_a_configuration_show_no_secret(
    site: Site, tmp_path: Path
) -> None:
    config = worker_config(tmp_path / "site.toml", site, services.free_port())
    env = environ(site)
    outputs: dict[str, str] = {}
    plan = subprocess.run(
        [*ENERGYBUS, "check", "--config", str(config)], env=env, capture_output=True, text=True
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "historian" in plan.stdout
    outputs["check"] = plan.stdout + plan.stderr
    # Errors next to each secret: a wrong type, an unknown key, a variable not set.
    text = config.read_text()
    broken = {
        "wrong type beside the password": text.replace(
            'username = "energybus-worker"', "username = 7"
        ),
        "unknown key beside the API key": text.replace(
            'vhost = "acme"', 'vhost = "acme"\napi_secret = "${EB_VOKE_API_KEY}"'
        ),
        "unset variable": text.replace("${EB_WRITER_DSN}", "${EB_NOT_SET}"),
        "a secret where a number goes": text.replace(
            "batch_interval_s = 0.05", 'batch_interval_s = "${EB_MQTT_PASSWORD}"'
        ),
    }
    good = config.read_text()
    for what, content in broken.items():
        config.write_text(content)
        for command in ("check", "run"):
            result = subprocess.run(
                [*ENERGYBUS, command, "--config", str(config)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode != 0, (what, command)
            outputs[f"{command}: {what}"] = result.stdout + result.stderr
    config.write_text(good)
    # The adapters' own refusals, from a configuration that holds the secrets: a
    # forged signature, and a command signed for a plant.
    for adapter, topic, payload, printed in (
        ("cpi", "cpi/PLANT-1/telemetry", '{"device":"B1","ts":1,"sig":"forged"}', "bad_signature"),
        ("cpi", f"{SITE}/energy/storage/cpi-battery/power_setpoint/set", "-1000", "cpi/PLANT-1"),
        ("voke", "vcp.acme.event.telemetry", '{"v":1,"org":"acme","sig":"x"}', "error: "),
    ):
        result = subprocess.run(
            [
                *(*ENERGYBUS, "normalize", "--adapter", adapter),
                *("--config", str(config), "--topic", topic, "--", payload),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs[f"normalize {adapter} {topic}"] = result.stdout + result.stderr
        assert printed in result.stdout + result.stderr, result.stdout + result.stderr
    watch = subprocess.run(
        [
            *(*ENERGYBUS, "watch", "--once", "--settle", "1"),
            *("--mqtt", f"{site.mosquitto.host}:{site.mosquitto.port}"),
            *("--dsn", site.reader_dsn, *tls_options(site)[4:]),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert watch.returncode == 0, watch.stdout + watch.stderr
    outputs["watch"] = watch.stdout + watch.stderr
    assert_no_secret(outputs, SECRETS)
    no_traceback(outputs.values())
    json.dumps(outputs)  # every output is text


def _failed_logins(postgres: Service, role: str) -> int:
    log = Path(postgres.run_dir) / "postgres" / "postgres.log"
    return log.read_text(errors="replace").count(
        f'password authentication failed for user "{role}"'
    )


def _refused_logins(mosquitto: Service) -> int:
    log = Path(mosquitto.run_dir) / "mosquitto" / "mosquitto.log"
    return log.read_text(errors="replace").count("disconnected, not authorised")


def test_a_wrong_broker_password_is_said_once_and_tried_again_with_backoff(
    site: Site, tmp_path: Path
) -> None:
    """The broker's users are not changed under a connecting client (Mosquitto 2.0's
    reload can fail then): the worker is given a wrong password instead."""
    config = worker_config(tmp_path / "site.toml", site, services.free_port())
    wrong = "another password entirely"
    env = {**environ(site), "EB_MQTT_PASSWORD": wrong}
    worker = WorkerProcess(config, tmp_path / "worker.log", env=env)
    before = _refused_logins(site.mosquitto)
    with (tmp_path / "worker.log").open("ab") as out:
        worker.process = subprocess.Popen(
            [*ENERGYBUS, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        worker.wait_for_log("bus: cannot connect: broker refused the connection: 0x87")
        worker.wait_for_log("source: cannot connect: broker refused the connection: 0x87")
        time.sleep(4)
        # Two connections, each from 0.2 s doubling up to 2 s: some 5 tries each in 4 s
        # (20 each without backoff).
        tries = _refused_logins(site.mosquitto) - before
        assert 4 <= tries <= 16, tries
        assert worker.alive()
    finally:
        code = worker.stop()
    assert code == 0
    text = worker.text()
    assert text.count("bus: cannot connect") == 1  # said once, however many tries
    assert text.count("source: cannot connect") == 1
    assert_no_secret({"worker log": text}, {**SECRETS, "the wrong password": wrong})
    no_traceback([text])


def test_wrong_passwords_are_said_retried_with_backoff_and_recovered_from(
    site: Site, tmp_path: Path
) -> None:
    """The worker starts with a database and a Voke account that refuse its passwords:
    each says so in one line and is tried again, the database ever less often; once the
    passwords are taken, it connects by itself and what it received meanwhile is
    stored."""
    superuser = _dsn(
        site.postgres, "energybus", services.credentials(site.postgres)["energybus"], site.pki.ca
    )
    execute(superuser, "ALTER ROLE energybus_writer PASSWORD 'another password entirely'")
    _voke_partner(site, "another password entirely")
    config = worker_config(tmp_path / "site.toml", site, services.free_port())
    env = environ(site)
    worker = WorkerProcess(config, tmp_path / "worker.log", env=env)
    ven = Simulator(["ven", "--interval", "0.2", *tls_options(site)], tmp_path / "ven.log", env)
    try:
        worker.start()
        worker.wait_for_log("voke org acme: cannot connect to")
        _voke_partner(site, SECRETS["Voke API key"])
        worker.wait_for_log("voke org acme: connected to", timeout=60)
        worker.wait_for_log(
            "historian: the database refused the worker (InvalidPasswordError: password"
            ' authentication failed for user "energybus_writer")'
        )
        # Backoff: from retry_s (0.5 s) doubling, about 4 tries in 8 s, not 16.
        first = _failed_logins(site.postgres, "energybus_writer")
        time.sleep(8)
        tries = _failed_logins(site.postgres, "energybus_writer") - first
        assert 1 <= tries <= 6, tries
        execute(
            superuser,
            f"ALTER ROLE energybus_writer PASSWORD '{SECRETS['writer database password']}'",
        )
        worker.wait_for_log("historian connected", timeout=90)
        wait_until(
            lambda: stored(site.reader_dsn, SITE, "load.ven-1") > 0, 30, "the VEN's rows stored"
        )
        assert worker.alive()
    finally:
        ven.stop()
        code = worker.stop() if worker.alive() else None
        _voke_partner(site, SECRETS["Voke API key"])
        execute(
            superuser,
            f"ALTER ROLE energybus_writer PASSWORD '{SECRETS['writer database password']}'",
        )
    assert code == 0
    text = worker.text()
    assert text.count("the database refused the worker") == 1
    assert text.count("voke org acme: cannot connect to") == 1
    printed = {"worker log": text, "simulate ven": ven.text()}
    assert_no_secret(printed, {**SECRETS, "the wrong password": "another password entirely"})
    no_traceback(printed.values())


def _voke_partner(site: Site, api_key: str) -> None:
    """The Voke organisation's account, with ``api_key`` as its password, and the
    platform's, on the vhost ``acme``; the partner with the documented permissions."""
    services.rabbitmq_tenants(
        site.rabbitmq,
        {"acme": (api_key, "acme"), "voke": (SECRETS["Voke platform password"], "acme")},
        permissions={"acme": rabbitmq_permissions()},
    )


def test_a_database_certificate_from_another_ca_is_refused_in_one_line(
    site: Site, tmp_path: Path
) -> None:
    config = worker_config(tmp_path / "site.toml", site, services.free_port())
    env = environ(site)
    env["EB_WRITER_DSN"] = site.writer_dsn.replace(str(site.pki.ca), str(site.pki.other_ca))
    worker = WorkerProcess(config, tmp_path / "worker.log", env=env).start()
    ven = Simulator(["ven", "--interval", "0.2", *tls_options(site)], tmp_path / "ven.log", env)
    try:
        worker.wait_for_log("historian unreachable (SSLCertVerificationError")
        assert worker.alive()
    finally:
        ven.stop()
        code = worker.stop()
    assert code == 0
    line = next(x for x in worker.text().splitlines() if "historian unreachable" in x)
    assert "certificate verify failed" in line, line
    assert_no_secret({"worker log": worker.text()}, SECRETS)
    no_traceback([worker.text()])
