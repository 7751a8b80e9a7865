"""A PostgreSQL URL with a typo is one clear line wherever it comes in (the worker's
configuration, a command's --dsn), never a traceback and never the URL itself, which
holds the password."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from energybus.historian import dsn_problem

SECRET = "S3cr3t+pw"
BROKEN = {
    "postgresql://u:S3cr3t+pw@127.0.0.1:notaport/db": "a port must be a number",
    # A slash in the password ends the host part early: the "port" is the password's end.
    "postgresql://u:S3cr3t+pw/x@127.0.0.1:5432/db": "a port must be a number",
    "postgresql://u:S3cr3t+pw@127.0.0.1:5432/db?sslmode=verify": "sslmode must be one of",
    "postgresq://u:S3cr3t+pw@127.0.0.1/db": "must start with postgresql://",
    # A slash after digits: the "port" is a number, the rest of the password and the
    # real host are the database name, which a redacted DSN shows.
    "postgresql://u:7/S3cr3t+pw@127.0.0.1/db": "an @ or # outside the user part",
    "postgresql://u:7?S3cr3t+pw@127.0.0.1/db": "an @ or # outside the user part",
    "postgresql://u:7#S3cr3t+pw@127.0.0.1/db": "an @ or # outside the user part",
    # asyncpg splits the user part at the first @, urlsplit at the last.
    "postgresql://u:S3cr3t+pw@x@127.0.0.1/db": "an @ or # outside the user part",
    "postgresql://u:S3cr3t+pw@127.0.0.1:99999/db": "a port must be a number from 1 to 65535",
}


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://energybus@127.0.0.1:15432/energybus",
        "postgres://u:p@[::1]:5432/db?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        "postgresql://u@h1:5432,h2:5433/db",
        "postgresql:///db?host=/run/postgresql",
        "postgresql://u:S3cr3t%2F%40%3F%23@127.0.0.1:5432/db?user=u%40corp",
    ],
)
def test_a_usable_dsn_has_no_problem(dsn: str) -> None:
    assert dsn_problem(dsn) is None


@pytest.mark.parametrize(("dsn", "problem"), BROKEN.items())
def test_a_broken_dsn_is_one_line_without_the_password(
    dsn: str, problem: str, tmp_path: Path
) -> None:
    found = dsn_problem(dsn)
    assert found is not None and found.startswith(problem)
    command = subprocess.run(
        [sys.executable, "-m", "energybus.cli", "commands", "list", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert command.returncode == 2
    assert command.stderr == f"cannot use --dsn: {found}\n"
    config = tmp_path / "site.toml"
    config.write_text(f'[historian]\ndsn = "{dsn}"\n[adapters.ven]\nsite = "a"\n')
    check = subprocess.run(
        [sys.executable, "-m", "energybus.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode != 0
    assert f"{found} (at $.historian.dsn)" in check.stdout + check.stderr
    watch = subprocess.run(
        [sys.executable, "-m", "energybus.cli", "watch", "--once", "--dsn", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert watch.returncode == 2 and "--dsn" in watch.stderr and found in watch.stderr
    for output in (command, check, watch):
        assert SECRET not in output.stdout + output.stderr
        assert "Traceback" not in output.stdout + output.stderr


def test_the_plan_shows_how_the_database_is_reached_but_no_password(tmp_path: Path) -> None:
    from energybus.worker.config import load_config

    config = tmp_path / "site.toml"
    config.write_text('[historian]\ndsn = "${DSN}"\n[adapters.ven]\nsite = "a"\n')
    dsn = (
        "postgresql://w:S3cr3t%2Bpw@db.example:5432/energybus"
        "?sslmode=verify-full&sslrootcert=/etc/ca.pem&password=S3cr3t%2Bpw"
    )
    loaded = load_config(config, environ={"DSN": dsn})
    assert loaded.redacted_dsn() == (
        "postgresql://w@db.example:5432/energybus?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    )


def test_a_configuration_error_never_repeats_a_value_from_the_environment(
    tmp_path: Path,
) -> None:
    """A validator may quote a wrong value (msgspec's ``Invalid enum value '...'``): when
    the value came from ``${VAR}``, the message shows ``${VAR}`` instead, for the worker's
    configuration and for an adapter's options read by ``normalize``."""
    import os

    value = "S3cr3t+from/env"
    env = {**os.environ, "EB_VALUE": value}
    config = tmp_path / "site.toml"
    config.write_text(
        '[adapters.modbus]\nsite = "a"\n[adapters.modbus.devices.m]\n'
        'map = "eastron_sdm630"\nhost = "127.0.0.1"\ntransport = "${EB_VALUE}"\n'
    )
    check = subprocess.run(
        [sys.executable, "-m", "energybus.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert check.returncode != 0
    assert "Invalid enum value '${EB_VALUE}'" in check.stdout + check.stderr
    normalize = subprocess.run(
        [
            *(sys.executable, "-m", "energybus.cli", "normalize", "--adapter", "modbus"),
            *("--config", str(config), "--topic", "x", "{}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert normalize.returncode != 0
    assert "'${EB_VALUE}'" in normalize.stdout + normalize.stderr
    for output in (check.stdout + check.stderr, normalize.stdout + normalize.stderr):
        assert value not in output and "Traceback" not in output
