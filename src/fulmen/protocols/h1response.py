"""Writing one HTTP/1.1 response: the sending half of the `Framer` (`fulmen.protocols.cycle`)
that `H1Connection` is for the request it answers.

Response framing is decided here, once per response: Content-Length when the body is whole
(or the app gave one), chunked while it streams, until the close for an HTTP/1.0 client;
`connection: close` when the connection ends after this response. Header lines come from the
precomputed cache (`wire.HEADER_LINES`), and head and first body go out in one write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fulmen.protocols import wire
from fulmen.protocols.cycle import Headers, RequestCycle
from fulmen.protocols.fields import (
    CONNECTION,
    CONTENT_LENGTH,
    ORDINARY,
    SERVER_OR_DATE,
    TRANSFER_ENCODING,
)
from fulmen.protocols.fields import content_length as app_content_length
from fulmen.protocols.filesend import ZERO_COPY
from fulmen.protocols.flow import FlowControl
from fulmen.protocols.wire import CHUNKED, CRLF, HEADER_LINES, LENGTH, STATUS_LINES, UNTIL_CLOSE
from fulmen.state import ServerState

# From this size a body is written beside its head or chunk framing (writev) rather than
# copied into one bytes object with it. Measured on uvloop: a 16 KiB chunked stream gains 2-4%,
# a 4 KiB body with its head loses 3% (writev's own cost outweighs copying so little).
LARGE_CHUNK = 16384


def write_gathered(transport: asyncio.Transport, pieces: tuple[bytes, ...]) -> None:
    """Write `pieces` in order. uvloop's `writelines` sends them with one writev, under its flow
    control. asyncio's joins them before Python 3.12, and from 3.12 skipped flow control until
    CPython gh-127655 was fixed (3.12.9, 3.13.2): a client that reads nothing would let the
    buffer grow without bound. So asyncio's transports get the pieces joined, in one write."""
    if type(transport).__module__ == "uvloop.loop":
        transport.writelines(pieces)
    else:
        transport.write(b"".join(pieces))


