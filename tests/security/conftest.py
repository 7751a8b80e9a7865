"""The locked-down services of docs/security.md (``secure_mosquitto``, ``secure_postgres``
and ``secure_rabbitmq``, from tests/conftest.py) and their certificates."""

from __future__ import annotations

import pytest

from tools import services
from tools.pki import Pki
from tools.services import Service


@pytest.fixture(scope="session")
def pki(secure_mosquitto: Service) -> Pki:
    return services.pki_of(secure_mosquitto)
