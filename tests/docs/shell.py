"""Running a document's commands as its reader would, against real services.

Each document runs in a directory of its own that mirrors the checkout (its top-level
folders linked, ``docs/`` and ``examples/`` copied), with the files the document has the
reader write laid out in it first. Its commands run one by one in ``bash``, in document
order, with a virtualenv of their own on ``PATH`` (so that a ``pip install`` a document
shows changes nothing outside the test); the doc's addresses become the test services'
through :data:`SUBSTITUTIONS`, the one table of what the test changes in a command.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.docs.markdown import ROOT, Block, Command, blocks, commands, output_matches
from tools.services import Service

TRACEBACK = "Traceback (most recent call last)"
COMMAND_TIMEOUT_S = 180.0
"""A command that has not finished by then is reported as hanging (it may belong in
:data:`LONG_RUNNING`)."""
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0

LONG_RUNNING: dict[str, str] = {
    "energybus run": "source: connected",
    "energybus simulate": "ready ",
}
"""Commands that run until stopped (by their first words), and the line that says they
are up. Each is started in the background, the document's next commands run once that
line is out (as in a second terminal), and at the end of its block it gets SIGINT, as
Ctrl-C would send, and must exit 0 without a traceback."""

COPIED = ("docs", "examples")
"""Folders copied rather than linked: the substitutions apply to their files too."""
NOT_LINKED = {".git", ".venv", ".run", *COPIED}


@dataclass(frozen=True)
class Services:
    mosquitto: Service
    postgres: Service
    rabbitmq: Service
    dsn: str
    """The database each document gets to itself."""
    modbus_port: int
    metrics_port: int


SUBSTITUTIONS: list[tuple[str, Callable[[Services], str]]] = [
    # The demo's and a default installation's addresses: the test's services instead.
    (r"127\.0\.0\.1:(15432|5432)/energybus", lambda s: s.dsn.split("@", 1)[1]),
    (r"\b(18830|1883)\b", lambda s: str(s.mosquitto.port)),
    (r"\b15672\b", lambda s: str(s.rabbitmq.port)),
    (r"\b5020\b", lambda s: str(s.modbus_port)),
    (r"\b9464\b", lambda s: str(s.metrics_port)),
    # The service helper's run directory is the document's own, not the checkout's.
    (r"(python3? tools/services\.py) ", lambda s: r"\1 --run-dir .run "),
]
"""What the test changes in a command and in the files it reads (regex, replacement).
Besides these, every command sees ``ENERGYBUS_DSN`` (the document's database, a new one
with the historian schema),
``ENERGYBUS_VOKE_URL`` (the test RabbitMQ) and pip set to install from no index."""


def substitute(text: str, services: Services) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        text = re.sub(pattern, replacement(services), text)
    return text


def overlay_venv(path: Path) -> Path:
    """A virtualenv that sees every package of the one running the tests, installs into
    itself, and has that one's scripts (``energybus``, ``pytest``, ``pip``) running on
    it: what a document installs lands here, built with the setuptools already there."""
    python = path / "bin" / "python"
    if python.exists():
        return path
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True
    )
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # addsitedir, not a plain path line: the editable installs there are .pth files too.
    (purelib / "_energybus_tests.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    here = Path(sys.executable).parent
    for script in here.iterdir():
        target = path / "bin" / script.name
        if target.exists() or script.is_symlink() or not script.is_file():
            continue
        with contextlib.suppress(UnicodeDecodeError):
            first, _, rest = script.read_text().partition("\n")
            if first.startswith("#!") and str(here) in first:
                target.write_text(f"#!{python}\n{rest}")
                target.chmod(0o755)
    return path


def sandbox(directory: Path, services: Services) -> Path:
    """A directory that looks like the checkout to the commands run in it."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name in NOT_LINKED or entry.name.endswith(".egg-info"):
            continue
        (directory / entry.name).symlink_to(entry)
    for folder in COPIED:
        shutil.copytree(ROOT / folder, directory / folder, symlinks=True)
        for path in (directory / folder).rglob("*"):
            if path.is_file() and path.suffix in {".toml", ".json", ".txt", ".py", ".md"}:
                text = path.read_text()
                changed = substitute(text, services)
                if changed != text:
                    path.write_text(changed)
    return directory


