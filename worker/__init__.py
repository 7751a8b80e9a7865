"""The normalization worker: ``energybus run --config site.toml``.

See ``docs/worker.md`` for the configuration, the topics it owns, the delivery
guarantees and what holds across several workers.
"""

from __future__ import annotations

from .config import Config, load_config
from .core import Worker, run_worker

__all__ = ["Config", "Worker", "load_config", "run_worker"]
