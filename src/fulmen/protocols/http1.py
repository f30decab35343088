"""The one HTTP/1.1 connection: bytes in, ASGI request cycles out, over any parser adapter.

`data_received -> parser.feed -> on_request (scope) -> RequestCycle.run (app) -> send -> write`.
Everything HTTP means is decided here once, whichever parser produced the calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import cast
from urllib.parse import unquote_to_bytes

from fulmen.protocols import wire
from fulmen.protocols.cycle import RequestCycle
from fulmen.protocols.flow import FlowControl
from fulmen.protocols.parsers import ParseError, Parser, check_transfer_coding
from fulmen.protocols.tasks import start_task
from fulmen.protocols.websocket import WebSocketCycle, WebSocketRequest
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

ASGI_INFO = {"version": "3.0", "spec_version": "2.5"}
_SPECIAL = frozenset(
    (
        b"host",
        b"connection",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
    )
)
_VERSIONS = frozenset(("1.1", "1.0"))
_METHODS: dict[bytes, str] = {}
# Above this many buffered body bytes the app has not received, stop reading the socket.
HIGH_WATER = 65536


def _address(info: object) -> tuple[str, int] | None:
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


class H1Connection(asyncio.Protocol):
    """One client connection. Requests are served one at a time, in order (pipelining)."""

    __slots__ = (
        "client",
        "cycle",
        "deadline",
        "driving",
        "flow",
        "idle",
        "next",
        "parser",
        "parsing",
        "pipeline",
        "proxy",
        "scheme",
        "served",
        "server",
        "state",
        "transport",
        "ws",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.cycle: RequestCycle | None = None  # the cycle whose response is being written
        self.parsing: RequestCycle | None = None  # the cycle whose body is being read
        self.next: RequestCycle | None = None  # the first request waiting for its turn
        self.pipeline: deque[RequestCycle] | None = None  # requests queued behind `next`
        self.idle = True
        self.served = False  # a response was written: an idle connection is between requests
        self.driving = False
        self.ws: WebSocketCycle | None = None  # a WebSocket handshake the app has not answered

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.state
        self.transport = transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(transport)
        self.parser: Parser = state.parser_factory(self, state.limits)
        self.client = _address(transport.get_extra_info("peername"))
        self.server = _address(transport.get_extra_info("sockname"))
        self.scheme = "https" if transport.get_extra_info("sslcontext") else "http"
        proxy = state.proxy_headers
        self.proxy = proxy if proxy is not None and proxy.trusts(self.client) else None
        self.deadline = state.clock + state.timeout_request_header
        state.connections.add(self)
        if state.shutting_down:  # accepted just before the listener closed
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.idle:
            self.idle = False
            self.deadline = self.state.clock + self.state.timeout_request_header
        try:
            self.parser.feed(data)
        except ParseError as exc:
            self.reject(exc.status, exc.reason)
        if self.next is not None and self.cycle is None:
            self._drive()
        if self.parser.upgraded and not self._awaiting_handshake():
            # No upgrade handler: the request is served as plain HTTP, then the connection ends.
            self.flow.pause_reading()

    def _awaiting_handshake(self) -> bool:
        """A WebSocket handshake is being answered: keep reading (to notice the client leave),
        the parser keeps what arrives for the WebSocket, up to a bound."""
        cycle = self.cycle
        return cycle is not None and cycle.websocket and len(self.parser.trailing) <= HIGH_WATER

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.flow.release()
        for cycle in (self.cycle, self.parsing, self.next, *(self.pipeline or ())):
            if cycle is not None:
                cycle.on_disconnect()
        if self.ws is not None:
            self.ws.on_disconnect()
        # Each of these refers back to this connection: dropping them here lets the connection
        # be freed by reference counting as soon as its last task ends. (Left to the cyclic
        # garbage collector, a closed connection cost more than its request under `close` load.)
        self.cycle = self.parsing = self.next = self.pipeline = self.ws = None
        self.parser.close()

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # Parser callbacks

    def on_request(
        self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]]
    ) -> None:
        state = self.state
        host_count = 0
        host = b""
        connection = b""
        expect = forwarded = False
        upgrade = b""
        length: bytes | None = None
        coding: bytes | None = None
        for name, value in headers:
            if name in _SPECIAL:
                if name == b"host":
                    host_count += 1
                    host = value
                elif name == b"connection":
                    connection += b"," + value.lower()
                elif name == b"content-length":
                    length = value
                elif name == b"transfer-encoding":
                    coding = value if coding is None else coding + b"," + value
                elif name == b"expect":
                    expect = value.lower() == b"100-continue"
                elif name == b"upgrade":
                    upgrade += b"," + value.lower()
                else:
                    forwarded = True
        if version not in _VERSIONS:
            raise ParseError(505, f"HTTP version {version} not supported")
        if host_count > 1 or (version == "1.1" and host_count == 0):
            raise ParseError(400, "Missing or duplicate Host header")
        if host_count and not wire.valid_host(host):
            raise ParseError(400, "Invalid Host header")
        if coding is not None:
            check_transfer_coding(coding, length is not None)
        elif length is not None and state.limit_request_body is not None:
            _check_length(int(length), state.limit_request_body)
        keep_alive = _keep_alive(version, connection)
        self.deadline = 0.0
        scope = self._scope(method, target, version, headers)
        if forwarded and self.proxy is not None:
            self.proxy.apply(scope)
        if upgrade and state.ws_factory is not None and _websocket_upgrade(upgrade, connection):
            cycle: RequestCycle = WebSocketRequest(self, scope, False)
        else:
            cycle = RequestCycle(self, scope, keep_alive)
        cycle.more_body = has_body = length not in (None, b"0") or coding is not None
        cycle.expect_100 = expect and has_body
        self.parsing = cycle if cycle.more_body else None
        if self.next is None:
            self.next = cycle
            if self.cycle is None:
                return  # started by data_received once the parser has returned
            # The previous response is still being written, e.g. its app has sent the last
            # Content-Length byte but not yet its final message, and the client went on:
            # started when that response completes.
            self.flow.pause_reading()
            return
        if self.pipeline is None:
            self.pipeline = deque()
        self.pipeline.append(cycle)
        self.flow.pause_reading()

    def _scope(
        self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]]
    ) -> dict[str, object]:
        state = self.state
        raw_path, _, query = target.partition(b"?")
        if raw_path[:1] != b"/" and raw_path != b"*":
            raw_path = _origin_path(raw_path)
        if b"%" in raw_path or not raw_path.isascii():
            path = unquote_to_bytes(raw_path).decode("utf-8", "replace")
        else:
            path = raw_path.decode("ascii")
        method_str = _METHODS.get(method)
        if method_str is None:
            method_str = method.decode("ascii")
            if len(_METHODS) < 64:
                _METHODS[method] = method_str
        root_path = state.root_path
        if root_path:
            path = root_path + path
            raw_path = root_path.encode("utf-8") + raw_path
        return {
            "type": "http",
            "asgi": ASGI_INFO,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": method_str,
            "root_path": root_path,
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
            "state": state.app_state.copy(),
            "extensions": {},
        }

    def on_body(self, data: bytes) -> None:
        cycle = self.parsing
        if cycle is None:
            return
        limit = self.state.limit_request_body
        if limit is not None:  # before buffering: the app never sees more than the limit
            _check_length(cycle.body_received + len(data), limit)
        cycle.on_body(data)
        if len(cycle.body) > HIGH_WATER:
            self.flow.pause_reading()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        if cycle is not None:
            self.parsing = None
            cycle.on_message_complete()

    # Request cycle driving

    def _pop_next(self) -> RequestCycle | None:
        cycle = self.next
        if cycle is not None:
            self.next = self.pipeline.popleft() if self.pipeline else None
        return cycle

    def _drive(self) -> None:
        """Start waiting requests in order, each in a Task whose first step runs at once where
        Python has eager tasks (`fulmen.protocols.tasks`)."""
        self.driving = True
        try:
            while self.cycle is None:
                cycle = self._pop_next()
                if cycle is None:
                    break
                self._start(cycle, True)
        finally:
            self.driving = False
        self.maybe_resume_reading()

    def _start(self, cycle: RequestCycle, eager: bool) -> None:
        self.cycle = cycle
        state = self.state
        limit = state.limit_concurrency
        if limit and (len(state.connections) > limit or len(state.tasks) >= limit):
            cycle.reject(503, b"Service Unavailable")
            return
        if cycle.websocket:
            self.ws = WebSocketCycle(self, cast(WebSocketRequest, cycle))
            coro = self.ws.run(state.app)
        else:
            coro = cycle.run(state.app)
        task = start_task(state.loop, coro, state.context, eager)
        if not task.done():  # an eager first step may have finished the request already
            cycle.task = task
            state.tasks.add(task)

    def on_response_complete(self, cycle: RequestCycle) -> None:
        """The response is written: serve the next pipelined request, or wait for one."""
        state = self.state
        if state.access_log:
            cycle.log_access()
        state.total_requests += 1
        if state.total_requests == state.limit_max_requests:
            state.on_max_requests()
        if not cycle.keep_alive or cycle is self.parsing or state.shutting_down:
            self.transport.close()
            return
        self.cycle = None
        self.served = True
        if self.next is None:
            self.idle = True
            self.deadline = state.clock + state.timeout_keep_alive
        elif not self.driving:
            # In a task, inside the previous app's send(): start the next one as a task of its
            # own. (Inside data_received, _drive starts it.)
            queued = self._pop_next()
            if queued is not None:
                self._start(queued, False)
        self.maybe_resume_reading()

    def maybe_resume_reading(self) -> None:
        """Read again once no pipelined request waits and the body buffer has room."""
        if not self.flow.read_paused or self.next is not None or self.parser.upgraded:
            return
        if self.parsing is None or len(self.parsing.body) <= HIGH_WATER:
            self.flow.resume_reading()

    # Errors, timeouts, shutdown

    def reject(self, status: int, reason: str) -> None:
        """Answer a request that cannot be served with `status`, then close the connection.

        Requests queued before the bad one are answered first; a body that turns out malformed
        ends the connection (its app sees `http.disconnect`).
        """
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Rejected request (%d): %s", status, wire.escape(reason))
        before = self.pipeline[-1] if self.pipeline else (self.next or self.cycle)
        if before is not None and self.parsing is None:
            self.flow.pause_reading()
            before.keep_alive = False
            return
        if before is None and not self.transport.is_closing():
            # The status phrase only: the detail may quote the client's bytes back.
            body = wire.status_line(status)[13:-2]
            self.transport.write(wire.simple_response(status, body, self.state.default_headers))
        self.transport.close()

    def check_timeout(self, now: float) -> None:
        """Called by the server tick: close a connection idle or stalled past its deadline."""
        if self.deadline and now >= self.deadline:
            if self.idle:
                self.transport.close()
            else:
                self.reject(408, "Request Timeout")

    def shutdown(self) -> None:
        """Graceful shutdown: close now when idle between requests, otherwise after the current
        response. A new connection, or one whose request head is arriving, gets until the next
        timeout sweep to send it: its request may be on the way already. (Clients expect an
        idle persistent connection to close at any time and retry on a fresh one, RFC 9112
        §9.3.1; a request on a new connection they take as failed.)"""
        if self.cycle is not None:
            return
        if self.idle and self.served:
            self.transport.close()
        else:
            clock = self.state.clock
            self.deadline = min(self.deadline, clock) if self.deadline else clock


def _keep_alive(version: str, connection: bytes) -> bool:
    """RFC 9112 §9.3: HTTP/1.1 persists unless `close`; HTTP/1.0 only with `keep-alive`.
    An upgrade request is served as plain HTTP, then the connection ends."""
    if not connection:
        return version == "1.1"
    tokens = {token.strip() for token in connection.split(b",")}
    if b"upgrade" in tokens:
        return False
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def _websocket_upgrade(upgrade: bytes, connection: bytes) -> bool:
    """RFC 6455 §4.2.1: `Upgrade: websocket` with `Connection: upgrade` (tokens, any case)."""
    tokens = {token.strip() for token in connection.split(b",")}
    return b"upgrade" in tokens and b"websocket" in {t.strip() for t in upgrade.split(b",")}


def _check_length(length: int, limit: int) -> None:
    if length > limit:
        raise ParseError(413, "Request body too large")


def _origin_path(target: bytes) -> bytes:
    """The path of an absolute-form target (RFC 9112 §3.2.2), e.g. from a proxy."""
    scheme_end = target.find(b"://")
    if scheme_end < 0:
        raise ParseError(400, "Invalid request target")
    slash = target.find(b"/", scheme_end + 3)
    return target[slash:] if slash >= 0 else b"/"
