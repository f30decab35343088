"""The one ASGI WebSocket cycle (RFC 6455, ASGI WebSocket spec), over any framing engine.

The HTTP/1.1 connection parses the upgrade request and starts this cycle with it. Until the
app accepts, the HTTP connection still owns the socket, and refusals (403, the app's own
`websocket.http.response`, 400/426 for a bad handshake, 500) are plain HTTP responses written by
the request cycle. On `websocket.accept` the 101 response is written and this object becomes the
socket's protocol; the bytes that arrived after the request are fed to the engine first.

Messages are assembled, size-checked and UTF-8-checked here for every engine; the engine only
turns bytes into frames and back (`fulmen.protocols.engines`). Pings and the closing handshake
timeout run from the server's one-second tick, like HTTP timeouts: no timer per connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any

from fulmen.protocols import wire
from fulmen.protocols.cycle import RequestCycle, access_fields, access_logger
from fulmen.protocols.engines import ABNORMAL, CLOSE, DATA, PONG, Engine, Event
from fulmen.protocols.flow import wake
from fulmen.types import ASGIApp, Message

if TYPE_CHECKING:
    from fulmen.protocols.http1 import H1Connection

logger = logging.getLogger("fulmen.error")

# CONNECTING: the app has not answered the handshake yet; RESPONSE: it is sending its own HTTP
# response; OPEN: frames flow both ways; CLOSING: our close frame is sent, the peer's is awaited;
# CLOSED: nothing more is sent.
CONNECTING, RESPONSE, OPEN, CLOSING, CLOSED = range(5)

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
_VERSION_13 = b"sec-websocket-version: 13\r\n"
CLOSE_TIMEOUT = 10.0  # seconds to wait for the peer's close frame, as websockets' default
_MAX_REASON = 123  # RFC 6455 §5.5: a control frame's payload is at most 125 bytes
# RFC 6455 §7.4: close codes an endpoint may send (1004-1006 and 1015 are reserved).
_SENDABLE_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)))


class ClientDisconnected(OSError):
    """`send()` on a WebSocket that is closed (ASGI spec: a subclass of OSError)."""


def accept_key(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request has a body by its framing headers. Not by what the parser delivered:
    llhttp skips an upgrade request's body (its bytes would be read as frames), h11 reads it."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


class WebSocketRequest(RequestCycle):
    """The HTTP side of a WebSocket handshake: refusals are answered and logged through it."""

    __slots__ = ()
    websocket = True

    def log_access(self) -> None:
        access_format = self.conn.state.access_format
        if access_format is not None:
            access_format.log(self.scope, self.status, self.headers)
            return
        client, target = access_fields(self.scope)
        access_logger.info(
            '%s - "WebSocket %s" %d',
            client,
            target,
            self.status,
            extra={"status_code": self.status},
        )


class WebSocketCycle(asyncio.Protocol):
    """One WebSocket: the ASGI `receive`/`send` pair and, once accepted, the socket's protocol."""

    __slots__ = (
        "close_deadline",
        "closed",
        "conn",
        "connect_sent",
        "engine",
        "flow",
        "key",
        "offer",
        "parts",
        "ping_due",
        "pong_due",
        "queue",
        "request",
        "scope",
        "server",
        "size",
        "state",
        "text",
        "transport",
        "version",
        "waiter",
    )

    def __init__(self, conn: H1Connection, request: WebSocketRequest) -> None:
        self.conn: H1Connection | None = conn  # until accepted: then the HTTP side is dropped
        self.server = conn.state
        self.request: WebSocketRequest | None = request
        self.transport = conn.transport
        self.flow = conn.flow
        self.state = CONNECTING
        self.connect_sent = False
        self.closed: Message | None = None  # the websocket.disconnect message, once closed
        self.queue: list[Message] = []  # at most ws_max_queue long, and often empty
        self.waiter: asyncio.Future[None] | None = None
        self.engine: Engine | None = None
        self.parts: list[Any] = []  # the fragments of the message being received
        self.size = 0
        self.text = False
        self.ping_due = self.pong_due = self.close_deadline = 0.0
        self.key: bytes | None = None
        self.version: bytes | None = None
        self.offer: bytes | None = None
        self.scope = self._scope(request.scope)

    def _scope(self, http: dict[str, Any]) -> dict[str, Any]:
        subprotocols: list[str] = []
        offers: list[bytes] = []
        keys = 0
        for name, value in http["headers"]:
            if name == b"sec-websocket-key":
                keys += 1
                self.key = value.strip()
            elif name == b"sec-websocket-version":
                self.version = value.strip()
            elif name == b"sec-websocket-protocol":
                items = value.decode("latin-1").split(",")
                subprotocols.extend(item.strip() for item in items if item.strip())
            elif name == b"sec-websocket-extensions":
                offers.append(value)
        if keys > 1:
            self.key = None
        self.offer = b", ".join(offers) or None
        return {
            "type": "websocket",
            "asgi": http["asgi"],
            "http_version": http["http_version"],
            "scheme": "wss" if http["scheme"] in ("https", "wss") else "ws",
            "server": http["server"],
            "client": http["client"],
            "root_path": http["root_path"],
            "path": http["path"],
            "raw_path": http["raw_path"],
            "query_string": http["query_string"],
            "headers": http["headers"],
            "subprotocols": subprotocols,
            "state": http["state"],
            "extensions": {"websocket.http.response": {}},
        }

    def _http(self) -> WebSocketRequest:
        """The handshake request, which answers in HTTP until the app accepts."""
        assert self.request is not None
        return self.request

    def _refusal(self) -> tuple[int, bytes, bytes] | None:
        """(status, body, header lines) for a handshake RFC 6455 §4.2.1 does not allow."""
        request = self._http()
        if request.scope["method"] != "GET" or request.scope["http_version"] != "1.1":
            return 400, b"WebSocket handshake must be an HTTP/1.1 GET", b""
        if _declares_body(request.scope["headers"]):
            return 400, b"WebSocket handshake must not have a body", b""
        if self.version != b"13":  # §4.2.2: answer with the versions we speak
            return 426, b"Unsupported WebSocket version", _VERSION_13
        if self.key is None or not _valid_key(self.key):
            return 400, b"Missing or invalid Sec-WebSocket-Key", b""
        return None

    # Running the application

    async def run(self, app: ASGIApp) -> None:
        try:
            refusal = self._refusal()
            if refusal is not None:
                self.state = CLOSED
                self._http().reject(*refusal)
                return
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.transport.close()
        except ClientDisconnected:
            logger.debug("WebSocket client disconnected while the app was sending.")
        except BaseException as exc:
            logger.error("Exception in ASGI application", exc_info=exc)
            self._fail()
        else:
            # A client that left before the handshake was answered needs no answer (as for HTTP).
            if (self.state is CONNECTING or self.state is RESPONSE) and self.closed is None:
                logger.error("ASGI callable returned without completing the WebSocket handshake.")
                self._fail()
            elif self.state is OPEN:
                self._close(1000, "")
        finally:
            task = asyncio.current_task()  # the Task `H1Connection._start` made for this cycle
            if task is not None:
                self.server.tasks.discard(task)

    def _fail(self) -> None:
        """The app failed: 500 before the handshake, close code 1011 after it (RFC 6455 §7.4.1)."""
        if self.state is CONNECTING or self.state is RESPONSE:
            self.state = CLOSED
            self._http().fail()
        elif self.state is OPEN:
            self._close(1011, "")

    # ASGI

    async def receive(self) -> Message:
        if not self.connect_sent:
            self.connect_sent = True
            return {"type": "websocket.connect"}
        queue = self.queue
        while not queue:
            if self.closed is not None:
                return self.closed
            waiter = self.waiter = self.server.loop.create_future()
            await waiter
        message = queue.pop(0)
        if self.flow.read_paused and len(queue) <= self.server.ws_max_queue // 2:
            self.flow.resume_reading()
        return message

    async def send(self, message: Message) -> None:
        state = self.state
        if state is OPEN:
            await self._send_open(message)
        elif self.closed is not None or state is CLOSING or state is CLOSED:
            raise ClientDisconnected(f"WebSocket is closed; cannot send {message['type']!r}")
        elif state is CONNECTING:
            await self._send_connecting(message)
        else:
            await self._send_response(message)

    async def _send_open(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            if self.flow.write_paused:
                await self.flow.drain()
                if self.state is not OPEN:
                    raise ClientDisconnected("WebSocket closed while waiting to send")
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
                if data is None:
                    raise RuntimeError("websocket.send needs 'bytes' or 'text'")
            assert self.engine is not None
            self.transport.write(self.engine.message(data))
        elif kind == "websocket.close":
            code = message.get("code")
            self._close(1000 if code is None else code, message.get("reason") or "")
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} on an open WebSocket")

    async def _send_connecting(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self._accept(message)
        elif kind == "websocket.close":
            self.state = CLOSED
            self._http().reject(403, b"Forbidden")  # ASGI: a close before accept is a 403
        elif kind == "websocket.http.response.start":
            self.state = RESPONSE
            start = {"type": "http.response.start", "status": message["status"]}
            await self._http().send({**start, "headers": message.get("headers", ())})
        else:
            raise RuntimeError(
                "Expected 'websocket.accept', 'websocket.close' or "
                f"'websocket.http.response.start', got {kind!r}"
            )

    async def _send_response(self, message: Message) -> None:
        kind = message["type"]
        if kind != "websocket.http.response.body":
            raise RuntimeError(f"Expected 'websocket.http.response.body', got {kind!r}")
        more_body = message.get("more_body", False)
        body = {"type": "http.response.body", "body": message.get("body", b"")}
        await self._http().send({**body, "more_body": more_body})
        if not more_body:
            self.state = CLOSED

    # The handshake

    def _accept(self, message: Message) -> None:
        server = self.server
        assert server.ws_factory is not None and self.key is not None
        engine, extensions = server.ws_factory(self.offer)
        parts = [_SWITCHING, b"sec-websocket-accept: %b\r\n" % accept_key(self.key)]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            parts.append(wire.header_line((b"sec-websocket-protocol", subprotocol.encode()))[0])
        if extensions:
            parts.append(b"sec-websocket-extensions: %b\r\n" % extensions)
        for header in message.get("headers", ()):
            parts.append(wire.header_line(tuple(header))[0])
        parts += (server.default_headers, wire.CRLF)
        self.transport.write(b"".join(parts))
        self.engine = engine
        self.state = OPEN
        self._take_over()
        if server.access_log:
            if server.access_format is not None:
                server.access_format.log(self.scope, 101, message.get("headers", ()))
            else:
                client, target = access_fields(self.scope)
                access_logger.info('%s - "WebSocket %s" [accepted]', client, target)
        if server.shutting_down:  # accepted during a graceful shutdown: close at once
            self._close(1012, "")

    def _take_over(self) -> None:
        """Become the socket's protocol, then handle what arrived after the request."""
        conn = self.conn
        assert conn is not None
        server = self.server
        conn.ws = None
        server.connections.discard(conn)
        server.connections.add(self)
        self.transport.set_protocol(self)
        if server.ws_ping_interval:
            self.ping_due = server.clock + server.ws_ping_interval
        pending = conn.parser.trailing
        # The HTTP connection, its parser and the request are done with: an open WebSocket
        # should not keep them alive (memory per idle WebSocket).
        self.conn = self.request = None
        if self.transport.is_closing():
            self.connection_lost(None)  # the client left before the handshake was answered
            return
        if pending:
            self.data_received(pending)
        if self.state is OPEN and len(self.queue) < server.ws_max_queue:
            self.flow.resume_reading()

    # asyncio.Protocol, once accepted

    def data_received(self, data: bytes) -> None:
        if self.state is CLOSED:
            return
        engine = self.engine
        assert engine is not None
        for event in engine.receive(data):
            self._on_event(event)
            if self.state is CLOSED:
                break
        output = engine.output()
        if output:
            self.transport.write(output)
        if self.state is CLOSED:
            self.transport.close()  # RFC 6455 §7.1.1: the server closes the TCP connection

    def _on_event(self, event: Event) -> None:
        kind = event[0]
        if kind is DATA:
            self._on_data(event[1], event[2], event[3])
        elif kind is PONG:
            self.pong_due = 0.0  # any pong shows the peer is alive (RFC 6455 §5.5.3)
        elif kind is CLOSE:
            self.state = CLOSED
            if self.closed is None:
                self._set_closed(event[1], event[2])

    def _on_data(self, payload: bytes | str, first: bool | None, fin: bool) -> None:
        if first is not None:
            self.text = first
        size = len(payload)
        if not isinstance(payload, bytes) and not payload.isascii():
            size = len(payload.encode())
        self.size += size
        if self.size > self.server.ws_max_size:
            self._fail_connection(1009, "Message too big")
            return
        if not fin:
            self.parts.append(payload)
            return
        if self.parts:
            self.parts.append(payload)
            payload = payload[:0].join(self.parts)
            self.parts = []
        self.size = 0
        if not self.text:
            self._push({"type": "websocket.receive", "bytes": payload})
            return
        if isinstance(payload, bytes):
            try:
                payload = payload.decode()
            except UnicodeDecodeError:
                self._fail_connection(1007, "Invalid UTF-8 in text message")
                return
        self._push({"type": "websocket.receive", "text": payload})

    def _push(self, message: Message) -> None:
        self.queue.append(message)
        wake(self.waiter)
        self.waiter = None
        if len(self.queue) >= self.server.ws_max_queue:
            self.flow.pause_reading()  # the app is not keeping up: let TCP push back

    def _fail_connection(self, code: int, reason: str) -> None:
        """RFC 6455 §7.1.7: send a close frame with `code` and drop the connection."""
        assert self.engine is not None
        if self.state is OPEN:
            self.transport.write(self.engine.close(code, reason))
        if self.closed is None:  # while closing, the app keeps the code it closed with
            self._set_closed(code, reason)
        self.state = CLOSED

    def _close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the peer's close frame (or the timeout) ends it."""
        if code not in _SENDABLE_CODES:
            raise RuntimeError(f"Invalid WebSocket close code {code!r}")
        reason = reason.encode()[:_MAX_REASON].decode(errors="ignore")
        assert self.engine is not None
        self.transport.write(self.engine.close(code, reason))
        self.state = CLOSING
        self.close_deadline = self.server.clock + CLOSE_TIMEOUT
        if self.closed is None:
            self._set_closed(code, reason)

    def _set_closed(self, code: int, reason: str) -> None:
        self.closed = {"type": "websocket.disconnect", "code": code, "reason": reason}
        wake(self.waiter)
        self.waiter = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.flow.release()
        self.state = CLOSED
        self.on_disconnect()

    def on_disconnect(self) -> None:
        """The socket is gone (also before the handshake was answered)."""
        if self.closed is None:
            self._set_closed(ABNORMAL, "")

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # Server tick and shutdown

    def check_timeout(self, now: float) -> None:
        """Called by the server tick: the closing timeout, then keepalive pings."""
        if self.state is CLOSING:
            if now >= self.close_deadline:
                self.transport.close()
        elif self.state is OPEN:
            if self.pong_due and now >= self.pong_due:
                # RFC 6455 §7.1.7: the peer is gone; do not wait for it to read a close frame.
                self._set_closed(ABNORMAL, "")
                self.state = CLOSED
                self.transport.abort()
            elif self.ping_due and now >= self.ping_due:
                self._ping()

    def _ping(self) -> None:
        server = self.server
        assert self.engine is not None and server.ws_ping_interval
        self.transport.write(self.engine.ping(os.urandom(4)))
        self.ping_due = server.clock + server.ws_ping_interval
        if server.ws_ping_timeout and not self.pong_due:
            self.pong_due = server.clock + server.ws_ping_timeout

    def shutdown(self) -> None:
        """Graceful shutdown: close with 1012 (service restart); the app sees the disconnect."""
        if self.state is OPEN:
            self._close(1012, "")
