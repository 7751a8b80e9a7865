"""Shared fixtures: real services on loopback, started once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools import services

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Under the checkout's .run, not /tmp: service users must be able to reach it.
    path = ROOT / ".run" / f"tests-{tmp_path_factory.getbasetemp().name}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def mosquitto(run_dir: Path) -> Iterator[services.Service]:
    with services.started("mosquitto", run_dir=run_dir) as service:
        yield service


@pytest.fixture(scope="session")
def postgres(run_dir: Path) -> Iterator[services.Service]:
    with services.started("postgres", run_dir=run_dir) as service:
        yield service


@pytest.fixture(scope="session")
def rabbitmq(run_dir: Path) -> Iterator[services.Service]:
    with services.started("rabbitmq", run_dir=run_dir) as service:
        yield service


# The same services locked down (tools/services.py's secure mode): TLS only, generated
# passwords (services.credentials), certificates from services.pki_of. A run directory
# of their own, as a plain and a secure service never share one.
@pytest.fixture(scope="session")
def secure_mosquitto(run_dir: Path) -> Iterator[services.Service]:
    with services.started("mosquitto", run_dir=run_dir / "secure", secure=True) as service:
        yield service


@pytest.fixture(scope="session")
def secure_postgres(run_dir: Path) -> Iterator[services.Service]:
    with services.started("postgres", run_dir=run_dir / "secure", secure=True) as service:
        yield service


@pytest.fixture(scope="session")
def secure_rabbitmq(run_dir: Path) -> Iterator[services.Service]:
    with services.started("rabbitmq", run_dir=run_dir / "secure", secure=True) as service:
        yield service
