"""Site configuration: every fault names file, line and key; secrets never show."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from energybus.cli.app import main
from energybus.errors import MappingError
from energybus.worker import load_config

GOOD = """\
[worker]
bus_ingest = ["+/energy/+/+/+/value"]
[mqtt]
port = 1884
password = "${MQTT_PW}"
[historian]
dsn = "postgresql://bus:${DB_PW}@db.example:5432/energy"
[adapters.ven]
site = "vad"
"""
ENV = {"MQTT_PW": "mqtt-secret-1", "DB_PW": "db-secret-2"}


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_a_good_file_loads_with_secrets_from_the_environment(tmp_path: Path) -> None:
    config = load_config(_file(tmp_path, GOOD), environ=ENV)
    assert config.mqtt.port == 1884
    assert config.mqtt.password is not None
    assert config.mqtt.password.get_secret_value() == "mqtt-secret-1"
    assert "mqtt-secret-1" not in repr(config.mqtt)
    assert config.redacted_dsn() == "postgresql://bus@db.example:5432/energy"
    assert list(config.adapters) == ["ven"]


@pytest.mark.parametrize(
    ("text", "code", "path", "line"),
    [
        (GOOD.replace("port = 1884", "prot = 1884"), "unknown_field", "$.mqtt.prot", 4),
        (GOOD.replace("port = 1884", 'port = "1884"'), "wrong_type", "$.mqtt.port", 4),
        (GOOD.replace("port = 1884", "port = 70000"), "invalid_value", "$.mqtt.port", 4),
        (GOOD.replace("${MQTT_PW}", "${NOPE}"), "missing_env", "$.mqtt.password", 5),
        (GOOD.replace('"+/energy/+/+/+/value"', '"a/#/b"'), None, "$.worker.bus_ingest[0]", 2),
        (GOOD.replace("[adapters.ven]\nsite", "[adapters.nope]\nsite"), "unknown_adapter",
         "$.adapters.nope", 8),
        (GOOD.replace('site = "vad"', "sites = 1"), "unknown_field", "$.adapters.ven.sites", 9),
        (GOOD.split("[adapters.ven]")[0], "no_adapters", "$.adapters", None),
    ],
)  # fmt: skip
def test_each_fault_names_file_line_and_key(
    tmp_path: Path, text: str, code: str | None, path: str, line: int | None
) -> None:
    source = _file(tmp_path, text)
    with pytest.raises(MappingError) as caught:
        load_config(source, environ=ENV)
    error = caught.value
    assert error.file == str(source)
    assert error.path == path
    assert error.line == line
    if code is not None:
        assert error.code == code
    assert "secret" not in str(error)


def test_check_prints_the_plan_without_secrets(tmp_path: Path) -> None:
    source = _file(tmp_path, GOOD + "[adapters.cpi]\n")
    result = CliRunner().invoke(main, ["check", "--config", str(source)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "source   volttron/metering  (QoS 1)" in result.output
    assert "source   cpi/+/telemetry  (QoS 1)" in result.output
    assert "ingest     +/energy/+/+/+/value" in result.output
    assert "historian  postgresql://bus@db.example:5432/energy" in result.output
    assert "secret" not in result.output


def test_a_shared_group_subscribes_through_share(tmp_path: Path) -> None:
    """As under ``run --shared-group``: sources and ingest go through ``$share``."""
    from energybus.worker import Worker

    config = load_config(_file(tmp_path, GOOD), environ=ENV)
    config.with_overrides(shared_group="g1")
    plan = Worker.plan(config)
    assert plan.adapters[0][1][0] == "$share/g1/volttron/metering"
    assert plan.ingest == ["$share/g1/+/energy/+/+/+/value"]


def test_check_of_a_bad_file_exits_2_with_the_location(tmp_path: Path) -> None:
    source = _file(tmp_path, GOOD.replace("port = 1884", "prot = 1884"))
    result = CliRunner().invoke(main, ["check", "--config", str(source)], env=ENV)
    assert result.exit_code == 2
    assert f"{source}:4: unknown key (at $.mqtt.prot) [unknown_field]" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--every", "15x"], "give a positive number and s, m, h or d"),
        (["--every", "0m"], "give a positive number"),
        (["--to", "2026-01-01T00:00:00Z"], "--to must be after --from"),
        (["--from", "yesterday"], "is not an ISO 8601 time"),
    ],
)
def test_energy_refuses_bad_arguments_before_connecting(args: list[str], message: str) -> None:
    base = {
        "--dsn": "postgresql://nobody@127.0.0.1:1/none",
        "--device": "grid.m",
        "--metric": "import_energy_total",
        "--from": "2026-01-02T00:00:00Z",
        "--to": "2026-01-03T00:00:00Z",
    }
    base.update(zip(args[::2], args[1::2], strict=True))
    argv = ["historian", "energy", *[x for pair in base.items() for x in pair]]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert message in result.output


def test_energy_with_the_database_down_is_a_clear_error() -> None:
    argv = [
        "historian", "energy", "--dsn", "postgresql://nobody@127.0.0.1:1/none",
        "--device", "grid.m", "--metric", "import_energy_total",
        "--from", "2026-01-02T00:00:00Z", "--to", "2026-01-03T00:00:00Z",
    ]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert "cannot connect to the database" in result.output


@pytest.mark.parametrize("command", ["check", "run"])
def test_an_adapter_fault_in_the_site_file_is_located_not_a_traceback(
    tmp_path: Path, command: str
) -> None:
    """Options the schema accepts but the adapter cannot build (a plant naming no
    template) are found when the file loads, with the line, for check and run alike."""
    source = _file(tmp_path, GOOD + '[adapters.cpi.plants.p1]\ntemplate = "nope"\n')
    result = CliRunner().invoke(main, [command, "--config", str(source)], env=ENV)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = GOOD.count("\n") + 2
    assert f"{source}:{line}: no device template 'nope'" in result.output
    assert "(at $.adapters.cpi.plants.p1.template) [unknown_template]" in result.output


def test_a_source_on_a_transport_the_worker_lacks_is_a_clear_error(tmp_path: Path) -> None:
    from energybus.adapters import SourceDeclaration
    from energybus.worker import Worker

    config = load_config(_file(tmp_path, GOOD), environ=ENV)
    adapter = config.built["ven"]
    # A transport no source of this worker speaks (a plug-in's).
    adapter.sources = (
        SourceDeclaration(transport="bacnet", patterns=("meter-1",)),  # type: ignore[arg-type]
    )
    with pytest.raises(MappingError) as caught:
        Worker.plan(config)
    assert caught.value.code == "unsupported_transport"
    assert "declares a bacnet source" in caught.value.message


def test_the_command_gate_is_in_the_plan_and_a_bad_interlock_is_located(tmp_path: Path) -> None:
    rule = '[[adapters.ven.interlocks]]\nfilter = "+/energy/load/+/shed_power/set"\nmax = 5000\n'
    good = _file(tmp_path, GOOD + rule)
    result = CliRunner().invoke(main, ["check", "--config", str(good)], env=ENV)
    assert result.exit_code == 0, result.output
    assert "gate     sets older than 30 s or 5 s ahead refused; 0 series ages, 1 interlocks" in (
        result.output
    )
    bad = _file(tmp_path, GOOD + rule.replace("max = 5000", "min = 2\nmax = 1"))
    result = CliRunner().invoke(main, ["check", "--config", str(bad)], env=ENV)
    assert result.exit_code == 2
    line = GOOD.count("\n") + 2
    assert f"{bad}:{line}: an interlock's min is above its max" in result.output


VOKE = """\
[adapters.voke.orgs.acme]
uri = "amqps://voke.example:5671"
vhost = "acme-prod"
api_key = "${VOKE_KEY}"
signing_keys = ["${VOKE_SIGNING}"]
[adapters.voke.orgs.acme.plants.P-17.targets]
B1 = { template = "battery" }
"""
VOKE_ENV = {**ENV, "VOKE_KEY": "voke-api-secret-3", "VOKE_SIGNING": "voke-signing-secret-4"}


def test_check_shows_each_voke_account_and_never_its_keys(tmp_path: Path) -> None:
    source = _file(tmp_path, GOOD + VOKE)
    result = CliRunner().invoke(main, ["check", "--config", str(source)], env=VOKE_ENV)
    assert result.exit_code == 0, result.output
    assert (
        "amqp       voke:acme: amqps://voke.example:5671 vhost acme-prod as acme (password set)"
        in result.output
    )
    assert "  queue    vcp.acme.event.telemetry  (checked passively at start-up)" in result.output
    assert "  command  vcp <- vcp.acme.command  (mandatory, publisher confirms)" in result.output
    assert "voke-api-secret-3" not in result.output
    assert "voke-signing-secret-4" not in result.output
    config = load_config(source, environ=VOKE_ENV)
    assert "voke-api-secret-3" not in repr(config.adapters["voke"])
    assert "voke-api-secret-3" not in repr(config.built["voke"].sources)


def test_the_reprs_of_the_cpi_options_show_no_plant_secret(tmp_path: Path) -> None:
    source = _file(tmp_path, GOOD + '[adapters.cpi.plants.p1]\nsecrets = ["${CPI_KEY}"]\n')
    config = load_config(source, environ={**ENV, "CPI_KEY": "cpi-hmac-secret-5"})
    assert "cpi-hmac-secret-5" not in repr(config.adapters["cpi"])
    assert "cpi-hmac-secret-5" not in repr(config.built["cpi"].options)
    assert "secrets=1" in repr(config.adapters["cpi"])


@pytest.mark.parametrize(
    ("change", "code", "path"),
    [
        (("orgs.acme", "orgs.Acme"), "bad_identifier",
         "$.adapters.voke.orgs.Acme"),
        (("amqps://voke.example:5671", "amqps://acme:pw@voke.example:5671"), "invalid_value",
         "$.adapters.voke.orgs.acme.uri"),
        (("amqps://voke.example:5671", "https://voke.example"), "invalid_value",
         "$.adapters.voke.orgs.acme.uri"),
        (("amqps://voke.example:5671", "amqps://voke.example:56x1"), "invalid_value",
         "$.adapters.voke.orgs.acme.uri"),
        (("amqps://voke.example:5671", "amqps://[voke.example:5671"), "invalid_value",
         "$.adapters.voke.orgs.acme.uri"),
        (('["${VOKE_SIGNING}"]', "[]"), "missing_field", "$.adapters.voke.orgs.acme.signing_keys"),
        (('api_key = "${VOKE_KEY}"\n', ""), "missing_field", "$.adapters.voke.orgs.acme.api_key"),
        (('template = "battery"', 'template = "boat"'), "unknown_template",
         "$.adapters.voke.orgs.acme.plants.P-17.targets.B1.template"),
    ],
)  # fmt: skip
def test_a_voke_fault_is_located(
    tmp_path: Path, change: tuple[str, str], code: str, path: str
) -> None:
    source = _file(tmp_path, GOOD + VOKE.replace(*change))
    with pytest.raises(MappingError) as caught:
        load_config(source, environ=VOKE_ENV)
    assert (caught.value.code, caught.value.path) == (code, path)
    assert "voke-api-secret-3" not in str(caught.value)


MODBUS = """\
[adapters.modbus]
site = "plant-7"
[adapters.modbus.devices.battery]
map = "sunspec_battery"
transport = "rtu-over-tcp"
host = "10.0.0.30"
port = 4001
interval_s = 2
[adapters.modbus.devices.battery.limits.max_charge_power]
max = 8000
[adapters.modbus.devices.meter]
map = "eastron_sdm630"
transport = "rtu"
serial_port = "/dev/ttyUSB0"
"""


def test_check_prints_each_modbus_device_its_reads_and_the_poll_outbox(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["check", "--config", str(_file(tmp_path, GOOD + MODBUS))], env=ENV
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert (
        "modbus     battery: rtu-over-tcp 10.0.0.30:4001 unit 1, every 2 s, timeout 1 s x 2,"
        " offline after 3 failed"
    ) in lines
    # Each value and its scale factor in one read: 103 to 124, then 802.
    assert "  reads    holding 40072+104, holding 40187+48" in lines
    assert "  command  modbus/battery  (write, read back, confirm on value)" in lines
    assert any(line.startswith("modbus     meter: rtu /dev/ttyUSB0 unit 1") for line in lines)
    assert any(line.startswith("poll outbox ") for line in lines)


@pytest.mark.parametrize(
    ("change", "code", "path"),
    [
        ('map = "sunspec_battery"', "unknown_map", "$.adapters.modbus.devices.battery.map"),
        ("max = 8000", "conflicting_field", "$.adapters.modbus.devices.battery.limits"),
        ('serial_port = "/dev/ttyUSB0"', "missing_field", "$.adapters.modbus.devices.meter"),
        ("interval_s = 2", "unknown_field", "$.adapters.modbus.devices.battery.intervall"),
    ],
)
def test_a_bad_modbus_device_is_a_located_error(
    tmp_path: Path, change: str, code: str, path: str
) -> None:
    replacement = {
        'map = "sunspec_battery"': 'map = "no_such_map"',
        "max = 8000": "max = 8000\ndischarge_positive = false",
        'serial_port = "/dev/ttyUSB0"': "",
        "interval_s = 2": "intervall = 2",
    }[change]
    with pytest.raises(MappingError) as caught:
        load_config(_file(tmp_path, GOOD + MODBUS.replace(change, replacement)), environ=ENV)
    assert caught.value.code == code
    assert caught.value.path is not None and caught.value.path.startswith(path)
    assert caught.value.line is not None


MEMBER = '[worker]\nshared_group = "fleet"\nmember = "{member}"\n'


@pytest.mark.parametrize(
    ("adapter", "env", "owner", "path", "device"),
    [
        (VOKE, VOKE_ENV, 0, "$.adapters.voke.orgs.acme.plants.P-17", "voke plant P-17"),
        (MODBUS, ENV, 1, "$.adapters.modbus.devices.battery", "modbus device battery"),
    ],
)
def test_a_member_configures_only_devices_of_its_own_sites(
    tmp_path: Path, adapter: str, env: dict[str, str], owner: int, path: str, device: str
) -> None:
    """A Voke plant or a Modbus device reaches only the member that configures it, and its
    ``set``s go by site like any other: on another member a ``set`` for it would be taken
    by that member and refused as an unknown target by the site's member, two records."""
    body = GOOD.replace("[worker]\n", "") + adapter
    good = _file(tmp_path, MEMBER.format(member=f"{owner}/2") + body)
    assert load_config(good, environ=env).member == (owner, 2)
    other = f"{1 - owner}/2"
    with pytest.raises(MappingError) as caught:
        load_config(_file(tmp_path, MEMBER.format(member=other) + body), environ=env)
    assert (caught.value.code, caught.value.path) == ("wrong_member", path)
    site = "p-17" if "voke" in device else "plant-7"
    assert f"{device} is about site {site!r}, which hashes to member {owner}/2" in str(caught.value)
    assert caught.value.line is not None
    # The same from the command line, on a file without a member.
    config = load_config(_file(tmp_path, GOOD + adapter), environ=env)
    with pytest.raises(MappingError) as caught:
        config.with_overrides(shared_group="fleet", member=other)
    assert (caught.value.code, caught.value.path) == ("wrong_member", path)


