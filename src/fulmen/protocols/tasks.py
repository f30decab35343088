"""Start each request's application call in an asyncio Task of its own.

Frameworks depend on the Task: `asyncio.current_task()` must not be None from the first line of
the app (sniffio and anyio ask it which loop runs them; `asyncio.timeout` and task groups hold
the Task to cancel it), and one `contextvars.Context` must carry the whole request (asgiref
resets in a later step a variable it set in the first). So the app never runs outside its Task.

Where Python has eager tasks (3.12+: the documented `Task(..., eager_start=True)`), a request's
Task runs its first step at once, inside `data_received`: an app that never waits writes its
response in the same loop iteration and its Task is never scheduled. Python 3.10 and 3.11 have
no public way to do this, so there the Task starts on the next loop iteration, as under any
other asyncio server.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine
from typing import Any


def start_task(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, None],
    base: contextvars.Context,
    eager: bool,
) -> asyncio.Task[None]:
    """A Task running `coro` in a fresh copy of `base` (never of the caller's context: the
    caller may be the previous request's Task). With `eager` (and Python 3.12+), the first step
    runs before this returns, and the Task may be done already.

    `coro` must handle its own exceptions (a request cycle does).
    """
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, context=base.copy(), eager_start=eager)
    if sys.version_info >= (3, 11):
        return loop.create_task(coro, context=base.copy())
    # 3.10: the Task copies the context current at its creation, here `base`.
    task: asyncio.Task[None] = base.run(loop.create_task, coro)
    return task
