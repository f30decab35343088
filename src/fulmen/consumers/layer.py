"""`message['channel_layer']`: how a sync consumer of the channels era deferred work to the loop.

Era consumers did `loop = message['channel_layer'].loop; loop.create_task(work(message))` and
returned; `work` replied later, on the event loop, with the synchronous
`message['reply_channel'].send(...)`. fulmen runs sync consumers in worker threads, so `.loop` is
a `LoopProxy`: scheduling through it is safe from the worker thread and from the loop itself.
The layer also offers the ASGI 1 "groups" extension (`group_add`, `group_discard`,
`send_group`) over the middleware's `groups.Groups`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fulmen.consumers.formats import Reply
from fulmen.consumers.groups import Groups

T = TypeVar("T")

logger = logging.getLogger("fulmen.error")


def on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the caller runs on `loop`, in one of its tasks or callbacks."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class LoopProxy:
    """The server's event loop as a consumer may use it from any thread.

    `create_task`, `ensure_future`, `call_later` and `call_at` run on the loop thread and return
    what the loop returns (a worker thread waits the moment it takes to hand them over);
    `call_soon` is `call_soon_threadsafe`. The tasks started here are kept until they end (the
    loop itself holds tasks only weakly, and era code dropped the task it created); one that
    raises is logged and makes `failed` done.
    """

    __slots__ = ("_loop", "_tasks", "failed")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failed: asyncio.Future[None] = loop.create_future()

    def time(self) -> float:
        return self._loop.time()

    def is_running(self) -> bool:
        return self._loop.is_running()

    def create_task(
        self, coro: Coroutine[Any, Any, T], *, name: str | None = None
    ) -> asyncio.Task[T]:
        return self._on_loop(self._start, coro, name)

    def ensure_future(self, awaitable: Awaitable[T]) -> asyncio.Future[T]:
        if asyncio.isfuture(awaitable):
            return awaitable
        if asyncio.iscoroutine(awaitable):
            return self.create_task(awaitable)
        return self.create_task(_awaited(awaitable))

    def call_soon(self, callback: Callable[..., object], *args: Any) -> asyncio.Handle:
        return self._loop.call_soon_threadsafe(callback, *args)

    call_soon_threadsafe = call_soon

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> asyncio.TimerHandle:
        return self._on_loop(self._loop.call_later, delay, callback, *args)

    def call_at(
        self, when: float, callback: Callable[..., object], *args: Any
    ) -> asyncio.TimerHandle:
        return self._on_loop(self._loop.call_at, when, callback, *args)

    def _on_loop(self, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` on the loop thread: directly there, else handed over and waited for."""
        if on_loop(self._loop):
            return function(*args)
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(function(*args))
            except BaseException as exc:
                result.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return result.result()

    def _start(self, coro: Coroutine[Any, Any, T], name: str | None) -> asyncio.Task[T]:
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error("Exception in a task started by a consumer", exc_info=exc)
            if not self.failed.done():
                self.failed.set_result(None)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


class ChannelLayer:
    """`message['channel_layer']` of a sync consumer: `.loop` and the groups extension.

    Reading `.loop` tells fulmen that the consumer's work may go on after it returns; the group
    methods do not (a WebSocket consumer that joins a group on connect is still accepted when
    it returns).
    """

    __slots__ = ("_groups", "_loop", "_proxy", "used")

    def __init__(self, loop: asyncio.AbstractEventLoop, groups: Groups) -> None:
        self._loop = loop
        self._proxy = LoopProxy(loop)
        self._groups = groups
        self.used = False

    def group_add(self, group: str, channel_name: str) -> None:
        """Add the reply channel named `channel_name` to `group` (from any thread)."""
        self._proxy._on_loop(self._groups.add, group, channel_name)

    def group_discard(self, group: str, channel_name: str) -> None:
        """Remove the reply channel named `channel_name` from `group` (from any thread)."""
        self._proxy._on_loop(self._groups.discard, group, channel_name)

    def send_group(self, group: str, reply: Reply) -> None:
        """Send `reply` to every member of `group`: from a worker thread, returns once each
        member's reply was sent; on the loop, queues them and returns at once."""
        if on_loop(self._loop):
            self._groups.post(group, reply)
        else:
            asyncio.run_coroutine_threadsafe(self._groups.send(group, reply), self._loop).result()

    @property
    def loop(self) -> LoopProxy:
        self.used = True
        return self._proxy

    @property
    def failed(self) -> asyncio.Future[None]:
        """Done once a task started through `.loop` raised."""
        return self._proxy.failed
