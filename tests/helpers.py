"""Small helpers shared by tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_python(code: str, *, cwd: Path | None = None) -> str:
    """Run ``code`` in a fresh interpreter of this environment; its stdout, on success."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
