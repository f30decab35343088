"""Flow control both ways: pause reading the socket, and wait for the write buffer to drain."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol


class Flow(Protocol):
    """Read pause and write credit of what carries one request or WebSocket: a socket for
    HTTP/1.1 (`FlowControl`), a stream and its connection for HTTP/2.

    A writer checks `write_paused` (an attribute: it is read before every message) and only
    then awaits `drain()`."""

    read_paused: bool
    write_paused: bool

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def drain(self) -> Awaitable[None]: ...


class Stall:
    """Whether a paused writer's peer reads nothing, checked at the server tick: progress is
    what counts (what is waiting to be written shrinks), not how long the writing takes, so a
    slow but steady reader is never cut off (`--timeout-send`)."""

    __slots__ = ("since", "size")

    def __init__(self) -> None:
        self.since = 0.0  # when the writer was last seen paused with no progress since
        self.size = 0  # what was waiting then

    def check(self, now: float, paused: bool, size: int, limit: float) -> bool:
        """`paused` with `size` bytes waiting at `now`: True once nothing moved for `limit`
        (0: never)."""
        if not paused or not limit:
            self.since = 0.0
            return False
        if not self.since or size < self.size:
            self.since = now
        self.size = size
        return now - self.since >= limit


class FlowControl:
    """Read pause and write drain for one transport.

    asyncio calls `pause_writing()` when the transport's write buffer passes its high-water
    mark; `drain()` then suspends the sender until `resume_writing()` or the connection is lost.
    """

    __slots__ = (
        "_drain_waiter",
        "_stall",
        "_transport",
        "file_left",
        "read_paused",
        "write_paused",
    )

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._drain_waiter: asyncio.Future[None] | None = None
        self._stall: Stall | None = None  # made at the first tick that finds writing paused
        self.read_paused = False
        self.write_paused = False
        self.file_left = 0  # bytes of a file still to go straight to the socket (`sendfile`)

    @property
    def transport(self) -> asyncio.Transport:
        return self._transport

    def stalled(self, now: float, limit: float) -> bool:
        """Server tick: whether the client has read nothing for `limit` seconds while the
        write buffer was full (0: never)."""
        stall = self._stall
        if stall is None:
            if not self.write_paused or not limit:
                return False
            stall = self._stall = Stall()
        size = self._transport.get_write_buffer_size() + self.file_left
        return stall.check(now, self.write_paused, size, limit)

    def pause_reading(self) -> None:
        if not self.read_paused and not self._transport.is_closing():
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self._transport.is_closing():
            self.read_paused = False
            self._transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    async def drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = asyncio.get_running_loop().create_future()
        await waiter

    async def writable(self, waiter: asyncio.Future[None], left: int) -> None:
        """Wait (on `waiter`, a new future) for the next `resume_writing()` or the loss of the
        connection, for a writer that bypasses the transport (`os.sendfile`, which has the loop
        call `resume_writing` whenever the socket can take more): `left` is what it still has
        to write, which `stalled` watches shrink."""
        self._drain_waiter = waiter
        self.write_paused = True
        self.file_left = left
        try:
            await waiter
        finally:
            self.write_paused = False
            self.file_left = 0

    def release(self) -> None:
        """The connection is gone: nobody may wait for a drain any more."""
        self.write_paused = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._drain_waiter
        self._drain_waiter = None
        wake(waiter)


def wake(waiter: asyncio.Future[None] | None) -> None:
    """Resume whoever awaits `waiter`, unless it is gone (cancelled) or already resumed."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
