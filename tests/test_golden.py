"""Golden tests: every adapter's input messages and the exact canonical output.

``tests/golden/<adapter>/<case>.json`` holds adapter options and a list of steps; each
step feeds one message (or runs the command timeout) through the same pipeline the
worker and ``energybus normalize`` use, and lists exactly what must come out
(``energybus.adapters.golden``). After an intended change of output,
``ENERGYBUS_UPDATE_GOLDEN=1 pytest tests/test_golden.py`` rewrites the expectations;
review the diff before committing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from energybus.adapters import golden

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(GOLDEN.glob("*/*.json"))


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_golden(path: Path) -> None:
    golden.check(path)


def test_a_changed_output_names_its_step(tmp_path: Path) -> None:
    case = tmp_path / "ven" / "changed.json"
    case.parent.mkdir()
    text = (GOLDEN / "ven" / "03-bad-input.json").read_text()
    case.write_text(text.replace('"code": "', '"code": "not-', 1))
    with pytest.raises(
        AssertionError,
        match=r"(?s)step 0 \(not JSON\):\nexpected .*not-malformed_json.*\nobserved ",
    ):
        golden.check(case)


def test_every_adapter_has_golden_cases() -> None:
    from energybus.adapters import BUILTIN

    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(BUILTIN)
    for name in BUILTIN:
        assert len(list((GOLDEN / name).glob("*.json"))) >= 3, name