class H1Response:
    """The response state of an HTTP/1.1 connection (`framing`, `remaining`: a request
    allocates no framer object) and the Framer calls that write it. The connection
    (`fulmen.protocols.http1.H1Connection`) holds the attributes annotated here."""

    __slots__ = ("framing", "last", "remaining")

    state: ServerState
    transport: asyncio.Transport
    flow: FlowControl
    tls: dict[str, Any] | None  # the connection's ASGI `tls` extension (None: no TLS)
    cycle: RequestCycle | None  # the request being answered
    parsing: RequestCycle | None  # the request whose body is arriving

    def __init__(self) -> None:
        self.framing = wire.NONE
        self.remaining = 0
        self.last: RequestCycle | None = None  # the connection closes after its response

    def send_head(self, status: int, headers: Headers, body: bytes, more_body: bool) -> None:
        cycle = self.cycle
        assert cycle is not None
        parts = [STATUS_LINES.get(status) or wire.status_line(status)]
        append = parts.append
        length: int | None = None
        app_coding = app_connection = False
        close = cycle is self.last
        own_defaults: list[bytes] | None = None
        lines = HEADER_LINES
        for header in headers:
            try:
                entry = lines.get(header)
            except TypeError:  # not a tuple (e.g. a list): unhashable, validate uncached
                entry = None
            if entry is None:
                entry = wire.header_line(header)
            line, kind, lname = entry
            append(line)
            if kind is not ORDINARY:
                if kind is CONTENT_LENGTH:
                    if status == 204:  # RFC 9110 §8.6: never on a 204
                        parts.pop()
                        continue
                    length = app_content_length(header[1])
                elif kind is TRANSFER_ENCODING:
                    app_coding = True
                elif kind is CONNECTION:
                    app_connection = True
                    close = close or b"close" in header[1].lower()
                else:
                    own_defaults = [lname] if own_defaults is None else [*own_defaults, lname]
        scope = cycle.scope
        http10 = scope["http_version"] == "1.0"
        head = scope["method"] == "HEAD"
        framing = wire.body_framing(status, head, length, app_coding, not more_body, http10)
        if framing is LENGTH:
            if length is None:
                length = len(body)
                append(b"content-length: %d\r\n" % length)
            self.remaining = length
        elif framing is CHUNKED:
            if not app_coding:
                append(b"transfer-encoding: chunked\r\n")
        elif framing is UNTIL_CLOSE:
            close = True
        self.framing = framing
        state = self.state
        if state.shutting_down or (cycle.more_body and not cycle.receiving):
            # Answering before asking for the body: it will not be read, so the connection
            # cannot be reused (RFC 9110 §10.1.1 lets us close instead of draining it).
            close = True
        if not app_connection:
            if close:
                append(b"connection: close\r\n")
            elif http10:
                append(b"connection: keep-alive\r\n")
        if own_defaults is None:
            append(state.default_headers)
        else:
            append(state.defaults_without(frozenset(own_defaults)))
        append(CRLF)
        # Either may refuse the body: then nothing was sent.
        large = self._framed_large(body, more_body) if len(body) >= LARGE_CHUNK else None
        if large is None:
            append(self._framed(body, more_body))
        if close:
            self.last = cycle
        if large is None:
            self.transport.write(b"".join(parts))
        else:
            write_gathered(self.transport, (b"".join(parts), *large))

    def send_body(self, body: bytes, more_body: bool) -> None:
        if len(body) >= LARGE_CHUNK:
            write_gathered(self.transport, self._framed_large(body, more_body))
            return
        data = self._framed(body, more_body)
        if data:
            self.transport.write(data)

    def _framed_large(self, body: bytes, more_body: bool) -> tuple[bytes, ...]:
        """A large body framed as pieces for `write_gathered`, so that it is not copied into a
        framed bytes object."""
        if self.framing is CHUNKED:
            end = wire.CHUNK_END if more_body else wire.CHUNK_END_LAST
            return (b"%x\r\n" % len(body), body, end)
        return (self._framed(body, more_body),)  # the body itself, or nothing (no body)

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

    def file_socket(self, count: int) -> FlowControl | None:
        """The socket to `os.sendfile` the next `count` body bytes into (they count as sent),
        when they may go there as they are: plain TCP or a Unix socket, the body framed by its
        length or by the close. None: they go through `send_body`."""
        framing = self.framing
        if (framing is not LENGTH and framing is not UNTIL_CLOSE) or self.tls is not None:
            return None
        if not ZERO_COPY or self.transport.get_extra_info("socket") is None:
            return None
        if framing is LENGTH:
            if count > self.remaining:
                raise RuntimeError("Response content longer than Content-Length")
            self.remaining -= count
        return self.flow

    def send_interim(self, status: int, headers: Headers = ()) -> None:
        lines = [wire.header_line((name, value))[0] for name, value in headers]
        self.transport.write(b"".join([wire.status_line(status), *lines, CRLF]))

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        lines = []
        for header in headers:
            line, kind, _ = wire.header_line(header)
            if kind is not ORDINARY and kind is not SERVER_OR_DATE:
                # RFC 9110 §6.5.1: framing and connection fields never go in trailers.
                raise RuntimeError(f"Header {header[0]!r} is not allowed in trailers")
            lines.append(line)
        framing = self.framing
        if framing is CHUNKED:  # RFC 9112 §7.1.2: the trailer section after the last chunk
            self.transport.write(b"".join([b"0\r\n", *lines, CRLF]))
        elif framing is LENGTH and self.remaining:
            raise RuntimeError("Response content shorter than Content-Length")
        # Otherwise (a Content-Length, no body, or a body ended by the close) there is no
        # place for trailers in HTTP/1.1: the response ends without them.

    def send_plain(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        # The connection ends after a 500 (the app failed), or with the body still arriving.
        cycle = self.cycle
        close = (
            cycle is self.last or cycle is self.parsing or status == 500 or self.state.shutting_down
        )
        if close:
            self.last = cycle
        lines = b"".join([wire.header_line(header)[0] for header in headers])
        response = wire.simple_response(status, body, lines + self.state.default_headers, close)
        self.transport.write(response)
