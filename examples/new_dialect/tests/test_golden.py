"""The adapter's golden cases: ``tests/golden/acme/*.json``, run as energybus runs its own."""

from pathlib import Path

import pytest

from energybus.adapters import golden

CASES = sorted((Path(__file__).parent / "golden").glob("*/*.json"))


@pytest.mark.parametrize("path", CASES, ids=[path.stem for path in CASES])
def test_golden(path: Path) -> None:
    golden.check(path)
