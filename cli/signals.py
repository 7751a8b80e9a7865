"""Running a command's event loop until SIGINT or SIGTERM, which end it cleanly: the
commands that run until stopped (simulators, ``watch``) stop on Ctrl-C with their
summary, never with a traceback."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["until_signal"]

T = TypeVar("T")


def until_signal(main: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` with an event SIGINT and SIGTERM set. A signal before the event loop
    takes them over stops the run as soon as it starts, and one after it is over changes
    nothing; the previous handlers come back at the end."""
    early: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, _: early.append(signum))

    async def run() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in previous:
            loop.add_signal_handler(sig, stop.set)
        if early:
            stop.set()
        return await main(stop)

    try:
        try:
            return asyncio.run(run())
        finally:
            for sig in previous:  # asyncio.run put back the defaults
                signal.signal(sig, lambda signum, _: early.append(signum))
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(sig, handler)
