"""Lingering close, as nginx and Apache do it: a connection closed while the client may still
be sending (an error response to a request whose body is arriving, a `connection: close`
response to a keep-alive client, an idle connection at its timeout or after the shutdown grace,
an HTTP/2 connection after its GOAWAY) is half-closed first, and what the client sends after it is
read and dropped until the client closes its side, or a bound in bytes or time is reached.

Closing a socket outright with unread bytes in its receive buffer makes the kernel send a TCP
reset, and a reset makes the client's kernel discard what it has received and not yet read:
the client sees `connection reset by peer` instead of the 413 or 400 it was sent (RFC 9112
§9.6). TLS transports cannot half-close in asyncio: they are closed as before.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fulmen.state import ServerState

# Seconds an idle keep-alive connection stays open once the server shuts down: a client under
# load sends its next request within milliseconds of the last response, so it gets it answered
# (HTTP/1.1: with `connection: close`) instead of a closed socket. See docs/behaviour.md.
SHUTDOWN_GRACE = 1.0
LINGER_SECONDS = 5.0  # the longest a closing connection is kept to drain the client's bytes
LINGER_BYTES = 4 * 1024 * 1024  # the most that is read and dropped


class Lingering(asyncio.Protocol):
    """The protocol of a half-closed connection: drops what it reads, closes at the bounds.
    It counts among the server's connections, so a graceful shutdown waits for it, at most
    `SHUTDOWN_GRACE` seconds."""

    __slots__ = ("left", "state", "timer", "transport")

    def __init__(self, transport: asyncio.Transport, state: ServerState) -> None:
        self.transport = transport
        self.state = state
        self.left = LINGER_BYTES
        seconds = SHUTDOWN_GRACE if state.shutting_down else LINGER_SECONDS
        self.timer = state.loop.call_later(seconds, transport.close)
        state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left <= 0:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done too: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
        self.state.connections.discard(self)

    def check_timeout(self, now: float) -> None:
        """The timer bounds it already."""

    def shutdown(self) -> None:
        if self.timer.when() - self.state.loop.time() > SHUTDOWN_GRACE:
            self.timer.cancel()
            self.timer = self.state.loop.call_later(SHUTDOWN_GRACE, self.transport.close)


def linger(transport: asyncio.Transport, state: ServerState) -> bool:
    """Close `transport` after what was written to it, without resetting the connection under
    a client that is still sending. True: it lingers, its protocol replaced (the old one hears
    nothing more); False: it was closed at once (TLS, or reset by the client already), and its
    protocol's `connection_lost` follows as usual."""
    if transport.is_closing():
        return False
    if not transport.can_write_eof():
        transport.close()
        return False
    try:
        transport.write_eof()
    except OSError:  # the client has reset the connection already
        transport.abort()
        return False
    transport.set_protocol(Lingering(transport, state))
    transport.resume_reading()
    return True