@dataclass
class Running:
    command: Command
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Reader:
    """Follows one document: writes its files, runs its commands, and says what failed."""

    def __init__(self, document: Path, workdir: Path, venv: Path, services: Services) -> None:
        self.document = document
        self.workdir = workdir
        self.services = services
        self.cwd = workdir
        """Where the next command runs: ``cd`` in a document moves it, as in a shell."""
        self.failures: list[str] = []
        self.ran: list[Command] = []
        self.env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONHOME"}}
        self.env.update(
            PATH=os.pathsep.join(
                [str(venv / "bin"), str(Path(sys.executable).parent), self.env.get("PATH", "")]
            ),
            ENERGYBUS_DSN=services.dsn,
            ENERGYBUS_VOKE_URL=services.rabbitmq.url,
            PIP_NO_INDEX="1",
            # pip's inverted switch: this turns build isolation off, so a package the
            # document installs is built with the setuptools already installed.
            PIP_NO_BUILD_ISOLATION="0",
            PIP_DISABLE_PIP_VERSION_CHECK="1",
        )

    def follow(self, skip: Callable[[Command], bool]) -> None:
        for block in blocks(self.document):
            if block.file is not None:
                self.write(block)
        for block in blocks(self.document):
            with self.background() as started:
                for command in commands(block):
                    if skip(command):
                        continue
                    self.ran.append(command)
                    self.run(command, started)

    def write(self, block: Block) -> None:
        assert block.file is not None
        path = self.workdir / block.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(substitute(block.text, self.services))

    def fail(self, command: Command, problem: str, output: str = "") -> None:
        tail = "\n".join(output.splitlines()[-40:])
        self.failures.append(f"{command.where}: {command.text}\n  {problem}\n{tail}".rstrip())

    def run(self, command: Command, started: list[Running]) -> None:
        text = substitute(command.text, self.services)
        move = re.fullmatch(r"cd (\S+)", text)
        if move:
            self.cwd = (self.cwd / move.group(1)).resolve()
            if not self.cwd.is_dir():
                self.fail(command, f"no directory {self.cwd}")
            return
        export = re.fullmatch(r"export (\w+)=(.*)", text, re.DOTALL)
        if export:
            value = subprocess.run(
                ["bash", "-c", f"printf %s {export.group(2)}"],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            self.env[export.group(1)] = value
            return
        marker = next(
            (line for start, line in LONG_RUNNING.items() if _words(command).startswith(start)),
            None,
        )
        if marker is not None:
            self.start(command, text, marker, started)
            return
        try:
            result = subprocess.run(
                **self.shell(text), stdout=subprocess.PIPE, timeout=COMMAND_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as timeout:
            output = (timeout.output or b"").decode(errors="replace")
            self.fail(
                command,
                f"still running after {COMMAND_TIMEOUT_S:g} s (one that runs until stopped "
                "belongs in LONG_RUNNING, tests/docs/shell.py)",
                output,
            )
            return
        output = result.stdout.decode(errors="replace")
        self.check(command, result.returncode, output)
        shown = None if command.output is None else substitute(command.output, self.services)
        if shown is not None and not output_matches(shown, output):
            self.fail(
                command, f"printed something else than shown:\n{command.output}\n--- got:", output
            )

    def shell(self, text: str) -> dict[str, Any]:
        """How a command runs: in bash, where the document is, in a session of its own
        (so that its whole process group can be signalled), stderr with stdout."""
        return {
            "args": ["bash", "-c", text],
            "cwd": self.cwd,
            "env": self.env,
            "stdin": subprocess.DEVNULL,
            "stderr": subprocess.STDOUT,
            "start_new_session": True,
        }

    def check(self, command: Command, status: int, output: str) -> None:
        if status != command.expect_status:
            expected = command.expect_status
            self.fail(command, f"exit status {status}, the document says {expected}", output)
        if TRACEBACK in output:
            self.fail(command, "printed a traceback", output)

    def start(self, command: Command, text: str, marker: str, started: list[Running]) -> None:
        log = self.workdir / f".command-{command.line}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(**self.shell(text), stdout=out)
        running = Running(command, process, log)
        started.append(running)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while marker not in running.text():
            if process.poll() is not None or time.monotonic() > deadline:
                self.fail(command, f"no {marker!r} (its start-up line) came out", running.text())
                return
            time.sleep(0.1)

    @contextlib.contextmanager
    def background(self) -> Iterator[list[Running]]:
        """Commands that run until stopped, started in a block: stopped at its end."""
        started: list[Running] = []
        try:
            yield started
        finally:
            for running in reversed(started):
                self.stop(running)

    def stop(self, running: Running) -> None:
        process = running.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
        try:
            status = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            self.fail(running.command, "did not stop on SIGINT", running.text())
            return
        self.check(running.command, status, running.text())


def _words(command: Command) -> str:
    """The command's words after any leading ``NAME=value`` assignments."""
    words = command.key.split()
    while words and re.fullmatch(r"\w+=.*", words[0]):
        words.pop(0)
    return " ".join(words)
