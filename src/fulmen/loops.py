"""Event loop choice: `--loop auto|asyncio|uvloop`."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory for the named loop; 'auto' picks uvloop when it is installed."""
    if name == "auto":
        name = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def run(coro: Coroutine[Any, Any, T], factory: Callable[[], asyncio.AbstractEventLoop]) -> T:
    """`asyncio.run` on a loop made by `factory`."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    loop = factory()  # pragma: no cover - Python 3.10
    try:  # pragma: no cover
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:  # pragma: no cover
        asyncio.set_event_loop(None)
        loop.close()
