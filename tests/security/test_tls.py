"""TLS to the broker refused for each reason it should be, each said in one line that a
person can act on: a broker certificate from another CA or expired, a client
certificate expired or missing, a wrong password. As the MQTT commands say it (the same
client as the worker's, worker/bus.py), and for the broker's expired certificate as the
client itself says it."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from pathlib import Path

import pytest

from energybus.worker.bus import BusClient, BusError
from tests.security.secrets import assert_no_secret, no_traceback
from tests.workers import ENERGYBUS
from tools import services
from tools.pki import Pki
from tools.services import Service

pytestmark = pytest.mark.services

PASSWORD = "tls-test pw/+=&%?#:@0"


@pytest.fixture(scope="module")
def broker(secure_mosquitto: Service) -> Service:
    admin = services.credentials(secure_mosquitto)["admin"]
    services.mosquitto_users(
        secure_mosquitto,
        {"admin": admin, "tester": PASSWORD},
        "user admin\ntopic readwrite #\n"
        "user tester\ntopic readwrite ven/#\ntopic readwrite volttron/#\n",
    )
    return secure_mosquitto


def _simulate(
    broker: Service, *tls: str, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *ENERGYBUS,
            *("simulate", "ven", "--duration", "0.5", "--interval", "0.2"),
            *("--host", broker.host, "--port", str(broker.port), "--username", "tester"),
            *tls,
        ],
        env={**os.environ, "ENERGYBUS_MQTT_PASSWORD": password},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_simulator_logs_in_over_tls_with_its_certificate(broker: Service, pki: Pki) -> None:
    done = _simulate(
        broker,
        *("--ca-file", str(pki.ca), "--cert-file", str(pki.client_cert)),
        *("--key-file", str(pki.client_key)),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ready" in done.stdout and "published" in done.stdout
    assert_no_secret({"simulate": done.stdout + done.stderr}, {"password": PASSWORD})


# With TLS 1.3 the client has finished its handshake before the broker checks its
# certificate: the broker's alert arrives after, and a reset may overtake it. Either way
# the line says what is wrong.
_CLIENT_CERTIFICATE = "does it want a client certificate, or another one?"


@pytest.mark.parametrize(
    ("case", "said"),
    [
        ("another CA", ("TLS: the broker's certificate was refused: self-signed certificate in",)),
        (
            "no client certificate",
            (
                "TLS: the other side refused the handshake (tlsv13 alert certificate required)",
                _CLIENT_CERTIFICATE,
            ),
        ),
        (
            "expired client certificate",
            (
                "TLS: the other side refused the handshake (sslv3 alert certificate expired)",
                _CLIENT_CERTIFICATE,
            ),
        ),
        ("wrong password", ("broker refused the connection: 0x87 not authorized",)),
        ("plain TCP", ("(a port that takes TLS only? configure TLS)",)),
    ],
)
def test_each_refusal_is_one_line_that_says_why(
    broker: Service, pki: Pki, case: str, said: tuple[str, ...]
) -> None:
    client = ("--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key))
    expired = (
        *("--cert-file", str(pki.expired_client_cert)),
        *("--key-file", str(pki.expired_client_key)),
    )
    options = {
        "another CA": ("--ca-file", str(pki.other_ca), *client),
        "no client certificate": ("--ca-file", str(pki.ca)),
        "expired client certificate": ("--ca-file", str(pki.ca), *expired),
        "wrong password": ("--ca-file", str(pki.ca), *client),
        "plain TCP": (),
    }[case]
    password = "not the password" if case == "wrong password" else PASSWORD
    refused = _simulate(broker, *options, password=password)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error    cannot connect to"), refused.stderr
    assert any(words in lines[0] for words in said), lines[0]
    # The password it was given: the wrong one, in the case of a wrong password.
    assert_no_secret({"simulate": refused.stdout + refused.stderr}, {"password": password})
    no_traceback([refused.stdout, refused.stderr])


def test_a_broker_with_an_expired_certificate_is_refused(pki: Pki) -> None:
    """A TLS listener presenting the expired server certificate (a broker's is replaced
    by a listener of the test's own: no broker starts with an expired certificate)."""

    async def main() -> str:
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(pki.expired_server_cert, pki.expired_server_key)
        server = await asyncio.start_server(
            lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context
        )
        port = server.sockets[0].getsockname()[1]
        client = BusClient(on_message=lambda m: None, on_puback=lambda t, r: None)
        try:
            await client.connect(
                host="127.0.0.1",
                port=port,
                client_id="expired",
                tls=ssl.create_default_context(cafile=str(pki.ca)),
                timeout=5,
            )
        except BusError as error:
            return str(error)
        finally:
            server.close()
        raise AssertionError("connected to a broker with an expired certificate")

    said = asyncio.run(main())
    assert said == "TLS: the broker's certificate was refused: certificate has expired"


def test_a_certificate_file_that_cannot_be_used_is_a_usage_error(
    broker: Service, pki: Pki, tmp_path: Path
) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    refused = _simulate(broker, "--ca-file", str(garbage))
    assert refused.returncode == 2
    assert "--ca-file" in refused.stderr and "cannot use it" in refused.stderr
    no_traceback([refused.stdout, refused.stderr])
