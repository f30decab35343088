"""Which protocol serves a new connection: chosen here, in `connection`, for every listener.

Nothing else names the protocol a connection speaks. Each listener asks once per connection,
when it has one to serve:

- `fulmen.server`, plain and TLS listeners: the loop's protocol factory is
  `functools.partial(connection, state)`. asyncio and uvloop call it as they accept, before a TLS
  handshake, so these pass no `alpn`;
- `proxy_protocol.ProxyProtocol`, once the PROXY header is read (no TLS: `--proxy-protocol` with
  TLS is `proxy_tls`'s);
- `proxy_tls.HeaderReader`, after the PROXY header and the TLS handshake, with the protocol the
  handshake agreed on (`negotiated`).

`alpn` is the TLS ALPN result (RFC 7301), `ssl_object.selected_alpn_protocol()`: None without
TLS, when the client offered no protocol, or where it is not known yet. `fulmen.tls` offers only
`http/1.1`, so today every case is HTTP/1.1, `H1Connection(state)`, and asking before the
handshake loses nothing.

HTTP/2 is a branch in `connection`: `alpn == "h2"` (once `fulmen.tls.ALPN_PROTOCOLS` offers it;
TLS listeners must then ask after their handshake, as `proxy_tls` does), or, for h2c with prior
knowledge (RFC 9113 §3.3), a protocol that compares the first bytes with the connection preface
before handing the connection over.

The factory adds a function call per connection and allocates nothing beyond the connection.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fulmen.protocols.http1 import H1Connection

if TYPE_CHECKING:
    from fulmen.state import ServerState


def connection(state: ServerState, alpn: str | None = None) -> asyncio.Protocol:
    """The protocol that serves a new connection of the server whose state is `state`, given the
    TLS ALPN result `alpn` (None when there is none or it is not known)."""
    # A protocol other than HTTP/1.1 is one branch here, on `alpn` (see the module docstring).
    return H1Connection(state)


def negotiated(transport: asyncio.BaseTransport) -> str | None:
    """The ALPN result of `transport`'s TLS handshake (None without TLS or without ALPN)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    alpn: str | None = ssl_object.selected_alpn_protocol()
    return alpn
