"""WebSockets over HTTP/2 (RFC 8441) and HTTP/3 (RFC 9220): an extended CONNECT with
`:protocol websocket` opens a stream whose DATA frames carry the WebSocket frames, both ways,
under the protocol's flow control.

The session (`fulmen.protocols.websocket.WebSocketSession`) is the one HTTP/1.1 uses; this is
its driver, the same for both protocols' streams. The handshake is answered with `:status 200`
(no key, no accept hash: RFC 8441 §5), refusals are ordinary responses on the stream, and the
end of the stream plays the part of the TCP close: the session's close ends our side, the
client's ends the session.
"""

from __future__ import annotations

from typing import Any, Protocol

from fulmen.protocols.cycle import Headers
from fulmen.protocols.flow import Flow
from fulmen.protocols.websocket import WebSocketSession

_VERSION_13 = ((b"sec-websocket-version", b"13"),)


class TunnelStream(Protocol):
    """What the driver needs of its stream (`H2Stream`, `H3Stream`): the framer calls, and
    `reset`, set once the stream is gone."""

    reset: bool

    @property
    def flow(self) -> Flow: ...

    def send_head(self, status: int, headers: Headers, body: bytes, more_body: bool) -> None: ...

    def send_body(self, body: bytes, more_body: bool) -> None: ...

    def abort(self) -> None: ...

    def complete(self) -> None: ...


class StreamWebSocket:
    """The `WebSocketDriver` of a WebSocket on one HTTP/2 or HTTP/3 stream."""

    __slots__ = ("closed", "early", "session", "stream")

    def __init__(self, stream: TunnelStream) -> None:
        self.stream = stream
        self.session: WebSocketSession | None = None
        self.early = b""  # DATA that came before the app accepted
        self.closed = False

    @property
    def flow(self) -> Flow:
        return self.stream.flow

    def refusal(self, scope: dict[str, Any]) -> tuple[int, bytes, Headers] | None:
        """RFC 8441 §5 and RFC 6455 §4.2.1: version 13 (the key and upgrade fields have no
        place in HTTP/2)."""
        versions = [
            value.strip() for name, value in scope["headers"] if name == b"sec-websocket-version"
        ]
        if versions != [b"13"]:
            return 426, b"Unsupported WebSocket version", _VERSION_13
        return None

    def accept(self, subprotocol: str | None, extensions: bytes | None, headers: Headers) -> None:
        fields: list[tuple[bytes, bytes]] = []
        if subprotocol:
            fields.append((b"sec-websocket-protocol", subprotocol.encode()))
        if extensions:
            fields.append((b"sec-websocket-extensions", extensions))
        fields.extend(headers)
        self.stream.send_head(200, fields, b"", True)
        early, self.early = self.early, b""
        if self.stream.reset:
            self.on_reset()
        elif early and self.session is not None:
            self.session.feed(early)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.stream.send_body(data, True)

    def close(self) -> None:
        """The closing handshake is over: the stream ends (END_STREAM, FIN) on our side."""
        if self.closed:
            return
        self.closed = True
        stream = self.stream
        if not stream.reset:
            stream.send_body(b"", False)
        stream.complete()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.abort()

    # From the stream

    def on_data(self, data: bytes) -> None:
        session = self.session
        if session is None or session.engine is None:  # not accepted (yet)
            self.early += data
        else:
            session.feed(data)

    def on_end(self) -> None:
        """The client ended the stream: its side of the WebSocket is closed, like a TCP FIN."""
        if self.session is not None and self.session.engine is not None:
            self.on_reset()
            self.close()

    def on_reset(self) -> None:
        """The stream is gone (reset, or the connection lost)."""
        session = self.session
        if session is not None:
            if session.engine is None:
                session.on_disconnect()
            else:
                session.on_closed()
