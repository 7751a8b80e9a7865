"""Reconnecting with capped exponential backoff and jitter, shared by every connection."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays of ``low * 2**attempt``, capped at ``high``, each times a random 0.5..1.0
    so that many workers restarted together do not reconnect in step."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high, self.attempt = low, high, 0

    def next(self) -> float:
        delay = min(self.high, self.low * 2**self.attempt)
        self.attempt += 1
        return float(delay * random.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.attempt = 0
