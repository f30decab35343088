"""The one HTTP/1.1 connection: bytes in, ASGI request cycles out, over any parser adapter.

`data_received -> parser.feed -> on_request (scope) -> RequestCycle.run (app) -> send -> write`.
Everything HTTP/1.1 means is decided here once, whichever parser produced the calls: request
framing rules, keep-alive, pipelining, and (as the `Framer` of the request being answered,
with `fulmen.protocols.h1response.H1Response`, which writes the response) when it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import cast

from fulmen.protocols import h2c, wire
from fulmen.protocols.cycle import RequestCycle
from fulmen.protocols.flow import FlowControl
from fulmen.protocols.h1response import H1Response
from fulmen.protocols.h1rules import check_length, keep_alive, origin_path, websocket_upgrade
from fulmen.protocols.h2c import Upgrade
from fulmen.protocols.linger import SHUTDOWN_GRACE, linger
from fulmen.protocols.parsers import PARKED, ParseError, Parser, check_transfer_coding
from fulmen.protocols.scope import (
    EXTENSIONS,
    EXTENSIONS_HTTP10,
    endpoints,
    http_scope,
    tls_of,
)
from fulmen.protocols.tasks import start_task
from fulmen.protocols.websocket import WebSocketRequest, WebSocketSession
from fulmen.protocols.websocket_h1 import H1WebSocket
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

_SPECIAL = frozenset(
    (
        b"host",
        b"connection",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"te",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
    )
)
_VERSIONS = frozenset(("1.1", "1.0"))
# Above this many buffered body bytes the app has not received, stop reading the socket.
HIGH_WATER = 65536


class H1Connection(H1Response, asyncio.Protocol):
    """One client connection. Requests are served one at a time, in order (pipelining).

    The requests of a connection, as the parser delivers them, pass through these slots::

        parsed -> next -> pipeline (FIFO) -> cycle (its app runs, its response is written)
                  ^ first waiting    ^ behind it      ^ at most one; None between responses

        parsing: the request whose body is still arriving (any of the above, or none)
        last:    the request after whose response the connection closes (Connection: close,
                 HTTP/1.0 without keep-alive, an upgrade, a bad request behind it, a response
                 framed by the close, a 500); requests parsed after it are dropped

    | event                         | effect                                                |
    |-------------------------------|-------------------------------------------------------|
    | request head, nothing waiting | `next`; started when the parser returns (`_drive`)    |
    | request head, one waiting     | appended to `pipeline`; reading pauses                |
    | response complete             | closed if it was `last`, or its body is unread; else  |
    |                               | the next waiting request starts, or the connection    |
    |                               | idles (keep-alive timeout) and reading resumes        |
    | parse error                   | answered at once if nothing waits, else `last` = the  |
    |                               | last waiting request, which is answered first         |

    While a request waits, reading stays paused: a client cannot queue unbounded work. The
    connection is also the `Framer` of the request in `cycle`: per-response state (`framing`,
    `remaining`, in `H1Response`) lives here, so serving a request allocates no framer object.
    """

    __slots__ = (
        "client_closes",
        "cycle",
        "deadline",
        "driving",
        "endpoints",
        "flow",
        "h2c",
        "idle",
        "next",
        "parser",
        "parsing",
        "pipeline",
        "proxy",
        "served",
        "sniff",
        "state",
        "taken_over",
        "tls",
        "transport",
        "ws",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.cycle: RequestCycle | None = None  # the cycle whose response is being written
        self.parsing: RequestCycle | None = None  # the cycle whose body is being read
        self.next: RequestCycle | None = None  # the first request waiting for its turn
        self.pipeline: deque[RequestCycle] | None = None  # requests queued behind `next`
        self.client_closes = False  # `last` is so because the client said it sends no more
        self.idle = True
        self.served = False  # a response was written: an idle connection is between requests
        self.driving = False
        self.ws: WebSocketSession | None = None  # a WebSocket handshake not answered yet
        H1Response.__init__(self)  # framing state, and `last`
        self.taken_over = False  # an accepted WebSocket (or HTTP/2) has the socket now
        self.sniff: bytes | None = None  # cleartext with HTTP/2 on: the first bytes, until told
        self.h2c: Upgrade | None = None  # an `Upgrade: h2c` request, while its body arrives

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.state
        self.transport = transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(transport)
        self.parser: Parser = PARKED  # one is taken when the first bytes come
        self.endpoints = client, _, scheme = endpoints(transport)
        self.tls = tls_of(transport, state)
        if state.http2 is not None and scheme == "http":
            self.sniff = b""
        proxy = state.proxy_headers
        self.proxy = proxy if proxy is not None and proxy.trusts(client) else None
        self.deadline = state.clock + state.timeout_request_header
        state.connections.add(self)
        if state.shutting_down:  # accepted just before the listener closed: the grace
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        if self.sniff is not None:
            data = self._sniff(data)
            if not data:
                return
        if self.idle:
            self.idle = False
            state = self.state
            self.deadline = state.clock + state.timeout_request_header
            if self.parser is PARKED:
                self.parser = state.parsers.take(self)
        try:
            self.parser.feed(data)
        except ParseError as exc:
            self.reject(exc.status, exc.reason)
        if self.next is not None and self.cycle is None:
            self._drive()
        if self.parser.upgraded and not self.taken_over:
            if self.h2c is not None:
                self._switch_to_h2c(self.h2c)
            elif not self._awaiting_handshake():
                # No upgrade handler: the request is served as plain HTTP, then the connection
                # ends. (An accepted WebSocket, e.g. by an app that accepted in its first eager
                # step, owns the socket and its reading now.)
                self.flow.pause_reading()

    def _sniff(self, data: bytes) -> bytes:
        """The first bytes: the h2c connection preface goes to HTTP/2 (RFC 9113 §3.3); what
        is returned is HTTP/1.1's to parse."""
        assert self.sniff is not None
        data = self.sniff + data
        preface = h2c.maybe_preface(data)
        if preface is None:  # too few bytes to tell yet
            self.sniff = data
            return b""
        self.sniff = None
        if preface:
            self._hand_over(data, None)
            return b""
        return data

    def _switch_to_h2c(self, upgrade: Upgrade) -> None:
        """The `Upgrade: h2c` request is read whole: 101, then HTTP/2 answers it on stream 1."""
        self.transport.write(h2c.SWITCHING)
        self._hand_over(self.parser.trailing, upgrade)

    def _hand_over(self, data: bytes, upgrade: Upgrade | None) -> None:
        state = self.state
        assert state.http2 is not None
        self.taken_over = True
        state.connections.discard(self)
        self.h2c = self.next = self.pipeline = None
        state.http2(state, self.transport, data, upgrade)

    def _awaiting_handshake(self) -> bool:
        """A WebSocket handshake is being answered: keep reading (to notice the client leave),
        the parser keeps what arrives for the WebSocket, up to a bound."""
        cycle = self.cycle
        return cycle is not None and cycle.websocket and len(self.parser.trailing) <= HIGH_WATER

    def connection_lost(self, exc: Exception | None) -> None:
        # Python 3.10's TLS transport warns when it is collected unclosed, even after the peer
        # closed it; closing a lost transport does nothing else.
        self.transport.close()
        self._release()

    def _release(self) -> None:
        """The connection is over for HTTP: its requests see `http.disconnect`."""
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
        self.cycle = self.parsing = self.next = self.pipeline = self.last = self.ws = None
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
        expect = forwarded = te_trailers = False
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
                elif name == b"te":
                    te_trailers = te_trailers or b"trailers" in value.lower()
                else:
                    forwarded = True
        if version not in _VERSIONS:
            raise ParseError(505, f"HTTP version {version} not supported")
        if coding is not None:  # (before the Host rule, as the h11 adapter meets it)
            check_transfer_coding(coding, length is not None)
        if host_count > 1 or (version == "1.1" and host_count == 0):
            raise ParseError(400, "Missing or duplicate Host header")
        if host_count and not wire.valid_host(host):
            raise ParseError(400, "Invalid Host header")
        if upgrade and self._wants_h2c(
            method, target, version, headers, upgrade, connection, length, coding
        ):
            return
        if coding is None and length is not None and state.limit_request_body is not None:
            check_length(int(length), state.limit_request_body)
        self.deadline = 0.0
        if self.last is not None:
            # Behind the request that ends the connection (RFC 9112 §9.6): never served.
            self.parsing = None
            self.flow.pause_reading()
            return
        raw_path, _, query = target.partition(b"?")
        if raw_path[:1] != b"/" and raw_path != b"*":
            raw_path = origin_path(raw_path)
        proxy = self.proxy if forwarded else None
        if version == "1.1":  # RFC 9110 §15.2: no 1xx responses to an HTTP/1.0 client
            extensions = EXTENSIONS.copy()
            if te_trailers:  # the client reads trailers (RFC 9110 §10.1.4)
                extensions["http.response.trailers"] = {}
        else:
            extensions = EXTENSIONS_HTTP10.copy()
        if self.tls is not None:
            extensions["tls"] = self.tls
        scope = http_scope(
            state, method, raw_path, query, version, headers, self.endpoints, proxy, extensions
        )
        has_body = length not in (None, b"0") or coding is not None
        expect = expect and has_body
        if upgrade and state.ws_factory is not None and websocket_upgrade(upgrade, connection):
            cycle: RequestCycle = WebSocketRequest(state, self, scope, has_body, expect)
            self.last = cycle
        else:
            cycle = RequestCycle(state, self, scope, has_body, expect)
            if not keep_alive(version, connection):
                self.last = cycle
                self.client_closes = True
        self.parsing = cycle if has_body else None
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

    def _wants_h2c(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: list[tuple[bytes, bytes]],
        upgrade: bytes,
        connection: bytes,
        length: bytes | None,
        coding: bytes | None,
    ) -> bool:
        """An `Upgrade: h2c` request that we follow: it is answered over HTTP/2 once read."""
        if (
            self.state.http2 is None
            or self.endpoints[2] != "http"
            or version != "1.1"
            or self.cycle is not None
            or self.next is not None
            or self.last is not None
        ):
            return False
        settings = h2c.upgrade_settings(headers, upgrade, connection, length, coding is not None)
        if settings is None:
            return False
        self.h2c = Upgrade(method, target, headers, settings)
        self.deadline = 0.0
        self.parsing = None
        return True

    def on_body(self, data: bytes) -> None:
        cycle = self.parsing
        if cycle is None:
            if self.h2c is not None:
                self.h2c.body += data
            return
        limit = self.state.limit_request_body
        if limit is not None:  # before buffering: the app never sees more than the limit
            check_length(cycle.body_received + len(data), limit)
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
        if cycle.status:  # refused before its turn (`_refuse_body`): its app does not run
            cycle.reject(cycle.status, wire.status_line(cycle.status)[13:-2])
            return
        if limit and len(state.tasks) >= limit:  # requests running, on all connections
            cycle.reject(503, b"Service Unavailable")
            return
        if cycle.websocket:
            driver = H1WebSocket(state, self.transport, self.flow, self._detach)
            driver.session = self.ws = WebSocketSession(cast(WebSocketRequest, cycle), driver)
            coro = self.ws.run(state.app)
        else:
            coro = cycle.run(state.app)
        task = start_task(state.loop, coro, state.context, eager)
        if not task.done():  # an eager first step may have finished the request already
            cycle.task = task
            state.tasks.add(task)

    # The rest of the Framer (sending is `H1Response`'s)

    def consumed(self, size: int) -> None:
        self.maybe_resume_reading()

    def abort(self) -> None:
        self.transport.close()  # the peer sees the body end short of its framing

    def complete(self) -> None:
        """The response is written: serve the next pipelined request, or wait for one."""
        cycle = self.cycle
        state = self.state
        if cycle is self.last or cycle is self.parsing or state.shutting_down:
            self._close(cycle is not self.last or not self.client_closes)
            return
        self.cycle = None
        self.served = True
        if self.next is None:
            self.idle = True
            self.deadline = state.clock + state.timeout_keep_alive
            if state.parsers.give(self.parser):  # nothing of a next request came
                self.parser = PARKED
        elif not self.driving:
            # In a task, inside the previous app's send(): start the next one as a task of its
            # own. (Inside data_received, _drive starts it.)
            queued = self._pop_next()
            if queued is not None:
                self._start(queued, False)
        self.maybe_resume_reading()

    def _detach(self) -> bytes:
        """An accepted WebSocket takes the socket over: let go of it and of the request, and
        hand over the bytes that arrived after the request."""
        self.taken_over = True
        self.state.connections.discard(self)
        pending = self.parser.trailing
        self.cycle = self.parsing = self.next = self.pipeline = self.last = self.ws = None
        return pending

    def maybe_resume_reading(self) -> None:
        """Read again once no pipelined request waits and the body buffer has room."""
        if not self.flow.read_paused or self.next is not None or self.parser.upgraded:
            return
        if self.parsing is None or len(self.parsing.body) <= HIGH_WATER:
            self.flow.resume_reading()

    # Errors, timeouts, shutdown

    def reject(self, status: int, reason: str) -> None:
        """Answer a request that cannot be served with `status`, then close the connection.

        Requests queued before the bad one are answered first. A body that turns out malformed
        (or over the limit) is answered the same way unless its response has begun
        (`_refuse_body`).
        """
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Rejected request (%d): %s", status, wire.escape(reason))
        parsing = self.parsing
        if parsing is not None:
            self._refuse_body(parsing, status)
            return
        before = self.pipeline[-1] if self.pipeline else (self.next or self.cycle)
        if before is not None:
            self.flow.pause_reading()
            if self.last is None:
                self.last = before
            return
        if before is None and not self.transport.is_closing():
            # The status phrase only: the detail may quote the client's bytes back.
            body = wire.status_line(status)[13:-2]
            lines = wire.PLAIN + self.state.default_headers
            self.transport.write(wire.simple_response(status, body, lines))
            # The client may still be sending (a body over the limit): it reads the status
            # rather than a reset.
            if linger(self.transport, self.state):
                self._release()
            return
        self.transport.close()

    def _refuse_body(self, cycle: RequestCycle, status: int) -> None:
        """The body of `cycle` cannot be read: nothing more is parsed, the connection ends after
        `cycle`, which is answered `status` if its response has not begun (else it is cut)
        and whose app sees `http.disconnect`; one still queued is answered when its turn comes,
        without running its app."""
        self.parsing = None
        self.flow.pause_reading()
        self.last = cycle
        if cycle is self.cycle:
            cycle.refuse_body(status, wire.status_line(status)[13:-2])
        else:
            cycle.status = status  # `_start` refuses it

    def _close(self, lingering: bool = True) -> None:
        """Close, `lingering` (`fulmen.protocols.linger`) unless the client said it sends
        nothing more and nothing it sent is left unread."""
        if lingering or self.flow.read_paused or self.parsing is not None or self.next is not None:
            if linger(self.transport, self.state):
                self._release()  # else connection_lost does it
        else:
            self.transport.close()

    def check_timeout(self, now: float) -> None:
        """Called by the server tick: close a connection idle or stalled past its deadline,
        end a request whose body comes too slowly, and close a connection whose client reads
        nothing of the response (`--timeout-request-body`, `--timeout-send`)."""
        if self.deadline and now >= self.deadline:
            if self.idle:
                self._close()
            else:
                self.reject(408, "Request Timeout")
            return
        if self.idle and self.parser is not PARKED and self.state.parsers.drop(self.parser):
            self.parser = PARKED  # an idle connection holds no parser past a tick
        cycle = self.cycle
        if cycle is not None and cycle is self.parsing and cycle.body_timed_out(now):
            cycle.refuse_body(408, b"Request Timeout")
        elif self.flow.stalled(now, self.state.timeout_send):
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("Closed a connection whose client reads nothing of its response")
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful shutdown: a connection serving a request closes after its response (sent
        with `connection: close`). An idle one, new or between requests, stays open for
        `SHUTDOWN_GRACE` seconds: a request may be on its way already, and closing would lose
        it (RFC 9112 §9.6: the client cannot tell whether it was processed; a client sending
        into a closed socket gets a reset). One that comes is answered, with `connection:
        close`; a connection still idle after the grace is closed. One whose request head is
        arriving gets until the next timeout sweep to finish it."""
        if self.cycle is not None:
            return
        if self.idle:
            self.state.loop.call_later(SHUTDOWN_GRACE, self._close_idle)
        else:
            clock = self.state.clock
            self.deadline = min(self.deadline, clock) if self.deadline else clock

    def _close_idle(self) -> None:
        """The shutdown grace is over: close the connection unless a request came meanwhile."""
        if self.idle and self.cycle is None and not self.taken_over:
            self._close()
