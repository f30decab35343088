"""One ASGI HTTP request/response cycle: `receive`, `send`, and running the app.

The response head is held until the first body message so that head and body leave in one
`transport.write` (allowed by the ASGI spec), and so that a response sent whole gets a
Content-Length instead of chunked framing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from fulmen.protocols import wire
from fulmen.protocols.flow import wake
from fulmen.protocols.wire import (
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    HEADER_LINES,
    NO_BODY_STATUSES,
    STATUS_LINES,
    TRANSFER_ENCODING,
)
from fulmen.types import ASGIApp, Message

if TYPE_CHECKING:
    from fulmen.protocols.http1 import H1Connection

logger = logging.getLogger("fulmen.error")
access_logger = logging.getLogger("fulmen.access")

# Response states (RFC-free bookkeeping): nothing yet -> head held -> body streaming -> done.
START, HEAD, BODY, DONE = range(4)
# Body framings.
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)

_ERROR_500 = b"Internal Server Error"


def _content_length(value: bytes) -> int:
    if not value.isdigit():
        raise RuntimeError(f"Invalid Content-Length {value!r}")
    return int(value)


class RequestCycle:
    websocket = False  # a WebSocket handshake (`fulmen.protocols.websocket.WebSocketRequest`)

    __slots__ = (
        "body",
        "body_received",
        "conn",
        "disconnected",
        "expect_100",
        "framing",
        "head_request",
        "headers",
        "keep_alive",
        "more_body",
        "receiving",
        "remaining",
        "request_done",
        "scope",
        "state",
        "status",
        "task",
        "waiter",
    )

    def __init__(self, conn: H1Connection, scope: dict[str, Any], keep_alive: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.head_request = scope["method"] == "HEAD"
        self.body = b""
        self.body_received = 0
        self.more_body = False
        self.request_done = False  # the final http.request message was handed to the app
        self.receiving = False  # the app has called receive()
        self.expect_100 = False
        self.disconnected = False
        self.state = START
        self.status = 0
        self.headers: Any = ()
        self.framing = NONE
        self.remaining = 0
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    # Events from the connection

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

    # ASGI

    async def receive(self) -> Message:
        self.receiving = True
        if self.expect_100:
            # RFC 9110 §10.1.1: ask for the body only once the app wants it.
            self.expect_100 = False
            if self.state is START and not self.disconnected:
                self.conn.transport.write(wire.CONTINUE)
        if not (self.body or self.disconnected or self.state is DONE) and (
            self.more_body or self.request_done
        ):
            waiter = self.waiter = self.conn.state.loop.create_future()
            await waiter
        if self.disconnected or self.state is DONE or (self.request_done and not self.body):
            return {"type": "http.disconnect"}
        body = self.body
        self.body = b""
        self.request_done = not self.more_body
        if self.more_body:
            self.conn.maybe_resume_reading()
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    async def send(self, message: Message) -> None:
        if self.conn.flow.write_paused and not self.disconnected:
            await self.conn.flow.drain()
        kind = message["type"]
        state = self.state
        if state is START:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected 'http.response.start', got {kind!r}")
            self.status = message["status"]
            self.headers = message.get("headers", ())
            self.state = HEAD
            return
        if state is DONE or kind != "http.response.body":
            raise RuntimeError(f"Unexpected ASGI message {kind!r} in response state {state}")
        body = message.get("body", b"")
        more_body = message.get("more_body", False)
        if self.disconnected:
            return
        if state is HEAD:
            self._write_head(body, more_body)
        else:
            self._write_body(body, more_body)
        if not more_body:
            self._complete()

    def _write_head(self, body: bytes, more_body: bool) -> None:
        conn = self.conn
        status = self.status
        parts = [STATUS_LINES.get(status) or wire.status_line(status)]
        append = parts.append
        length: int | None = None
        app_framing = app_connection = False
        own_defaults: list[bytes] | None = None
        lines = HEADER_LINES
        for header in self.headers:
            try:
                entry = lines.get(header)
            except TypeError:  # not a tuple (e.g. a list): unhashable, validate uncached
                entry = None
            if entry is None:
                entry = wire.header_line(header)
            line, kind, lname = entry
            append(line)
            if kind:
                if kind is CONTENT_LENGTH:
                    length = _content_length(header[1])
                elif kind is TRANSFER_ENCODING:
                    app_framing = True
                elif kind is CONNECTION:
                    app_connection = True
                    if b"close" in header[1].lower():
                        self.keep_alive = False
                else:
                    own_defaults = [lname] if own_defaults is None else [*own_defaults, lname]
        http10 = self.scope["http_version"] == "1.0"
        if self.head_request or status in NO_BODY_STATUSES or status < 200:
            self.framing = NONE
        elif length is not None:
            self.framing = LENGTH
            self.remaining = length
        elif app_framing:
            self.framing = CHUNKED
        elif not more_body:
            self.framing = LENGTH
            self.remaining = len(body)
            append(b"content-length: %d\r\n" % len(body))
        elif not http10:
            self.framing = CHUNKED
            append(b"transfer-encoding: chunked\r\n")
        else:
            self.framing = UNTIL_CLOSE
            self.keep_alive = False
        state = conn.state
        if state.shutting_down or (self.more_body and not self.receiving):
            # Answering before asking for the body: it will not be read, so the connection
            # cannot be reused (RFC 9110 §10.1.1 lets us close instead of draining it).
            self.keep_alive = False
        if not app_connection:
            if not self.keep_alive:
                append(b"connection: close\r\n")
            elif http10:
                append(b"connection: keep-alive\r\n")
        if own_defaults is None:
            append(state.default_headers)
        else:
            append(state.defaults_without(frozenset(own_defaults)))
        append(CRLF)
        append(self._framed(body, more_body))  # may refuse the body: then nothing was sent
        self.state = BODY
        conn.transport.write(b"".join(parts))

    def _write_body(self, body: bytes, more_body: bool) -> None:
        data = self._framed(body, more_body)
        if data:
            self.conn.transport.write(data)

    def _framed(self, body: bytes, more_body: bool) -> bytes:
        framing = self.framing
        if framing is LENGTH:
            self.remaining -= len(body)
            if self.remaining < 0:
                raise RuntimeError("Response content longer than Content-Length")
            if not more_body and self.remaining:
                raise RuntimeError("Response content shorter than Content-Length")
            return body
        if framing is CHUNKED:
            if more_body:
                return wire.chunk(body) if body else b""
            return wire.chunk(body) + wire.LAST_CHUNK if body else wire.LAST_CHUNK
        if framing is UNTIL_CLOSE:
            return body
        return b""

    def _complete(self) -> None:
        self.state = DONE
        self._wake()
        self.conn.on_response_complete(self)

    # Running the application

    async def run(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.conn.transport.close()
        except BaseException as exc:
            logger.error("Exception in ASGI application", exc_info=exc)
            self.fail()
        else:
            # A client that left needs no response: returning on http.disconnect is no error.
            if (self.state is START or self.state is HEAD) and not self.disconnected:
                logger.error("ASGI callable returned without sending a response.")
                self.fail()
            elif self.state is not DONE and not self.disconnected:
                logger.error("ASGI callable returned without completing the response.")
                self.conn.transport.close()
        finally:
            if self.task is not None:
                self.conn.state.tasks.discard(self.task)

    def fail(self) -> None:
        """500 if nothing was sent yet, else end the connection: the response is broken."""
        if self.state is START or self.state is HEAD:
            self.keep_alive = False
            self.reject(500, _ERROR_500)
        elif self.state is BODY:
            self.conn.transport.close()

    def reject(self, status: int, body: bytes, headers: bytes = b"") -> None:
        """Answer with a canned response instead of the app's (503, 500), plus header lines."""
        conn = self.conn
        if not self.disconnected:
            close = not self.keep_alive or status == 500
            defaults = conn.state.default_headers + headers
            response = wire.simple_response(status, body, defaults, close)
            self.keep_alive = not close
            conn.transport.write(response)
        self.status = status
        self.state = DONE
        self._wake()
        conn.on_response_complete(self)

    def log_access(self) -> None:
        scope = self.scope
        access_format = self.conn.state.access_format
        if access_format is not None:
            access_format.log(scope, self.status, self.headers)
            return
        client, target = access_fields(scope)
        access_logger.info(
            '%s - "%s %s HTTP/%s" %d',
            client,
            wire.escape(scope["method"]),
            target,
            scope["http_version"],
            self.status,
            extra={"status_code": self.status},
        )


def access_fields(scope: dict[str, Any]) -> tuple[str, str]:
    """The client address and the escaped target (path and query) of an access log line."""
    path = scope["path"]
    if scope["query_string"]:
        path = f"{path}?{scope['query_string'].decode('latin-1')}"
    client = scope["client"]
    return (f"{client[0]}:{client[1]}" if client else "-"), wire.escape(path)
