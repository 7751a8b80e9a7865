"""Every command shown in the README, docs/ and the examples' READMEs runs as written.

A command added to a document is run here the next time the suite runs, and fails it
until it works; the only commands not run are those in :data:`NOT_RUN`, each with the
reason and what covers it instead.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.markdown import ROOT, blocks, commands, documents, files, name
from tests.docs.shell import Reader, Services, overlay_venv, sandbox, substitute
from tests.workers import init_schema, query
from tools import services
from tools.services import Service

NOT_RUN: dict[str, tuple[str, str]] = {
    "./dev test": ("runs this very suite, ruff and mypy", ".ci/run"),
    "./dev test -k filters": ("runs part of this very suite, after ruff and mypy", ".ci/run"),
    "./dev demo": (
        "holds the demo's fixed ports until Ctrl-C; the test runs the same demo on free ports",
        "tests/test_demo.py",
    ),
    "./dev demo --secure": (
        "holds the secure demo's fixed ports until Ctrl-C; the test runs it on free ports",
        "tests/test_demo.py::test_the_secure_demo_runs_locked_down_and_prints_no_secret",
    ),
    "./dev bench": (
        "measures this machine for many minutes: figures are measured, never asserted",
        "tests/test_benchmark_reports.py",
    ),
    "ENERGYBUS_DSN=$ENERGYBUS_OWNER_DSN energybus historian init --writer energybus_writer"
    " --reader energybus_reader": (
        "needs the roles of docs/security.md on a locked-down PostgreSQL; the test makes"
        " them and runs the same command",
        "tests/security/test_locked_down.py",
    ),
    "rabbitmqctl set_permissions -p acme acme ^$ ^vcp$ ^vcp\\.acme\\.event\\..*$": (
        "changes a broker's users; the test gives a Voke partner exactly these permissions"
        " on the locked-down RabbitMQ and runs the worker with them",
        "tests/security/test_locked_down.py",
    ),
}
"""Documented commands the suite does not run (by their words, without the comment):
why, and the test (``path`` or ``path::name``) that covers what they do."""

DOCUMENTS = [path for path in documents() if any(commands(b) for b in blocks(path))]


@pytest.fixture(scope="session")
def doc_venv(run_dir: Path) -> Path:
    return overlay_venv(run_dir / "docs-venv")


def _fresh_database(postgres: Service) -> str:
    query(postgres.url, "DROP DATABASE IF EXISTS docs WITH (FORCE)")
    query(postgres.url, "CREATE DATABASE docs OWNER energybus")
    dsn = postgres.url.rsplit("/", 1)[0] + "/docs"
    init_schema(dsn)
    return dsn


def follow(
    document: Path,
    run_dir: Path,
    venv: Path,
    mosquitto: Service,
    postgres: Service,
    rabbitmq: Service,
) -> Reader:
    """Run one document's commands; the reader holds what failed."""
    found = Services(
        mosquitto=mosquitto,
        postgres=postgres,
        rabbitmq=rabbitmq,
        dsn=_fresh_database(postgres),
        modbus_port=services.free_port(),
        metrics_port=services.free_port(),
    )
    slug = re.sub(r"[^a-z0-9]+", "-", name(document).lower()).strip("-")
    workdir = sandbox(run_dir / "docs" / slug, found)
    reader = Reader(document, workdir, venv, found)
    reader.follow(skip=lambda command: command.key in NOT_RUN)
    return reader


@pytest.mark.services
@pytest.mark.parametrize("document", DOCUMENTS, ids=[name(p) for p in DOCUMENTS])
def test_document_commands_run(
    document: Path,
    run_dir: Path,
    doc_venv: Path,
    mosquitto: Service,
    postgres: Service,
    rabbitmq: Service,
) -> None:
    reader = follow(document, run_dir, doc_venv, mosquitto, postgres, rabbitmq)
    assert reader.ran, f"{name(document)} shows no command that runs"
    assert not reader.failures, "\n\n".join(reader.failures)
    for block in files(document):
        # What the document shows is what its commands leave (a golden case's expect).
        assert block.file is not None
        written = (reader.workdir / block.file).read_text()
        assert written == substitute(block.text, reader.services), f"{block.where}: {block.file}"


