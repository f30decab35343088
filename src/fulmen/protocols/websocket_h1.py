"""WebSockets over HTTP/1.1 (RFC 6455): the opening handshake's rules, the 101 response, and
the socket once the session takes it over from the HTTP/1.1 connection.

Until the app accepts, the HTTP/1.1 connection is the socket's protocol (it notices the client
leave, and keeps the bytes that arrive after the request). On accept this driver writes the
101 and becomes the socket's protocol; the bytes kept are fed to the session first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from collections.abc import Callable
from typing import Any

from fulmen.protocols import wire
from fulmen.protocols.cycle import Headers
from fulmen.protocols.flow import FlowControl
from fulmen.protocols.websocket import WebSocketSession
from fulmen.state import ServerState

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
_VERSION_13 = ((b"sec-websocket-version", b"13"),)


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


def _key_and_version(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None]:
    key = version = None
    keys = 0
    for name, value in headers:
        if name == b"sec-websocket-key":
            keys += 1
            key = value.strip()
        elif name == b"sec-websocket-version":
            version = value.strip()
    return (key if keys == 1 else None), version


class H1WebSocket(asyncio.Protocol):
    """The `WebSocketDriver` of a WebSocket over an HTTP/1.1 socket; once accepted, the
    socket's protocol and one of the server's connections."""

    __slots__ = ("detach", "flow", "key", "server", "session", "transport")

    def __init__(
        self,
        server: ServerState,
        transport: asyncio.Transport,
        flow: FlowControl,
        detach: Callable[[], bytes],
    ) -> None:
        self.server = server
        self.transport = transport
        self.flow = flow
        # The HTTP/1.1 connection lets go of the socket and hands over the bytes it kept.
        self.detach: Callable[[], bytes] | None = detach
        self.session: WebSocketSession | None = None
        self.key = b""

    def refusal(self, scope: dict[str, Any]) -> tuple[int, bytes, Headers] | None:
        """RFC 6455 §4.2.1: what the opening handshake must be."""
        if scope["method"] != "GET" or scope["http_version"] != "1.1":
            return 400, b"WebSocket handshake must be an HTTP/1.1 GET", ()
        if _declares_body(scope["headers"]):
            return 400, b"WebSocket handshake must not have a body", ()
        key, version = _key_and_version(scope["headers"])
        if version != b"13":  # §4.2.2: answer with the versions we speak
            return 426, b"Unsupported WebSocket version", _VERSION_13
        if key is None or not _valid_key(key):
            return 400, b"Missing or invalid Sec-WebSocket-Key", ()
        self.key = key
        return None

    def accept(self, subprotocol: str | None, extensions: bytes | None, headers: Headers) -> None:
        parts = [_SWITCHING, b"sec-websocket-accept: %b\r\n" % accept_key(self.key)]
        if subprotocol:
            parts.append(wire.header_line((b"sec-websocket-protocol", subprotocol.encode()))[0])
        if extensions:
            parts.append(b"sec-websocket-extensions: %b\r\n" % extensions)
        for name, value in headers:
            parts.append(wire.header_line((name, value))[0])
        parts += (self.server.default_headers, wire.CRLF)
        self.transport.write(b"".join(parts))
        self._take_over()

    def _take_over(self) -> None:
        """Become the socket's protocol, then handle what arrived after the request."""
        detach = self.detach
        assert detach is not None
        self.detach = None  # the HTTP connection is done with: do not keep it alive
        pending = detach()
        self.server.connections.add(self)
        transport = self.transport
        transport.set_protocol(self)
        if transport.is_closing():
            self.connection_lost(None)  # the client left before the handshake was answered
        elif pending:
            self.data_received(pending)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    # asyncio.Protocol, once accepted

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        # Python 3.10's TLS transport warns when it is collected unclosed, even after the peer
        # closed it; closing a lost transport does nothing else.
        self.transport.close()
        self.flow.release()
        session = self.session
        self.session = None  # the session and this driver refer to each other
        if session is not None:
            session.on_closed()

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # Server tick and shutdown

    def check_timeout(self, now: float) -> None:
        """Server tick: the session's ping and close timeouts; a peer that reads nothing of
        what the app sends is dropped after `--timeout-send` (its app sees 1006)."""
        if self.flow.stalled(now, self.server.timeout_send):
            self.transport.abort()
        elif self.session is not None:
            self.session.check_timeout(now)

    def shutdown(self) -> None:
        if self.session is not None:
            self.session.shutdown()
