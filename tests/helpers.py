"""Small helpers shared by tests."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_python(code: str, *, cwd: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter of this environment; its stdout, on success."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_until(done: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``done`` until it is true; fail naming ``what`` after ``timeout`` seconds.
    What tests wait for happens on other processes' time, so never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


class Output:
    """A process started with its output read line by line by a thread, so a test can
    wait for what it prints while it runs, then stop it with a signal."""

    def __init__(self, args: list[str], **popen: Any) -> None:
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            **popen,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in (
                (self.process.stdout, self.lines),
                (self.process.stderr, self.errors),
            )
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        into.extend(line.rstrip("\n") for line in stream)  # item by item, as lines come

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, done: Callable[[str], bool], timeout: float, what: str = "") -> None:
        """Until ``done(everything printed so far)``; fails, with the output, when the
        process ends first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not done(self.text):
            if self.process.poll() is not None or time.monotonic() > deadline:
                ended = self.process.poll()
                self.kill()
                raise AssertionError(
                    f"not seen{f' ({what})' if what else ''}; exit {ended}; stdout:\n"
                    + "\n".join(self.lines[-80:])
                    + "\nstderr:\n"
                    + "\n".join(self.errors[-40:])
                )
            time.sleep(0.1)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 60) -> int:
        """Send ``signum``; the exit status, once the output is read to its end."""
        self.process.send_signal(signum)
        try:
            status = self.process.wait(timeout)
        finally:
            self.kill()
        for thread in self._threads:
            thread.join(10)
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