def test_a_bad_member_on_the_command_line_names_its_setting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["run", "--config", str(_file(tmp_path, GOOD)), "--shared-group", "g", "--member", "two"],
        env=ENV,
    )
    assert result.exit_code == 2
    assert "(at $.worker.member) [invalid_value]" in result.output


def test_tls_files_are_read_at_load_and_a_bad_one_is_named(tmp_path: Path) -> None:
    """A TLS file that is missing or not a certificate is an error at start naming the
    key and the file, not a worker that cannot connect for ever."""
    from tools.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = {
        f'ca_file = "{tmp_path / "missing.pem"}"': f"ca_file {tmp_path / 'missing.pem'}: No such",
        f'ca_file = "{junk}"': f"ca_file {junk}: not usable",
        f'cert_file = "{junk}"\nkey_file = "{pki.client_key}"': f"cert_file {junk} with key_file",
        f'ca_file = "{pki.ca}"\ncert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"': "",
    }
    for table, said in cases.items():
        path = tmp_path / "site.toml"
        path.write_text(f"[mqtt.tls]\n{table}\n[adapters.ven]\n")
        if not said:
            assert load_config(path).mqtt.tls is not None
            continue
        with pytest.raises(MappingError) as caught:
            load_config(path)
        assert said in caught.value.message and caught.value.path == "$.mqtt.tls", caught.value
