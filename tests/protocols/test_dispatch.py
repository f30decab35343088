"""`fulmen.protocols.dispatch`: every listener gets its connections' protocol from
`dispatch.connection`, over real sockets on both loops: plain, TLS, PROXY protocol, and PROXY
protocol followed by TLS; HTTP/2 by ALPN, or by prior knowledge through HTTP/1.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

from fulmen.protocols import dispatch
from fulmen.protocols.http1 import H1Connection
from fulmen.protocols.http2 import H2Connection
from tests.conftest import Certs, recv_until_closed
from tests.protocols.h2client import H2Client
from tests.protocols.test_proxy_protocol import REQUEST, client_app
from tests.test_tls import read_until_closed

V1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n"
Calls = list[tuple[str | None, type]]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """The (alpn, protocol class) of each `dispatch.connection` call from here on."""
    made: Calls = []
    real = dispatch.connection

    def recording(state: Any, alpn: str | None = None) -> asyncio.Protocol:
        conn = real(state, alpn)
        made.append((alpn, type(conn)))
        return conn

    monkeypatch.setattr(dispatch, "connection", recording)
    return made


@pytest.fixture(params=["asyncio", "uvloop"])
def serve_on(
    request: pytest.FixtureRequest, serve_one: Callable[..., Any]
) -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """`with serve_on(**options) as srv:` serving `client_app`, per loop."""

    def start(**options: Any) -> contextlib.AbstractContextManager[Any]:
        return serve_one(client_app, loop=request.param, **options)  # type: ignore[no-any-return]

    return start


def _scope(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    result: dict[str, Any] = json.loads(body)
    return result


def _tls_exchange(sock: socket.socket, certs: Certs, alpn: list[str] | None) -> tuple[Any, Any]:
    """One request over TLS on `sock`: (the response's scope, the ALPN protocol agreed)."""
    context = certs.context()
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        tls.sendall(REQUEST)
        response = read_until_closed(tls)
        agreed = tls.selected_alpn_protocol()
    return _scope(response), agreed


def test_plain_connection(serve_on, calls) -> None:
    with serve_on() as srv, srv.connect() as sock:
        sock.sendall(REQUEST)
        got = _scope(recv_until_closed(sock))
    assert got["scheme"] == "http"
    assert calls == [(None, H1Connection)]


def test_tls_connection_without_http2_asks_after_the_handshake(serve_on, calls, certs) -> None:
    """Without HTTP/2 too, a TLS connection gets its protocol once the handshake is done (a
    graceful shutdown waits for handshakes under way, `state.handshaking`); an h2 offer is
    answered with HTTP/1.1."""
    options = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key, "http2": False}
    with serve_on(**options) as srv, srv.connect() as sock:
        got, agreed = _tls_exchange(sock, certs, ["h2", "http/1.1"])
    assert (got["scheme"], agreed) == ("https", "http/1.1")
    assert calls == [("http/1.1", H1Connection)]


@pytest.mark.parametrize(("offer", "expected"), [(["http/1.1"], "http/1.1"), (None, None)])
def test_tls_connection_with_http2_asks_after_the_handshake(
    serve_on, calls, certs, offer, expected
) -> None:
    with serve_on(ssl_certfile=certs.cert, ssl_keyfile=certs.key) as srv, srv.connect() as sock:
        got, agreed = _tls_exchange(sock, certs, offer)
    assert (got["scheme"], agreed) == ("https", expected)
    assert calls == [(expected, H1Connection)]


@pytest.mark.parametrize("proxy_protocol", [False, True])
def test_alpn_h2_is_served_by_the_http2_connection(serve_on, calls, certs, proxy_protocol) -> None:
    options = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key}
    with serve_on(proxy_protocol=proxy_protocol, **options) as srv, srv.connect() as sock:
        if proxy_protocol:
            sock.sendall(V1)
        context = certs.context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            response = H2Client(tls).get("/")  # type: ignore[arg-type]
    got = json.loads(response.body)
    assert got["scheme"] == "https"
    if proxy_protocol:
        assert got["client"] == ["192.0.2.1", 56324]
    assert calls == [("h2", H2Connection)]


def test_h2c_prior_knowledge_behind_the_proxy_protocol(serve_on, calls) -> None:
    with serve_on(proxy_protocol=True) as srv, srv.connect() as sock:
        sock.sendall(V1)
        response = H2Client(sock).get("/")
    got = json.loads(response.body)
    assert got["client"] == ["192.0.2.1", 56324]
    assert calls == [(None, H1Connection)]  # which hands the connection over to HTTP/2


def test_proxy_protocol_connection(serve_on, calls) -> None:
    with serve_on(proxy_protocol=True) as srv, srv.connect() as sock:
        sock.sendall(V1 + REQUEST)
        got = _scope(recv_until_closed(sock))
    assert got["client"] == ["192.0.2.1", 56324]
    assert calls == [(None, H1Connection)]


@pytest.mark.parametrize(
    ("offer", "expected"),
    [(["http/1.1"], "http/1.1"), (["h2", "http/1.1"], "http/1.1"), (None, None), (["h2"], None)],
    ids=["http11", "h2-and-http11", "no-alpn", "h2-only"],
)
def test_proxy_tls_connection_asks_with_the_alpn_result(
    serve_on, calls, certs, offer, expected
) -> None:
    options = {
        "ssl_certfile": certs.cert,
        "ssl_keyfile": certs.key,
        "proxy_protocol": True,
        "http2": False,  # ALPN offers http/1.1 alone
    }
    with serve_on(**options) as srv, srv.connect() as sock:
        sock.sendall(V1)
        got, agreed = _tls_exchange(sock, certs, offer)
    assert (got["client"], got["scheme"], agreed) == (["192.0.2.1", 56324], "https", expected)
    assert calls == [(expected, H1Connection)]


def test_negotiated_without_tls_is_none() -> None:
    assert dispatch.negotiated(asyncio.BaseTransport()) is None
