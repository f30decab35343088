"""Which protocol serves a new connection: chosen here, for every listener.

Nothing else names the protocol a connection speaks. Each listener asks once per connection:

- `fulmen.server`, plain listeners: the loop's protocol factory is
  `functools.partial(connection, state)`;
- `fulmen.server`, TLS listeners: `functools.partial(tls_connection, state)`, a protocol that
  asks `connection` once the handshake is done, with its ALPN result (asyncio and uvloop call
  the factory as they accept, before the handshake, and `connection_made` after it);
- `proxy_protocol.ProxyProtocol`, once the PROXY header is read (no TLS: `--proxy-protocol` with
  TLS is `proxy_tls`'s);
- `proxy_tls.HeaderReader`, after the PROXY header and the TLS handshake, with the protocol the
  handshake agreed on (`negotiated`).

`alpn` is the TLS ALPN result (RFC 7301), `ssl_object.selected_alpn_protocol()`: None without
TLS or when the client offered no protocol. `h2` is HTTP/2 (`fulmen.protocols.http2`); anything
else is HTTP/1.1 (`H1Connection`). On cleartext, HTTP/1.1 connections may still become HTTP/2:
the h2c connection preface (RFC 9113 §3.3) or an `Upgrade: h2c` request (RFC 7540 §3.2), both
noticed by `H1Connection` and handed over through `state.http2` (`enable_http2`).

The factory adds a function call per connection and allocates nothing beyond the connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fulmen.protocols.h2c import Upgrade
from fulmen.protocols.http1 import H1Connection
from fulmen.protocols.http2 import H2Connection

if TYPE_CHECKING:
    from fulmen.state import ServerState


def connection(state: ServerState, alpn: str | None = None) -> asyncio.Protocol:
    """The protocol that serves a new connection of the server whose state is `state`, given the
    TLS ALPN result `alpn` (None when there is none)."""
    if alpn == "h2" and state.http2 is not None:
        return H2Connection(state)
    return H1Connection(state)


def tls_connection(state: ServerState) -> asyncio.Protocol:
    """The protocol factory of a TLS listener: the protocol is chosen after the handshake."""
    return AfterHandshake(state)


class AfterHandshake(asyncio.Protocol):
    """Stands in for the connection's protocol until the TLS handshake is done, then hands the
    transport to the protocol its ALPN result asks for. Until then it is in
    `state.handshaking`, for a graceful shutdown to wait for (a handshake that fails drops it:
    asyncio tells the protocol nothing then, and the set holds it weakly)."""

    __slots__ = ("__weakref__", "state")

    def __init__(self, state: ServerState) -> None:
        self.state = state
        state.handshaking.add(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.state.handshaking.discard(self)
        protocol = connection(self.state, negotiated(transport))
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


def enable_http2(state: ServerState) -> None:
    """Serve HTTP/2 on this server's connections (`--http2`)."""
    state.http2 = take_over


def take_over(
    state: ServerState, transport: asyncio.Transport, data: bytes, upgrade: Upgrade | None = None
) -> None:
    """Serve HTTP/2 on a cleartext connection that began as HTTP/1.1: `data` are the bytes
    received and not handled yet (the connection preface, or what followed `upgrade`)."""
    protocol = H2Connection(state, upgrade)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if data and not transport.is_closing():
        protocol.data_received(data)


def negotiated(transport: asyncio.BaseTransport) -> str | None:
    """The ALPN result of `transport`'s TLS handshake (None without TLS or without ALPN)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    alpn: str | None = ssl_object.selected_alpn_protocol()
    return alpn
