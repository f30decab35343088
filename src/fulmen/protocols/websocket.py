"""The one ASGI WebSocket session (RFC 6455, ASGI WebSocket spec), for every protocol.

The session is IO-free: it decides what the app's answer to the handshake means, assembles,
size-checks and UTF-8-checks messages, runs the closing handshake and the keepalive pings,
and turns bytes into frames through an engine (`fulmen.protocols.engines`). A
`WebSocketDriver` moves those bytes: over an HTTP/1.1 socket it takes over
(`fulmen.protocols.websocket_h1`), over an HTTP/2 stream (RFC 8441) it would be DATA frames.

Until the app accepts, the request is answered in HTTP: refusals (403, the app's own
`websocket.http.response`, a bad handshake, 500) are plain responses written by the request
cycle (`WebSocketRequest`). Pings and the closing timeout run from the server's one-second
tick, like HTTP timeouts: no timer per connection.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from typing import Any, Protocol

from fulmen.protocols.cycle import Headers, RequestCycle, access_fields, access_logger
from fulmen.protocols.engines import ABNORMAL, CLOSE, DATA, PONG, Engine, Event
from fulmen.protocols.flow import Flow, wake
from fulmen.types import ASGIApp, Message

logger = logging.getLogger("fulmen.error")


class Phase(enum.Enum):
    CONNECTING = enum.auto()  # the app has not answered the handshake yet
    RESPONSE = enum.auto()  # it is sending its own HTTP response instead
    OPEN = enum.auto()  # frames flow both ways
    CLOSING = enum.auto()  # our close frame is sent, the peer's is awaited
    CLOSED = enum.auto()  # nothing more is sent


CONNECTING = Phase.CONNECTING
RESPONSE = Phase.RESPONSE
OPEN = Phase.OPEN
CLOSING = Phase.CLOSING
CLOSED = Phase.CLOSED

CLOSE_TIMEOUT = 10.0  # seconds to wait for the peer's close frame, as websockets' default
_MAX_REASON = 123  # RFC 6455 §5.5: a control frame's payload is at most 125 bytes
# RFC 6455 §7.4: close codes an endpoint may send (1004-1006 and 1015 are reserved).
_SENDABLE_CODES = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015), *range(3000, 5000)))


class ClientDisconnected(OSError):
    """`send()` on a WebSocket that is closed (ASGI spec: a subclass of OSError)."""


class WebSocketDriver(Protocol):
    """What a protocol does for one WebSocket session."""

    @property
    def flow(self) -> Flow: ...

    def refusal(self, scope: dict[str, Any]) -> tuple[int, bytes, Headers] | None:
        """(status, body, headers) if the opening handshake is not valid for the protocol."""

    def accept(self, subprotocol: str | None, extensions: bytes | None, headers: Headers) -> None:
        """Send the success response, then carry frames: bytes that arrived already are fed
        to the session (`feed`) before this returns."""

    def write(self, data: bytes) -> None:
        """Send frame bytes."""

    def close(self) -> None:
        """The closing handshake is over (or the app is gone): end the carrier."""

    def abort(self) -> None:
        """The peer is unresponsive: drop the carrier without waiting."""


class WebSocketRequest(RequestCycle):
    """The HTTP side of a WebSocket handshake: refusals are answered and logged through it."""

    __slots__ = ()
    websocket = True

    def log_access(self) -> None:
        access_format = self.server.access_format
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


class WebSocketSession:
    """One WebSocket: the ASGI `receive`/`send` pair, the handshake answer, and the frames."""

    __slots__ = (
        "close_deadline",
        "closed",
        "connect_sent",
        "driver",
        "engine",
        "flow",
        "offer",
        "parts",
        "phase",
        "ping_due",
        "pong_due",
        "queue",
        "request",
        "scope",
        "server",
        "size",
        "text",
        "waiter",
    )

    def __init__(self, request: WebSocketRequest, driver: WebSocketDriver) -> None:
        self.server = request.server
        self.request: WebSocketRequest | None = request  # until accepted: then dropped
        self.driver = driver
        self.flow = driver.flow
        self.phase = CONNECTING
        self.connect_sent = False
        self.closed: Message | None = None  # the websocket.disconnect message, once closed
        self.queue: list[Message] = []  # at most ws_max_queue long, and often empty
        self.waiter: asyncio.Future[None] | None = None
        self.engine: Engine | None = None
        self.parts: list[Any] = []  # the fragments of the message being received
        self.size = 0
        self.text = False
        self.ping_due = self.pong_due = self.close_deadline = 0.0
        self.offer: bytes | None = None
        self.scope = self._scope(request.scope)

    def _scope(self, http: dict[str, Any]) -> dict[str, Any]:
        subprotocols: list[str] = []
        offers: list[bytes] = []
        for name, value in http["headers"]:
            if name == b"sec-websocket-protocol":
                items = value.decode("latin-1").split(",")
                subprotocols.extend(item.strip() for item in items if item.strip())
            elif name == b"sec-websocket-extensions":
                offers.append(value)
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
            "extensions": _ws_extensions(http["extensions"]),
        }

    def _http(self) -> WebSocketRequest:
        """The handshake request, which answers in HTTP until the app accepts."""
        assert self.request is not None
        return self.request

    # Running the application

    async def run(self, app: ASGIApp) -> None:
        try:
            refusal = self.driver.refusal(self._http().scope)
            if refusal is not None:
                self.phase = CLOSED
                self._http().reject(*refusal)
                return
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.driver.close()
        except ClientDisconnected:
            logger.debug("WebSocket client disconnected while the app was sending.")
        except BaseException as exc:
            logger.error("Exception in ASGI application", exc_info=exc)
            self._fail()
        else:
            # A client that left before the handshake was answered needs no answer (as for HTTP).
            if (self.phase is CONNECTING or self.phase is RESPONSE) and self.closed is None:
                logger.error("ASGI callable returned without completing the WebSocket handshake.")
                self._fail()
            elif self.phase is OPEN:
                self._close(1000, "")
        finally:
            task = asyncio.current_task()  # the Task the protocol started this session in
            if task is not None:
                self.server.tasks.discard(task)

    def _fail(self) -> None:
        """The app failed: 500 before the handshake, close code 1011 after it (RFC 6455 §7.4.1)."""
        if self.phase is CONNECTING or self.phase is RESPONSE:
            self.phase = CLOSED
            self._http().fail()
        elif self.phase is OPEN:
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
        state = self.phase
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
                if self.phase is not OPEN:
                    raise ClientDisconnected("WebSocket closed while waiting to send")
            data = message.get("bytes")
            if data is None:
                data = message.get("text")
                if data is None:
                    raise RuntimeError("websocket.send needs 'bytes' or 'text'")
            assert self.engine is not None
            self.driver.write(self.engine.message(data))
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
            self.phase = CLOSED
            self._http().reject(403, b"Forbidden")  # ASGI: a close before accept is a 403
        elif kind == "websocket.http.response.start":
            self.phase = RESPONSE
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
            self.phase = CLOSED

    # The handshake

    def _accept(self, message: Message) -> None:
        server = self.server
        assert server.ws_factory is not None
        self.engine, extensions = server.ws_factory(self.offer)
        self.phase = OPEN
        if server.ws_ping_interval:
            self.ping_due = server.clock + server.ws_ping_interval
        # An open WebSocket should not keep the HTTP request alive (memory per idle socket).
        self.request = None
        headers = message.get("headers", ())
        self.driver.accept(message.get("subprotocol"), extensions, headers)
        if self.phase is OPEN and len(self.queue) < server.ws_max_queue:
            self.flow.resume_reading()
        if server.access_log:
            if server.access_format is not None:
                server.access_format.log(self.scope, 101, headers)
            else:
                client, target = access_fields(self.scope)
                access_logger.info('%s - "WebSocket %s" [accepted]', client, target)
        if server.shutting_down and self.phase is OPEN:  # accepted during a graceful shutdown
            self._close(server.ws_shutdown_code, "")

    # Frames from the driver, once accepted

    # asyncio.Protocol, once accepted

    def feed(self, data: bytes) -> None:
        if self.phase is CLOSED:
            return
        engine = self.engine
        assert engine is not None
        for event in engine.receive(data):
            self._on_event(event)
            if self.phase is CLOSED:
                break
        output = engine.output()
        if output:
            self.driver.write(output)
        if self.phase is CLOSED:
            self.driver.close()  # RFC 6455 §7.1.1: the server closes the TCP connection

    def _on_event(self, event: Event) -> None:
        kind = event[0]
        if kind is DATA:
            self._on_data(event[1], event[2], event[3])
        elif kind is PONG:
            self.pong_due = 0.0  # any pong shows the peer is alive (RFC 6455 §5.5.3)
        elif kind is CLOSE:
            self.phase = CLOSED
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
        if self.phase is OPEN:
            self.driver.write(self.engine.close(code, reason))
        if self.closed is None:  # while closing, the app keeps the code it closed with
            self._set_closed(code, reason)
        self.phase = CLOSED

    def _close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the peer's close frame (or the timeout) ends it."""
        if code not in _SENDABLE_CODES:
            raise RuntimeError(f"Invalid WebSocket close code {code!r}")
        reason = reason.encode()[:_MAX_REASON].decode(errors="ignore")
        assert self.engine is not None
        self.driver.write(self.engine.close(code, reason))
        self.phase = CLOSING
        self.close_deadline = self.server.clock + CLOSE_TIMEOUT
        if self.closed is None:
            self._set_closed(code, reason)

    def _set_closed(self, code: int, reason: str) -> None:
        self.closed = {"type": "websocket.disconnect", "code": code, "reason": reason}
        wake(self.waiter)
        self.waiter = None

    def on_disconnect(self) -> None:
        """The client left before the handshake was answered."""
        if self.closed is None:
            self._set_closed(ABNORMAL, "")

    def on_closed(self) -> None:
        """The carrier is gone, once accepted."""
        self.phase = CLOSED
        self.on_disconnect()

    # Server tick and shutdown

    def check_timeout(self, now: float) -> None:
        """Called by the server tick: the closing timeout, then keepalive pings."""
        if self.phase is CLOSING:
            if now >= self.close_deadline:
                self.driver.close()
        elif self.phase is OPEN:
            if self.pong_due and now >= self.pong_due:
                # RFC 6455 §7.1.7: the peer is gone; do not wait for it to read a close frame.
                self._set_closed(ABNORMAL, "")
                self.phase = CLOSED
                self.driver.abort()
            elif self.ping_due and now >= self.ping_due:
                self._ping()

    def _ping(self) -> None:
        server = self.server
        assert self.engine is not None and server.ws_ping_interval
        self.driver.write(self.engine.ping(os.urandom(4)))
        self.ping_due = server.clock + server.ws_ping_interval
        if server.ws_ping_timeout and not self.pong_due:
            self.pong_due = server.clock + server.ws_ping_timeout

    def shutdown(self) -> None:
        """Graceful shutdown: close with 1001 (going away), or 1012 (service restart) when the
        server restarts; the app sees the disconnect."""
        if self.phase is OPEN:
            self._close(self.server.ws_shutdown_code, "")


def _ws_extensions(http: dict[str, Any]) -> dict[str, Any]:
    """A WebSocket's extensions: the denial response, and the connection's `tls`."""
    extensions: dict[str, Any] = {"websocket.http.response": {}}
    if "tls" in http:
        extensions["tls"] = http["tls"]
    return extensions
