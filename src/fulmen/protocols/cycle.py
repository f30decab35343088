"""The one ASGI HTTP request cycle, the same for every protocol: `receive`, `send`, running the
app, the error policy and the access log.

The cycle knows no wire format and holds no connection. It talks to a `Framer`, which each
protocol implements for the request it serves: HTTP/1.1 for the request being answered on
its connection (`fulmen.protocols.http1`), HTTP/2 and HTTP/3 per stream. The calls are direct
method calls, with no event objects, queues or locks per message.

The response head is held until the first body message, so that the framer can send head and
body at once (allowed by the ASGI spec) and knows whether the body is whole (HTTP/1.1 then
sends Content-Length instead of chunked framing).

Error policy, whatever the protocol: a failure before the head is sent becomes a 500; a
failure after it aborts this one response (HTTP/1.1 has to close the connection for it,
HTTP/2 resets only the stream); a client that left needs no answer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from fulmen.protocols import wire
from fulmen.protocols.filesend import FILE_MESSAGES, FileBody, with_length
from fulmen.protocols.flow import Flow, FlowControl, wake
from fulmen.state import ServerState
from fulmen.types import ASGIApp, Message

logger = logging.getLogger("fulmen.error")
access_logger = logging.getLogger("fulmen.access")

Headers = Iterable[tuple[bytes, bytes]]
# Past `--timeout-request-body` of waiting, a body must keep coming at this average rate (as
# Apache's mod_reqtimeout MinRate): a byte every few seconds cannot hold a request open.
MIN_BODY_RATE = 500  # bytes per second
_ERROR_500 = b"Internal Server Error"
_PLAIN = (b"content-type", b"text/plain; charset=utf-8")


class Framer(Protocol):
    """What a protocol does for the one request a cycle serves.

    The cycle calls these in ASGI order: at most one `send_head`, then `send_body` until
    `more_body` is false; or `send_plain` instead of both, for a response the server makes up.
    `send_head` and `send_body` raise RuntimeError, having sent nothing, for a response the
    protocol cannot frame (an invalid header, a body longer than its Content-Length). `complete`
    comes once, after the last byte; `abort` instead, if the response cannot be finished.
    """

    def send_head(self, status: int, headers: Headers, body: bytes, more_body: bool) -> None:
        """Validate and send the response head with the first body message."""

    def send_body(self, body: bytes, more_body: bool) -> None:
        """Send more of the body; `more_body=False` ends it."""

    def send_interim(self, status: int, headers: Headers = ()) -> None:
        """An informational response (RFC 9110 §15.2): 100 Continue, 103 Early Hints."""

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        """End a body sent with `more_body=True` with these trailer fields (RFC 9110 §6.5);
        a protocol whose framing cannot carry them ends the body without them."""

    def send_plain(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """A whole `text/plain` response from the server itself (500, 503, a refused
        WebSocket handshake), with `headers` besides the defaults."""

    def file_socket(self, count: int) -> FlowControl | None:
        """For a body from a file (`fulmen.protocols.filesend`): the socket to `os.sendfile`
        the next `count` bytes into (they count as sent), or None to read them and call
        `send_body` (TLS, chunked framing, HTTP/2)."""

    def consumed(self, size: int) -> None:
        """The app has taken `size` body bytes: the peer may send more (HTTP/1.1 resumes
        reading the socket, HTTP/2 sends WINDOW_UPDATE)."""

    @property
    def flow(self) -> Flow:
        """Write credit: while `flow.write_paused`, the cycle awaits `flow.drain()` before
        sending (the socket's write buffer; for HTTP/2 also the flow-control windows)."""

    def abort(self) -> None:
        """The response cannot be finished: end it so the peer sees it broken."""

    def complete(self) -> None:
        """The response was sent whole (or answered by `send_plain`)."""


class Phase(enum.Enum):
    """Where the response stands."""

    START = enum.auto()  # nothing from the app yet
    HEAD = enum.auto()  # http.response.start received, held until the first body message
    BODY = enum.auto()  # the head is sent, the body is streaming
    TRAILERS = enum.auto()  # the body is sent, its trailers are awaited (`trailers: True`)
    DONE = enum.auto()  # the response is complete


START = Phase.START
HEAD = Phase.HEAD
BODY = Phase.BODY
TRAILERS = Phase.TRAILERS
DONE = Phase.DONE


class BodyWatch:
    """How a request body arrives while the app waits for it, seen at the server ticks."""

    __slots__ = ("idle", "mark", "seen", "waited")

    def __init__(self, now: float, received: int) -> None:
        self.seen = now  # the last tick that found the app waiting (0: not waiting then)
        self.mark = received  # body bytes received by then
        self.idle = 0.0  # seconds of waiting with no byte
        self.waited = 0.0  # seconds of waiting in all


class RequestCycle:
    websocket = False  # a WebSocket handshake (`fulmen.protocols.websocket.WebSocketRequest`)

    __slots__ = (
        "body",
        "body_received",
        "disconnected",
        "expect_100",
        "framer",
        "headers",
        "more_body",
        "phase",
        "receiving",
        "request_done",
        "scope",
        "server",
        "status",
        "task",
        "trailers",
        "waiter",
        "watch",
    )

    def __init__(
        self,
        server: ServerState,
        framer: Framer,
        scope: dict[str, Any],
        more_body: bool = False,
        expect_100: bool = False,
    ) -> None:
        """`more_body`: a request body is to come (`on_body`, then `on_message_complete`);
        `expect_100`: the client waits for 100 Continue before sending it."""
        self.server = server
        self.framer = framer
        self.scope = scope
        self.body = b""
        self.body_received = 0
        self.more_body = more_body  # request body bytes are still to come
        self.request_done = False  # the final http.request message was handed to the app
        self.receiving = False  # the app has called receive()
        self.expect_100 = expect_100
        self.disconnected = False
        self.phase = START
        self.status = 0
        self.headers: Any = ()
        self.trailers: list[tuple[bytes, bytes]] | None = None  # collected, if announced
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        # `watch` (BodyWatch) is set by the first tick that finds the app waiting for body:
        # left unset until then, it costs a request nothing.

    # Events from the protocol

    def on_body(self, data: bytes) -> None:
        self.body += data
        self.body_received += len(data)
        self._wake()

    def on_message_complete(self) -> None:
        self.more_body = False
        self._wake()

    def on_disconnect(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            wake(waiter)

    def body_timed_out(self, now: float) -> bool:
        """Server tick: whether the client sends the body too slowly. Only time the app
        spends waiting in `receive()` counts: none must pass `--timeout-request-body` with no
        byte, nor all of it `--timeout-request-body` plus one second per `MIN_BODY_RATE`
        bytes received."""
        limit = self.server.timeout_request_body
        watch: BodyWatch | None = getattr(self, "watch", None)
        if self.waiter is None or not self.more_body or not limit:
            if watch is not None:
                watch.seen = 0.0  # the app is busy (or the body is in): its time is its own
            return False
        received = self.body_received
        if watch is None:
            self.watch = BodyWatch(now, received)
            return False
        if watch.seen:
            elapsed = now - watch.seen
            watch.waited += elapsed
            watch.idle = 0.0 if received > watch.mark else watch.idle + elapsed
        watch.seen, watch.mark = now, received
        return watch.idle >= limit or watch.waited >= limit + received / MIN_BODY_RATE

    def refuse_body(self, status: int, phrase: bytes) -> None:
        """The body cannot be read (it comes too slowly: 408; it is malformed: 400): `status`
        (the connection, or the stream, then ends) if no response was sent yet, else the
        response is cut. The app sees `http.disconnect`."""
        if self.phase is START or self.phase is HEAD:
            self.reject(status, phrase)
        elif self.phase is not DONE:
            self.framer.abort()
        self.on_disconnect()

    # ASGI

    async def receive(self) -> Message:
        self.receiving = True
        if self.expect_100:
            # RFC 9110 §10.1.1: ask for the body only once the app wants it.
            self.expect_100 = False
            if self.phase is START and not self.disconnected:
                self.framer.send_interim(100)
        if not (self.body or self.disconnected or self.phase is DONE) and (
            self.more_body or self.request_done
        ):
            waiter = self.waiter = self.server.loop.create_future()
            await waiter
        if self.disconnected or self.phase is DONE or (self.request_done and not self.body):
            return {"type": "http.disconnect"}
        body = self.body
        self.body = b""
        self.request_done = not self.more_body
        if self.more_body:
            self.framer.consumed(len(body))
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Message) -> None:
        flow = self.framer.flow
        if flow.write_paused and not self.disconnected:
            await flow.drain()
        if self.disconnected:  # the client is gone: the message is discarded
            return
        kind = message["type"]
        phase = self.phase
        if phase is START:
            if kind != "http.response.start":
                if kind == "http.response.early_hint":
                    self._early_hint(message)
                    return
                raise RuntimeError(f"Expected 'http.response.start', got {kind!r}")
            self.status = message["status"]
            self.headers = message.get("headers", ())
            if message.get("trailers"):  # ASGI `http.response.trailers` extension
                self.trailers = []
            self.phase = HEAD
            return
        if kind != "http.response.body" or phase is DONE or phase is TRAILERS:
            if kind in FILE_MESSAGES and (phase is HEAD or phase is BODY):
                await self._send_file(message)
            else:
                self._send_extension(message, kind, phase)
            return
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        # With trailers announced, the body does not end the response: they do.
        more = more_body or self.trailers is not None
        if phase is HEAD:
            self.framer.send_head(self.status, self.headers, body, more)
            self.phase = BODY
        else:
            self.framer.send_body(body, more)
        if not more_body:
            if more:
                self.phase = TRAILERS
            else:
                self._complete()

    async def _send_file(self, message: Message) -> None:
        """ASGI `http.response.pathsend` and `http.response.zerocopysend`: body bytes from a
        file (`fulmen.protocols.filesend`). Without a Content-Length from the app, a file that
        ends the response gives it."""
        with FileBody(message) as file:
            more_body = file.more_body
            more = more_body or self.trailers is not None
            if self.phase is HEAD:
                headers = self.headers
                if not more:  # (with trailers, HTTP/1.1 needs chunked framing for them)
                    headers = with_length(headers, file.count)
                self.headers = headers
                self.framer.send_head(self.status, headers, b"", True)
                self.phase = BODY
            if self.scope["method"] == "HEAD":
                self.framer.send_body(b"", more)  # the head says the length, no body follows
            elif not await file.send(self.framer, more, self._gone):
                # The client has left (a reset seen by the send itself comes before the loop
                # reports the connection lost): the app's return ends nothing unfinished.
                self.on_disconnect()
                return
        if not more_body:
            if more:
                self.phase = TRAILERS
            else:
                self._complete()

    def _gone(self) -> bool:
        return self.disconnected

    def _send_extension(self, message: Message, kind: str, phase: Phase) -> None:
        """A message of an ASGI response extension, or an order error: an early hint before
        the head is sent; trailers after the last body message, collected until
        `more_trailers` is false, then sent as one trailer section."""
        if kind == "http.response.early_hint" and phase is HEAD:
            self._early_hint(message)
            return
        trailers = self.trailers
        if kind != "http.response.trailers" or phase is not TRAILERS or trailers is None:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} in response state {phase.name}")
        trailers.extend((name, value) for name, value in message.get("headers", ()))
        if message.get("more_trailers", False) or self.disconnected:
            return
        self.framer.send_trailers(trailers)
        self._complete()

    def _early_hint(self, message: Message) -> None:
        """ASGI `http.response.early_hint`: 103 Early Hints (RFC 8297) with a `link` field per
        entry of `links`, before the final response's head is sent."""
        if not self.disconnected:
            self.framer.send_interim(103, [(b"link", link) for link in message.get("links", ())])

    def _complete(self) -> None:
        self.phase = DONE
        self._wake()
        server = self.server
        if server.access_log:
            self.log_access()
        server.total_requests += 1
        if server.total_requests == server.limit_max_requests:
            server.on_max_requests()
        self.framer.complete()

    # Running the application

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            if self.phase is not DONE:  # a response cut short; a finished one stays whole
                self.framer.abort()
        except BaseException as exc:
            logger.error("Exception in ASGI application", exc_info=exc)
            self.fail()
        else:
            # A client that left needs no response: returning on http.disconnect is no error.
            if (self.phase is START or self.phase is HEAD) and not self.disconnected:
                logger.error("ASGI callable returned without sending a response.")
                self.fail()
            elif self.phase is not DONE and not self.disconnected:
                logger.error("ASGI callable returned without completing the response.")
                self.framer.abort()
        finally:
            if self.task is not None:
                self.server.tasks.discard(self.task)

    def fail(self) -> None:
        """500 if nothing was sent yet, else abort: the response is broken."""
        if self.phase is START or self.phase is HEAD:
            self.reject(500, _ERROR_500)
        elif self.phase is BODY or self.phase is TRAILERS:
            self.framer.abort()

    def reject(self, status: int, body: bytes, headers: Headers = ()) -> None:
        """Answer with a plain-text response instead of the app's (503, 500, a refused
        WebSocket handshake), with `headers` besides the content type."""
        if not self.disconnected:
            self.framer.send_plain(status, body, [_PLAIN, *headers])
        self.status = status
        self._complete()

    def log_access(self) -> None:
        scope = self.scope
        access_format = self.server.access_format
        if access_format is not None:
            access_format.log(scope, self.status, self.headers)
            return
        client, target = access_fields(scope)
        access_logger.info(
            '%s - "%s %s HTTP/%s" %s',
            client,
            wire.escape(scope["method"]),
            target,
            scope["http_version"],
            wire.status_text(self.status),
            extra={"status_code": self.status},
        )


def access_fields(scope: dict[str, Any]) -> tuple[str, str]:
    """The client address and the escaped target (path and query) of an access log line."""
    path = scope["path"]
    if scope["query_string"]:
        path = f"{path}?{scope['query_string'].decode('latin-1')}"
    return client_text(scope["client"]), wire.escape(path)


def client_text(client: tuple[str, int] | None) -> str:
    """`host:port` of a client in log lines, `-` when unknown (a Unix socket)."""
    return f"{client[0]}:{client[1]}" if client else "-"
