"""``energybus normalize`` and ``energybus mappings check`` as Node-RED and scripts run them."""

from __future__ import annotations

import base64
import json
import os
import string
import subprocess
from pathlib import Path

from tests.test_cli import energybus_exe, run

ROOT = Path(__file__).resolve().parent.parent
METERING = json.dumps({"venId": "ven-042", "timestamp": 1729700000, "batterySOC": 85.5})


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_one_shot_prints_mqtt_out_messages() -> None:
    result = run("normalize", "--adapter", "ven", "--topic", "volttron/metering", METERING)
    assert result.returncode == 0, result.stderr
    messages = _lines(result.stdout)
    assert [m["topic"] for m in messages] == [
        "ven-042/energy/storage/ven-042-battery/soc/meta",
        "ven-042/energy/storage/ven-042-battery/soc/value",
        "ven-042/energy/storage/ven-042-battery/soc/last",
    ]
    assert messages[1] == {
        "topic": "ven-042/energy/storage/ven-042-battery/soc/value",
        "payload": "85.5",
        "qos": 1,
        "retain": False,
    }
    assert json.loads(str(messages[2]["payload"]))["observed_at"] == "2024-10-23T16:13:20Z"
    # Every topic it emits passes ``energybus validate``.
    check = run("validate", *[str(m["topic"]) for m in messages])
    assert check.returncode == 0, check.stdout


def test_payload_from_stdin_and_site_override() -> None:
    result = run(
        "normalize",
        "--adapter",
        "ven",
        "--topic",
        "volttron/metering",
        "--site",
        "vad",
        stdin=METERING,
    )
    assert result.returncode == 0, result.stderr
    assert _lines(result.stdout)[1]["topic"] == "vad/energy/storage/ven-042-battery/soc/value"


def test_bad_input_exits_1_with_one_line_and_no_output() -> None:
    for payload in ['{"venId": ', '{"venId": "v", "batterySOC": "high"}']:
        result = run("normalize", "--adapter", "ven", "--topic", "volttron/metering", payload)
        assert result.returncode == 1
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    result = run(
        "normalize",
        "--adapter",
        "ven",
        "--topic",
        "volttron/metering",
        '{"venId": "v", "batterySOC": "high"}',
    )
    assert "wrong_type" in result.stderr and "$.batterySOC" in result.stderr
    assert "high" not in result.stderr  # values never reach logs


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("normalize", "--adapter", "nope", "--topic", "t", "1").returncode == 2
    assert run("normalize", "--adapter", "ven", "1").returncode == 2  # no --topic
    bad = tmp_path / "site.toml"
    bad.write_text("[adapters.ven]\ntelemetri = true\n")
    result = run("normalize", "--adapter", "ven", "--config", str(bad), "--topic", "t", "1")
    assert result.returncode == 2 and f"{bad}:2:" in result.stderr


def test_set_becomes_a_signed_command_with_secret_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        '[adapters.cpi.plants.plant-1]\nsite = "vad"\nsecrets = ["${CPI_SECRET}"]\n'
        '[adapters.cpi.plants.plant-1.targets.B1]\ntemplate = "battery"\n'
        'entity_id = "battery-main"\n'
    )
    args = [
        energybus_exe(),
        "normalize",
        "--adapter",
        "cpi",
        "--config",
        str(config),
        "--topic",
        "vad/energy/storage/battery-main/power_setpoint/set",
        "5000",
    ]
    env = {**os.environ, "CPI_SECRET": "s3cret-value"}
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    [command] = _lines(result.stdout)
    assert command["topic"] == "cpi/plant-1/commands"
    body = json.loads(str(command["payload"]))
    assert body["action"] == "set_power" and body["payload"] == {"kw": 5.0}
    assert body["target"] == "B1" and len(body["sig"]) == 64
    assert "s3cret-value" not in result.stdout + result.stderr
    retained = subprocess.run(
        [*args, "--retain"], capture_output=True, text=True, env=env, timeout=30
    )
    assert retained.returncode == 1 and "retained_set" in retained.stderr


