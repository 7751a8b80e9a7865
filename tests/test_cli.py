"""The CLI as Node-RED and people use it: the installed ``energybus`` executable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import energybus
from tests.helpers import run_python

GOOD = "vad/energy/source/pv-roof-1/active_power/value"
BAD = "vad/energy/source/PV_Roof/active_power/value"


def energybus_exe() -> str:
    beside = Path(sys.executable).with_name("energybus")
    found = str(beside) if beside.exists() else shutil.which("energybus")
    assert found, "the energybus console script is not installed"
    return found


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [energybus_exe(), *args], input=stdin, capture_output=True, text=True, timeout=30
    )


def test_all_valid_exits_0() -> None:
    result = run("validate", GOOD, "vad/energy/storage/battery-main/soc/last")
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"ok       {GOOD}",
        "ok       vad/energy/storage/battery-main/soc/last",
    ]


def test_human_report_points_at_the_level() -> None:
    result = run("validate", GOOD, BAD)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[1] == f"invalid  {BAD}"
    caret = lines[2]
    assert caret.index("^") == len("invalid  ") + BAD.index("PV_Roof")
    assert caret.count("^") == len("PV_Roof")
    assert "e.g. 'pv-roof'" in lines[3] and "[not_kebab_case]" in lines[3]


def test_json_lines() -> None:
    result = run("validate", "--json", GOOD, BAD)
    assert result.returncode == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[0] == {"topic": GOOD, "valid": True, "error": None}
    assert records[1] == {
        "topic": BAD,
        "valid": False,
        "error": {
            "code": "not_kebab_case",
            "segment": "entity_id",
            "message": "entity_id 'PV_Roof' must be kebab-case (a-z, 0-9, single '-'), "
            "e.g. 'pv-roof'",
        },
    }


def test_stdin_topics_in_argument_order() -> None:
    result = run("validate", "--json", "a/b", "-", GOOD, stdin=f"{BAD}\r\n\n{GOOD}\n")
    topics = [json.loads(line)["topic"] for line in result.stdout.splitlines()]
    assert topics == ["a/b", BAD, GOOD, GOOD]
    assert result.returncode == 1


def test_payload_is_checked_against_the_stream() -> None:
    ok = run("validate", "--json", "--payload", "3245.7", GOOD)
    assert ok.returncode == 0
    bad = run("validate", "--json", "--payload", '{"value":1,"quality":"ok"}', GOOD)
    assert bad.returncode == 1
    error = json.loads(bad.stdout)["error"]
    assert (error["code"], error["segment"], error["path"]) == (
        "invalid_value",
        "payload",
        "$.quality",
    )
    last = run("validate", "--payload", "3.5", "vad/energy/storage/b/soc/last")
    assert last.returncode == 1 and "payload:" in last.stdout
    avail = run("validate", "--payload", "online", "vad/energy/storage/b/soc/availability")
    assert avail.returncode == 0


@pytest.mark.parametrize("args", [(), ("validate",), ("validate", "--bogus", GOOD), ("nope",)])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    assert run(*args).returncode == 2


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"energybus, version {energybus.__version__}"


def test_validate_imports_no_driver() -> None:
    """Node-RED's exec node starts a process per message: validate must stay light."""
    code = (
        "import sys\n"
        "from energybus.cli import main\n"
        "try:\n"
        f"    main(['validate', '{GOOD}'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "heavy = {'asyncpg', 'aiomqtt', 'aio_pika', 'pymodbus', 'pydantic', 'paho', 'aiormq'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    assert run_python(code).strip().splitlines()[-1] == "[]"


def test_invalid_utf8_is_reported_not_crashed_on() -> None:
    bad = b"vad/energy/load/\xff/p/value\n"
    for args in (("validate", "--json", "-"), ("validate", "-")):
        result = subprocess.run(
            [energybus_exe(), *args], input=bad, capture_output=True, timeout=30
        )
        assert result.returncode == 1, result.stderr
        assert b"invalid_utf8" in result.stdout
        assert b"\\xff" in result.stdout
    record = json.loads(
        subprocess.run(
            [energybus_exe(), "validate", "--json", "-"], input=bad, capture_output=True, timeout=30
        ).stdout
    )
    assert record["topic"] == "vad/energy/load/\\xff/p/value"
    assert record["error"]["message"] == "topic is not valid UTF-8 (byte 16 is 0xff)"
    # The same through argv, where Python hands the bytes over as surrogates.
    argv = subprocess.run(
        [energybus_exe().encode(), b"validate", b"--json", bad.strip()],
        capture_output=True,
        timeout=30,
    )
    assert argv.returncode == 1
    assert json.loads(argv.stdout)["error"]["code"] == "invalid_utf8"


def test_daemon_mode_answers_each_line_as_it_arrives() -> None:
    """Node-RED's daemon node keeps one process and writes a topic per line."""
    with subprocess.Popen(
        [energybus_exe(), "validate", "--json", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin is not None and process.stdout is not None
        for topic, valid in [(GOOD, True), (BAD, False), (GOOD, True)]:
            process.stdin.write(topic + "\n")
            process.stdin.flush()
            answer = json.loads(process.stdout.readline())  # before stdin is closed
            assert (answer["topic"], answer["valid"]) == (topic, valid)
        process.stdin.close()
        assert process.wait(timeout=30) == 1
