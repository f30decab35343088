"""What HTTP/2 and HTTP/3 streams share: starting the application for a request stream, the
response's Content-Length count, waiting for write credit, and the per-tick checks.

A stream's request is either an ordinary request (a `RequestCycle`) or an extended CONNECT
for a WebSocket (RFC 8441, RFC 9220), whose session takes the stream's data through
`StreamWebSocket`. Either way the app runs in a Task of its own, within
`--limit-concurrency`, and the stream learns which cycle serves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Protocol, cast

from fulmen.protocols.cycle import Framer, RequestCycle
from fulmen.protocols.tasks import start_task
from fulmen.protocols.websocket import WebSocketRequest, WebSocketSession
from fulmen.protocols.websocket_stream import StreamWebSocket, TunnelStream
from fulmen.state import ServerState


class Tunnel(Protocol):
    """What takes a stream's data instead of a request body: a WebSocket (RFC 8441, RFC 9220,
    `fulmen.protocols.websocket_stream.StreamWebSocket`)."""

    def on_data(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...

    def on_reset(self) -> None: ...


class Waiting(Protocol):
    write_paused: bool  # the response waits for flow-control credit
    waiter: asyncio.Future[None] | None  # woken by the stream when credit comes


class Ticked(Protocol):
    tunnel: Any

    def check_timeout(self, now: float) -> None: ...


class Stream(Framer, TunnelStream, Protocol):
    """A request stream (`H2Stream`, `H3Stream`), as the cycle's framer."""

    cycle: RequestCycle | None
    tunnel: Any  # a `StreamWebSocket` once the stream carries one


def start(
    state: ServerState,
    stream: Stream,
    scope: dict[str, Any],
    protocol: bytes,
    body: tuple[bool, bool, bytes],
) -> None:
    """Run the app for `stream`. `protocol`: the extended CONNECT's `:protocol` (empty for an
    ordinary request); `body`: whether more of the body is to come, whether the client waits
    for 100 Continue, and the body read already (an h2c upgrade's)."""
    if protocol:
        cycle: RequestCycle = WebSocketRequest(state, stream, scope)
        stream.cycle = cycle
        if protocol != b"websocket":  # RFC 8441 §4: a protocol we do not speak
            cycle.reject(501, b"Unsupported :protocol")
            return
        driver = stream.tunnel = StreamWebSocket(stream)
        driver.session = session = WebSocketSession(cast(WebSocketRequest, cycle), driver)
        coro = session.run(state.app)
    else:
        more_body, expect, data = body
        cycle = RequestCycle(state, stream, scope, more_body, expect)
        stream.cycle = cycle
        if data:  # before the app's first step, which may run at once (eager tasks)
            cycle.on_body(data)
        coro = cycle.run(state.app)
    limit = state.limit_concurrency
    if limit and len(state.tasks) >= limit:
        coro.close()
        cycle.reject(503, b"Service Unavailable")
        return
    task = start_task(state.loop, coro, state.context, True)
    if not task.done():
        cycle.task = task
        state.tasks.add(task)


NO_BODY_STATUSES = frozenset((204, 304))


def head_rules(
    method: str, status: int, length: int | None, body: bytes, more_body: bool
) -> tuple[bool, int | None, bool]:
    """For a response head with its first body: whether the response has no body (HEAD, 204,
    304), what is left of the application's Content-Length (`length`) after `body`, and
    whether the server must add a Content-Length (a whole body the app gave none for)."""
    no_body = method == "HEAD" or status in NO_BODY_STATUSES
    if length is not None:
        return no_body, length if no_body else count_body(length, body, more_body), False
    return no_body, None, not more_body and not no_body


def count_body(remaining: int, body: bytes, more_body: bool) -> int:
    """What is left of the application's Content-Length after `body` (RFC 9113 §8.1.1,
    RFC 9114 §4.1.2); RuntimeError, nothing sent, when the body breaks it."""
    remaining -= len(body)
    if remaining < 0:
        raise RuntimeError("Response content longer than Content-Length")
    if not more_body and remaining:
        raise RuntimeError("Response content shorter than Content-Length")
    return remaining


async def drain(stream: Waiting) -> None:
    """A stream's `Flow.drain`: wait for its write credit, if it has none."""
    if not stream.write_paused:
        return
    waiter = stream.waiter
    if waiter is None or waiter.done():
        waiter = stream.waiter = asyncio.get_running_loop().create_future()
    await waiter


def sessions(streams: Iterable[Ticked]) -> list[WebSocketSession]:
    """The WebSockets open on these streams."""
    return [
        stream.tunnel.session
        for stream in streams
        if isinstance(stream.tunnel, StreamWebSocket) and stream.tunnel.session is not None
    ]


def tick(streams: Iterable[Ticked], now: float) -> None:
    """Server tick: each stream's timeouts, and its WebSocket's."""
    streams = list(streams)
    for stream in streams:
        stream.check_timeout(now)
    for session in sessions(streams):
        session.check_timeout(now)