def test_stream_answers_each_line_as_it_arrives_and_survives_errors() -> None:
    inputs = [
        ({"topic": "volttron/metering", "payload": METERING}, 3),
        ({"topic": "volttron/metering", "payload": "not json"}, 0),
        ({"payload": {"venId": "ven-042", "timestamp": 1729700005, "batterySOC": 85.5}}, 1),
        (
            {
                "topic": "volttron/metering",
                "payload": {"venId": "ven-042", "timestamp": 1729700010, "batterySOC": 90},
            },
            2,
        ),
    ]
    with subprocess.Popen(
        [
            energybus_exe(),
            "normalize",
            "--adapter",
            "ven",
            "--stream",
            "--topic",
            "volttron/metering",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        assert process.stdin and process.stdout and process.stderr
        for item, count in inputs:
            process.stdin.write(json.dumps(item) + "\n")
            process.stdin.flush()
            if count == 0:
                assert process.stderr.readline().startswith("error: line 2: malformed_json")
            # Read this input's messages before writing the next one: nothing is held.
            got = [json.loads(process.stdout.readline()) for _ in range(count)]
            assert all("/energy/" in m["topic"] for m in got)
        process.stdin.write("{nonsense\n")
        process.stdin.close()
        assert process.wait(timeout=30) == 0
        assert "line 5: bad_input" in process.stderr.read()
    # The unchanged 85.5 of the third input was deduped: only its ``last`` came out.


def test_mappings_check(tmp_path: Path) -> None:
    result = run("mappings", "check")
    assert result.returncode == 0
    assert "ven.toml (adapter ven, 12 rows)" in result.stdout
    assert "cpi.toml (adapter cpi" in result.stdout
    broken = tmp_path / "ven.toml"
    text = (ROOT / "mappings" / "ven.toml").read_text()
    broken.write_text(text.replace('metric = "soc", unit = "%"', 'metric = "soc", unit = "V"'))
    result = run("mappings", "check", str(broken), str(ROOT / "mappings" / "cpi.toml"))
    assert result.returncode == 1
    line = next(n for n, t in enumerate(text.splitlines(), 1) if t.startswith("batterySOC"))
    assert f"invalid  {broken}:{line}: " in result.stdout and "[unit_mismatch]" in result.stdout
    assert "ok       " in result.stdout  # the other file still checked


def test_received_at_must_be_a_zoned_time() -> None:
    for bad in ["yesterday", "2024-10-23T16:13:20"]:
        result = run(
            "normalize",
            "--adapter",
            "ven",
            "--topic",
            "volttron/metering",
            "--received-at",
            bad,
            METERING,
        )
        assert result.returncode == 2 and "--received-at" in result.stderr


NAME = 'Küche "main" $(touch x) `id`; rm -rf /\nline 2 \u2603 \U0001f50c'


def _base64(item: dict[str, object]) -> str:
    return base64.b64encode(json.dumps(item).encode()).decode()


def test_input_base64_carries_any_payload_and_topic_as_one_argument() -> None:
    awkward = {
        "venId": "ven-042",
        "timestamp": 1729700000,
        "circuits": [
            {
                "id": "circuit_1",
                "name": NAME,
                "currentKw": 1.5,
            }
        ],
    }
    text = json.dumps(awkward, ensure_ascii=False)
    plain = run("normalize", "--adapter", "ven", "--topic", "volttron/metering", text)
    assert plain.returncode == 0, plain.stderr
    encoded = _base64({"topic": "volttron/metering", "payload": text})
    assert set(encoded) <= set(string.ascii_letters + string.digits + "+/=")
    result = run("normalize", "--adapter", "ven", "--input-base64", encoded)
    assert result.returncode == 0, result.stderr
    assert result.stdout == plain.stdout
    meta = "ven-042/energy/load/circuit-1/active_power/meta"
    [attributes] = [
        json.loads(str(m["payload"]))["attributes"]
        for m in _lines(result.stdout)
        if m["topic"] == meta
    ]
    assert attributes["name"] == NAME
    # The topic may come from --topic, and a payload may be any JSON value.
    again = run(
        "normalize", "--adapter", "ven", "--topic", "volttron/metering", "--input-base64",
        _base64({"payload": awkward}),
    )  # fmt: skip
    assert again.returncode == 0 and again.stdout == plain.stdout


def test_input_base64_refuses_what_it_cannot_read() -> None:
    for encoded in ["not base64!", base64.b64encode(b"{nonsense").decode(), _base64({"x": 1})]:
        result = run("normalize", "--adapter", "ven", "--input-base64", encoded)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith("error: bad_input: ") and result.stderr.count("\n") == 1
    no_topic = run("normalize", "--adapter", "ven", "--input-base64", _base64({"payload": "1"}))
    assert no_topic.returncode == 1 and "no topic" in no_topic.stderr
    retained_set = _base64(
        {"topic": "vad/energy/load/ven-042/shed_power/set", "payload": "0", "retain": True}
    )
    refused = run("normalize", "--adapter", "ven", "--input-base64", retained_set)
    assert refused.returncode == 1 and "retained_set" in refused.stderr
    encoded = _base64({"topic": "volttron/metering", "payload": METERING})
    assert run("normalize", "--adapter", "ven", "--input-base64", encoded, "1").returncode == 2
    assert (
        run("normalize", "--adapter", "ven", "--stream", "--input-base64", encoded).returncode == 2
    )
