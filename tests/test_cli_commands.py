"""``energybus commands list`` refusing what it cannot do in one line, not a traceback."""

from __future__ import annotations

from click.testing import CliRunner

from energybus.cli import main
from tools import services


def test_an_unreachable_database_is_one_line_and_exit_2() -> None:
    dsn = f"postgresql://nobody@127.0.0.1:{services.free_port()}/energybus"
    result = CliRunner().invoke(main, ["commands", "list", "--dsn", dsn])
    assert result.exit_code == 2
    assert result.output.startswith("cannot connect to the database:")
    assert "Traceback" not in result.output


def test_bad_filters_are_usage_errors() -> None:
    for args in (["--series", "vad/storage"], ["--device", "battery"], ["--since", "yesterday"]):
        result = CliRunner().invoke(main, ["commands", "list", "--dsn", "x", *args])
        assert result.exit_code == 2, args
        assert "Traceback" not in result.output
