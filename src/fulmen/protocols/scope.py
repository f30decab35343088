"""The ASGI `http` scope, built the same way for every protocol.

HTTP/1.1 takes the path from its request target, HTTP/2 and HTTP/3 from `:path`; from there
the rules are shared: percent-decoding, `root_path`, interned method strings, a shallow copy
of the lifespan state, and the proxy headers of a trusted peer.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any
from urllib.parse import unquote_to_bytes

from fulmen.middleware.proxy_headers import ProxyHeaders
from fulmen.protocols.tls_scope import tls_extension
from fulmen.state import ServerState

ASGI_INFO = {"version": "3.0", "spec_version": "2.5"}
# The ASGI extensions every request is offered (each scope gets a copy, to which a protocol adds
# `http.response.trailers` and `tls` where they apply): a body from a file
# (`fulmen.protocols.filesend`) everywhere, 1xx early hints except to HTTP/1.0 (RFC 9110 §15.2).
_OFFERED: dict[str, object] = {}  # the entry of an extension without settings
EXTENSIONS_HTTP10: dict[str, Any] = {
    "http.response.pathsend": _OFFERED,
    "http.response.zerocopysend": _OFFERED,
}
EXTENSIONS: dict[str, Any] = {**EXTENSIONS_HTTP10, "http.response.early_hint": _OFFERED}
# Method bytes -> str, so that the same methods share one string; bounded against junk methods.
_METHODS: dict[bytes, str] = {}
_METHODS_MAX = 64


Endpoints = tuple[tuple[str, int] | None, tuple[str, int] | None, str]


def socket_address(info: object) -> tuple[str, int] | None:
    """(host, port) of a socket address (`peername`, `sockname`); None for a Unix socket. The
    host is interned: the connections from one address share it."""
    if isinstance(info, tuple) and len(info) >= 2:
        return (sys.intern(str(info[0])), int(info[1]))
    return None


# The server addresses connections were accepted on (one per listener, or per local address a
# wildcard listener is reached at), shared by their connections; forgotten when there are more
# than `_SERVERS_MAX`.
_SERVERS: dict[tuple[str, int], tuple[str, int]] = {}
_SERVERS_MAX = 64


def endpoints(transport: asyncio.BaseTransport) -> Endpoints:
    """(client, server, scheme) of a connection, as the scope reports them."""
    server = socket_address(transport.get_extra_info("sockname"))
    if server is not None:
        shared = _SERVERS.get(server)
        if shared is None:
            if len(_SERVERS) >= _SERVERS_MAX:
                _SERVERS.clear()
            _SERVERS[server] = server
        else:
            server = shared
    return (
        socket_address(transport.get_extra_info("peername")),
        server,
        "https" if transport.get_extra_info("sslcontext") else "http",
    )


def tls_of(transport: asyncio.BaseTransport, state: ServerState) -> dict[str, Any] | None:
    """The ASGI `tls` extension of a connection (None without TLS): once per connection."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    return tls_extension(ssl_object, state.server_cert)


def method_name(method: bytes) -> str:
    """The method as a str, interned in `_METHODS` (looked up there first, inline)."""
    name = method.decode("ascii")
    if len(_METHODS) < _METHODS_MAX:
        _METHODS[method] = name
    return name


def http_scope(
    state: ServerState,
    method: bytes,
    raw_path: bytes,
    query: bytes,
    version: str,
    headers: list[tuple[bytes, bytes]],
    endpoints: Endpoints,
    proxy: ProxyHeaders | None,
    extensions: dict[str, Any],
) -> dict[str, Any]:
    """The scope of one request. `endpoints` is (client, server, scheme) of the connection; `proxy`
    is given only when the peer is trusted and the request carries forwarding headers;
    `extensions` are the ASGI extensions the protocol offers this request."""
    if b"%" in raw_path or not raw_path.isascii():
        path = unquote_to_bytes(raw_path).decode("utf-8", "replace")
    else:
        path = raw_path.decode("ascii")
    root_path = state.root_path
    if root_path:
        path = root_path + path
        raw_path = root_path.encode("utf-8") + raw_path
    client, server, scheme = endpoints
    scope = {
        "type": "http",
        "asgi": ASGI_INFO,
        "http_version": version,
        "server": server,
        "client": client,
        "scheme": scheme,
        "method": _METHODS.get(method) or method_name(method),
        "root_path": root_path,
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers,
        "state": state.app_state.copy(),
        "extensions": extensions,
    }
    if proxy is not None:
        proxy.apply(scope)
    return scope
