"""The locked-down services of docs/security.md, started once for this suite: Mosquitto
with TLS only, client certificates, passwords and an ACL; PostgreSQL with SSL and
scram-sha-256 only; RabbitMQ with TLS only and no guest (tools/services.py, secure)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import services
from tools.pki import Pki
from tools.services import Service


@pytest.fixture(scope="session")
def secure_dir(run_dir: Path) -> Path:
    return run_dir / "secure"


@pytest.fixture(scope="session")
def secure_mosquitto(secure_dir: Path) -> Iterator[Service]:
    with services.started("mosquitto", run_dir=secure_dir, secure=True) as service:
        yield service


@pytest.fixture(scope="session")
def secure_postgres(secure_dir: Path) -> Iterator[Service]:
    with services.started("postgres", run_dir=secure_dir, secure=True) as service:
        yield service


@pytest.fixture(scope="session")
def secure_rabbitmq(secure_dir: Path) -> Iterator[Service]:
    with services.started("rabbitmq", run_dir=secure_dir, secure=True) as service:
        yield service


@pytest.fixture(scope="session")
def pki(secure_mosquitto: Service) -> Pki:
    return services.pki_of(secure_mosquitto)