def test_the_new_source_walkthrough_is_the_example() -> None:
    """docs/new-source.md shows examples/new_dialect/, file by file, and nothing else."""
    example = ROOT / "examples" / "new_dialect"
    shown = {}
    for block in files(ROOT / "docs" / "new-source.md"):
        assert block.file is not None and block.file.startswith("acme-energybus/"), block.where
        shown[block.file.removeprefix("acme-energybus/")] = block.text
    generated = {"__pycache__", "energybus-data", ".pytest_cache"}
    on_disk = {
        str(path.relative_to(example))
        for path in example.rglob("*")
        if path.is_file()
        and not generated & set(path.parts)
        and not any(part.endswith(".egg-info") for part in path.parts)
    }
    assert set(shown) == on_disk
    for relative, text in shown.items():
        assert (example / relative).read_text() == text, relative


def test_not_run_list_has_no_stale_entry() -> None:
    shown = {c.key for path in documents() for block in blocks(path) for c in commands(block)}
    for command, (reason, covered_by) in NOT_RUN.items():
        assert command in shown, f"{command!r} is in NOT_RUN but no document shows it"
        assert reason, command
        path, _, test = covered_by.partition("::")
        assert (ROOT / path).is_file(), f"{command!r}: {path} does not exist"
        if test:
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {test}\(", source, re.M), f"{command!r}: no {covered_by}"


def test_the_documents_are_found() -> None:
    found = {name(path) for path in documents()}
    assert {"README.md", "docs/worker.md", "docs/cli.md"} <= found
    # What the test runs: every document with a command in a shell or console block.
    assert {"README.md", "docs/development.md"} <= {name(path) for path in DOCUMENTS}


_COMMAND_LINE = re.compile(
    r"^(\$ )?(\w+=\S* )*(energybus|\./dev|python3?|mosquitto_(sub|pub)|psql)\s"
)
"""A line that starts as a command of this project's would (after ``$ `` or assignments)."""


def test_commands_are_in_blocks_that_run() -> None:
    """A command shown in a block of no language, with a ``$`` prompt or without, would
    escape the test that runs them: it must be in a ``sh`` or ``console`` block."""
    unlabelled = [
        block.where
        for path in documents()
        for block in blocks(path)
        if block.language == ""
        and block.file is None
        and any(_COMMAND_LINE.match(line) for line in block.text.splitlines())
    ]
    assert not unlabelled, f"label these blocks ```sh (or ```console with $ prompts): {unlabelled}"


def test_the_reader_reports_what_a_reader_would_see_fail(
    tmp_path: Path, doc_venv: Path, mosquitto: Service, postgres: Service, rabbitmq: Service
) -> None:
    document = tmp_path / "broken.md"
    document.write_text(
        "```sh\n"
        "true\n"
        "false\n"
        "python -c 'raise SystemExit(3)'   # exit status 3: on purpose\n"
        "python -c 'import sys; sys.stderr.write(\"Traceback (most recent call last):\")'\n"
        "energybus run --config missing.toml\n"
        "```\n\n"
        "```console\n$ echo hello\ngoodbye\n$ echo same\nsame\n```\n"
    )
    found = Services(mosquitto, postgres, rabbitmq, postgres.url, 1, 2)
    reader = Reader(document, tmp_path, doc_venv, found)
    reader.follow(skip=lambda command: False)
    assert len(reader.ran) == 7
    problems = [failure.splitlines()[1].strip() for failure in reader.failures]
    assert problems == [
        "exit status 1, the document says 0",
        "printed a traceback",
        "no 'source: connected' (its start-up line) came out",
        "exit status 2, the document says 0",
        "printed something else than shown:",
    ]
