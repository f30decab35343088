"""Start a request's coroutine eagerly, and give it a task only if it has to wait.

Most responses (`hello world`, cached pages, redirects) never wait on anything: running the
first step of the app inside `data_received` writes the response in the same loop iteration
and spares the Task, its scheduling and its registration. A coroutine that does wait is handed
to a Task that resumes it exactly where it stopped. Each request runs in its own copy of the
context, as it would in a Task of its own, so context variables never leak between requests.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any


class _Resume:
    """Awaitable that continues a coroutine whose first step yielded `awaited`."""

    __slots__ = ("awaited", "coro")

    def __init__(self, coro: Coroutine[Any, Any, None], awaited: Any) -> None:
        self.coro = coro
        self.awaited = awaited

    def __await__(self) -> Generator[Any, Any, None]:
        coro, awaited = self.coro, self.awaited
        while True:
            try:
                value = yield awaited
            except BaseException as exc:  # e.g. CancelledError, thrown in by the Task
                try:
                    awaited = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    awaited = coro.send(value)
                except StopIteration:
                    return


async def _finish(resume: _Resume) -> None:
    await resume


def start_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], base: contextvars.Context
) -> asyncio.Task[None] | None:
    """Run `coro` in a copy of `base` until it first waits; return the Task that finishes it,
    or None if it is done.

    `coro` must handle its own exceptions (a request cycle does): only StopIteration ends the
    first step here.
    """
    context = base.copy()
    try:
        awaited = context.run(coro.send, None)
    except StopIteration:
        return None
    # The Task copies the current context: inside `context.run` that is this request's context.
    task: asyncio.Task[None] = context.run(loop.create_task, _finish(_Resume(coro, awaited)))
    return task


def create_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None], base: contextvars.Context
) -> asyncio.Task[None]:
    """A plain Task for `coro`, in a copy of `base` rather than of the caller's context (the
    caller may be the previous request's task)."""
    task: asyncio.Task[None] = base.run(loop.create_task, coro)
    return task
