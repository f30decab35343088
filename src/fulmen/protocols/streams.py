"""Starting the application for a request stream, the same for HTTP/2 and HTTP/3.

A stream's request is either an ordinary request (a `RequestCycle`) or an extended CONNECT
for a WebSocket (RFC 8441, RFC 9220), whose session takes the stream's data through
`StreamWebSocket`. Either way the app runs in a Task of its own, within
`--limit-concurrency`, and the stream learns which cycle serves it.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from fulmen.protocols.cycle import Framer, RequestCycle
from fulmen.protocols.tasks import start_task
from fulmen.protocols.websocket import WebSocketRequest, WebSocketSession
from fulmen.protocols.websocket_stream import StreamWebSocket, TunnelStream
from fulmen.state import ServerState


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
