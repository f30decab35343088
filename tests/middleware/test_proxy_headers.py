"""Proxy headers: X-Forwarded-For/Proto from trusted peers set the scope's client and scheme."""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from fulmen import Config
from fulmen.middleware.proxy_headers import (
    ProxyHeaders,
    TrustedHosts,
    parse_forwarded,
    parse_node,
)
from fulmen.server import Server
from tests.conftest import TIMEOUT, recv_until_closed


async def echo_client(scope, receive, send):
    body = f"{scope['client'][0]} {scope['client'][1]} {scope['scheme']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def fetch(srv, headers: dict[str, str]) -> tuple[str, int, str]:
    with httpx.Client(timeout=TIMEOUT) as client:
        host, port, scheme = client.get(srv.url, headers=headers).text.split(" ")
    return host, int(port), scheme


FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


def test_trusted_peer_sets_client_and_scheme(serve) -> None:
    # The default trusts 127.0.0.1, the peer of every test connection.
    with serve(echo_client) as srv:
        assert fetch(srv, FORWARDED) == ("203.0.113.7", 0, "https")
        # Without the headers nothing changes, on the same server.
        host, port, scheme = fetch(srv, {})
    assert (host, scheme) == ("127.0.0.1", "http")
    assert port != 0


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"forwarded_allow_ips": "10.0.0.1"}, id="untrusted-peer"),
        pytest.param({"forwarded_allow_ips": "10.0.0.0/8, ::1"}, id="untrusted-networks"),
        pytest.param({"proxy_headers": False}, id="proxy-headers-off"),
        pytest.param({"proxy_headers": False, "forwarded_allow_ips": "*"}, id="off-even-for-all"),
    ],
)
def test_headers_ignored(options, serve_one) -> None:
    with serve_one(echo_client, **options) as srv:
        host, port, scheme = fetch(srv, FORWARDED)
    assert (host, scheme) == ("127.0.0.1", "http")
    assert port != 0


def test_forwarded_allow_ips_from_environment(serve_one, monkeypatch) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.0.0.1")
    with serve_one(echo_client) as srv:
        assert fetch(srv, FORWARDED)[0] == "127.0.0.1"
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.0/8")
    with serve_one(echo_client) as srv:
        assert fetch(srv, FORWARDED)[0] == "203.0.113.7"


@pytest.mark.parametrize(
    ("allow", "forwarded_for", "client"),
    [
        pytest.param("127.0.0.1", "203.0.113.7", "203.0.113.7", id="ip"),
        pytest.param("127.0.0.0/8", "203.0.113.7", "203.0.113.7", id="cidr"),
        pytest.param("*", "203.0.113.7", "203.0.113.7", id="star"),
        # Each proxy appends the address it saw: the client is the right-most untrusted one.
        pytest.param(
            "127.0.0.1, 10.0.0.0/8",
            "198.51.100.1, 203.0.113.7, 10.1.2.3",
            "203.0.113.7",
            id="chain",
        ),
        pytest.param("127.0.0.1", "198.51.100.1, 203.0.113.7", "203.0.113.7", id="spoofed-left"),
        # Every hop trusted: the left-most is the client.
        pytest.param("127.0.0.1,10.0.0.0/8", "10.0.0.1, 10.0.0.2", "10.0.0.1", id="all-trusted"),
        # '*' trusts every hop, so the left-most address is the client.
        pytest.param("*", "198.51.100.1, 203.0.113.7", "198.51.100.1", id="star-chain"),
        pytest.param("127.0.0.1", "2001:db8::1", "2001:db8::1", id="ipv6-client"),
        pytest.param(
            "127.0.0.1,2001:db8::/32", "198.51.100.1, 2001:db8::5", "198.51.100.1", id="v6"
        ),
        pytest.param("127.0.0.1", ", ,", "127.0.0.1", id="empty"),
    ],
)
def test_forwarded_for(allow, forwarded_for, client, serve_one) -> None:
    with serve_one(echo_client, forwarded_allow_ips=allow) as srv:
        assert fetch(srv, {"X-Forwarded-For": forwarded_for})[0] == client


@pytest.mark.parametrize(
    ("proto", "scheme"),
    [
        ("https", "https"),
        ("HTTPS", "https"),
        ("http", "http"),
        ("http, https", "https"),  # the nearest proxy's view
        ("ftp", "http"),  # not a scheme an ASGI app can be told
        ("", "http"),
    ],
)
def test_forwarded_proto(proto, scheme, serve_one) -> None:
    with serve_one(echo_client) as srv:
        host, _, seen = fetch(srv, {"X-Forwarded-Proto": proto})
    assert (host, seen) == ("127.0.0.1", scheme)


def test_trusted_hosts_membership() -> None:
    trusted = TrustedHosts(["127.0.0.1", "10.0.0.0/8", "2001:db8::/32", "proxy.internal"])
    assert "127.0.0.1" in trusted
    assert "10.200.3.4" in trusted
    assert "2001:db8::42" in trusted
    assert "proxy.internal" in trusted  # a literal, e.g. a hostname
    # IPv4 peers of a dual-stack socket (`--host ::`) arrive as IPv4-mapped IPv6 addresses.
    assert "::ffff:127.0.0.1" in trusted and "::ffff:10.1.2.3" in trusted
    for host in ("127.0.0.2", "11.0.0.1", "2001:db9::1", "::ffff:127.0.0.2", "not-an-ip", None):
        assert host not in trusted
    everyone = TrustedHosts(["*"])
    assert "198.51.100.1" in everyone and "anything" in everyone
    assert everyone.client_of("") is None


@pytest.mark.parametrize(("proto", "scheme"), [("https", "wss"), ("http", "ws"), ("wss", "wss")])
def test_websocket_scheme(proto, scheme) -> None:
    # The scope is built as the WebSocket cycle builds it, without a server.
    scope = {
        "type": "websocket",
        "scheme": "ws",
        "client": ("127.0.0.1", 5000),
        "headers": [(b"x-forwarded-proto", proto.encode())],
    }
    ProxyHeaders(["127.0.0.1"]).apply(scope)
    assert scope["scheme"] == scheme
    assert scope["client"] == ("127.0.0.1", 5000)


def test_peer_without_address_is_trusted_only_by_star() -> None:
    # A Unix socket peer has no address.
    assert not ProxyHeaders(["127.0.0.1"]).trusts(None)
    assert ProxyHeaders(["*"]).trusts(None)


# Modes, forwarded host and port, RFC 7239 Forwarded, Unix socket peers, WebSockets.


async def echo_scope(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps(_view(scope))})
        await send({"type": "websocket.close"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(_view(scope)).encode()})


def _view(scope) -> dict[str, Any]:
    hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
    return {
        "client": list(scope["client"]) if scope["client"] else None,
        "server": list(scope["server"]) if scope["server"] else None,
        "scheme": scope["scheme"],
        "host": hosts,
    }


def view(srv, headers: dict[str, str] | list[tuple[str, str]]) -> dict[str, Any]:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.get(srv.url, headers=headers).json()


def test_host_and_port_are_opt_in(serve_one) -> None:
    headers = {"X-Forwarded-Host": "example.com", "X-Forwarded-Port": "8443"}
    with serve_one(echo_scope) as srv:
        seen = view(srv, headers)
    assert seen["server"] == ["127.0.0.1", srv.port]
    assert seen["host"] == [f"127.0.0.1:{srv.port}"]


@pytest.mark.parametrize(
    ("headers", "server", "host"),
    [
        pytest.param({"X-Forwarded-Host": "example.com"}, ["example.com", 80], "example.com"),
        pytest.param(
            {"X-Forwarded-Host": "example.com", "X-Forwarded-Proto": "https"},
            ["example.com", 443],
            "example.com",
            id="https-default-port",
        ),
        pytest.param(
            {"X-Forwarded-Host": "example.com:8443", "X-Forwarded-Proto": "https"},
            ["example.com", 8443],
            "example.com:8443",
            id="host-with-port",
        ),
        pytest.param(
            {"X-Forwarded-Host": "example.com:1", "X-Forwarded-Port": "8080"},
            ["example.com", 8080],
            "example.com:8080",
            id="port-wins",
        ),
        pytest.param(
            {"X-Forwarded-Host": "evil.test, example.com"},
            ["example.com", 80],
            "example.com",
            id="nearest-proxy",
        ),
        pytest.param(
            {"X-Forwarded-Host": "[2001:db8::1]:8000"},
            ["2001:db8::1", 8000],
            "[2001:db8::1]:8000",
            id="ipv6",
        ),
        pytest.param({"X-Forwarded-Port": "9000"}, ["127.0.0.1", 9000], "127.0.0.1:9000"),
        pytest.param(
            {"X-Forwarded-Port": "443", "X-Forwarded-Proto": "https"},
            ["127.0.0.1", 443],
            "127.0.0.1",
            id="port-only-default",
        ),
        pytest.param({"X-Forwarded-Host": "bad host"}, None, None, id="invalid-host"),
        pytest.param({"X-Forwarded-Host": ":80"}, None, None, id="no-name"),
        pytest.param({"X-Forwarded-Host": "example.com:99999"}, ["example.com", 80], "example.com"),
        pytest.param(
            {"X-Forwarded-Host": "example.com", "X-Forwarded-Port": "x"},
            ["example.com", 80],
            "example.com",
            id="bad-port",
        ),
    ],
)
def test_forwarded_host_and_port(headers, server, host, serve_one) -> None:
    with serve_one(echo_scope, proxy_headers_host=True) as srv:
        seen = view(srv, headers)
    if server is None:  # ignored
        server, host = ["127.0.0.1", srv.port], f"127.0.0.1:{srv.port}"
    assert seen["server"] == server
    assert seen["host"] == [host]  # the Host header is replaced, not added


def test_forwarded_host_without_host_header(serve_one) -> None:
    # An HTTP/1.0 request may have no Host header: one is added.
    with serve_one(echo_scope, proxy_headers_host=True) as srv, srv.connect() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nX-Forwarded-Port: 8080\r\n\r\n")
        response = recv_until_closed(sock)
    seen = json.loads(response.split(b"\r\n\r\n", 1)[1])
    assert seen["server"] == ["127.0.0.1", 8080]
    assert seen["host"] == ["127.0.0.1:8080"]


@pytest.mark.parametrize(
    ("allow", "forwarded", "client", "scheme"),
    [
        pytest.param("127.0.0.1", "for=203.0.113.7", ["203.0.113.7", 0], "http", id="for"),
        pytest.param("127.0.0.1", "For=203.0.113.7;Proto=HTTPS", ["203.0.113.7", 0], "https"),
        pytest.param(
            "127.0.0.1", 'for="203.0.113.7:4711"', ["203.0.113.7", 4711], "http", id="port"
        ),
        pytest.param(
            "127.0.0.1",
            'for="[2001:db8:cafe::17]:4711";proto=https',
            ["2001:db8:cafe::17", 4711],
            "https",
            id="ipv6-port",
        ),
        pytest.param("127.0.0.1", 'for="[2001:db8::17]"', ["2001:db8::17", 0], "http", id="ipv6"),
        pytest.param(
            "127.0.0.1", 'for="203.0.113.7:_p1"', ["203.0.113.7", 0], "http", id="obf-port"
        ),
        # Each proxy appends an element: the client is the right-most untrusted `for=`, and
        # the proto is from that same element (what the client used to reach the first proxy).
        pytest.param(
            "127.0.0.1, 10.0.0.0/8",
            "for=198.51.100.1;proto=http, for=203.0.113.7;proto=https, for=10.1.2.3;proto=http",
            ["203.0.113.7", 0],
            "https",
            id="chain",
        ),
        pytest.param(
            "127.0.0.1, 10.0.0.0/8",
            "for=10.0.0.1;proto=https, for=10.0.0.2",
            ["10.0.0.1", 0],
            "https",
            id="all-trusted",
        ),
        pytest.param(
            "*", "for=198.51.100.1;proto=https, for=203.0.113.7", ["198.51.100.1", 0], "https"
        ),
        # Several header lines are one list.
        pytest.param(
            "127.0.0.1, 10.0.0.0/8",
            [("Forwarded", "for=203.0.113.7"), ("Forwarded", "for=10.1.2.3")],
            ["203.0.113.7", 0],
            "http",
            id="lines",
        ),
        # Obfuscated and unknown nodes are not addresses: the client stays the peer.
        pytest.param("127.0.0.1", "for=_hidden;proto=https", None, "https", id="obfuscated"),
        pytest.param("127.0.0.1", "for=unknown", None, "http", id="unknown"),
        pytest.param("127.0.0.1", "proto=https", None, "https", id="no-for"),
        pytest.param("127.0.0.1", "for=2001:db8::1", None, "http", id="ipv6-unbracketed"),
        pytest.param("127.0.0.1", 'for="[2001:db8::1"', None, "http", id="ipv6-unclosed"),
        pytest.param("127.0.0.1", 'for="[2001:db8::1]x"', None, "http", id="ipv6-junk"),
        pytest.param("127.0.0.1", 'for="[not-v6]"', None, "http", id="ipv6-invalid"),
        pytest.param("127.0.0.1", 'for="1.2.3.4:99999"', None, "http", id="bad-port"),
        pytest.param("127.0.0.1", "for=example.com", None, "http", id="hostname"),
        # Spoofed on the left by the client: the right-most untrusted hop still wins.
        pytest.param("127.0.0.1", "for=198.51.100.1, for=203.0.113.7", ["203.0.113.7", 0], "http"),
        pytest.param(
            "127.0.0.1",
            'for=203.0.113.7;by="[2001:db8::9]:80";proto=https',
            ["203.0.113.7", 0],
            "https",
            id="by",
        ),
        pytest.param("127.0.0.1", "for=203.0.113.7;proto=ftp", ["203.0.113.7", 0], "http"),
        pytest.param("127.0.0.1", ", for=203.0.113.7 ,,", ["203.0.113.7", 0], "http"),
        pytest.param("127.0.0.1", 'for="\\2\\03.0.113.7"', ["203.0.113.7", 0], "http"),
    ],
)
def test_forwarded_header(allow, forwarded, client, scheme, serve_one) -> None:
    headers = forwarded if isinstance(forwarded, list) else {"Forwarded": forwarded}
    with serve_one(echo_scope, forwarded_allow_ips=allow, proxy_headers_mode="forwarded") as srv:
        seen = view(srv, headers)
    if client is None:
        assert seen["client"][0] == "127.0.0.1" and seen["client"][1] != 0
    else:
        assert seen["client"] == client
    assert seen["scheme"] == scheme


@pytest.mark.parametrize(
    "forwarded",
    [
        "for",
        "for=",
        "for=1.2.3.4;",
        "for=1.2.3.4;for=5.6.7.8",  # a parameter twice in one element
        'for="1.2.3.4',  # unterminated: would swallow the proxies' elements
        'for="1.2.3.4, for=10.0.0.1',
        "for=1.2.3.4 proto=https",
        "for=1.2.3.4;proto=https;;",
        "=1.2.3.4",
        'for=a"b',
        "for=1.2.3.4, garbage, for=5.6.7.8",
    ],
)
def test_malformed_forwarded_is_ignored(forwarded, serve_one) -> None:
    with serve_one(echo_scope, proxy_headers_mode="forwarded", proxy_headers_host=True) as srv:
        seen = view(srv, [("Forwarded", forwarded + ";proto=https;host=evil.test")])
    assert seen["client"][0] == "127.0.0.1" and seen["client"][1] != 0
    assert seen["scheme"] == "http"
    assert seen["server"] == ["127.0.0.1", srv.port]


@pytest.mark.parametrize(
    ("forwarded", "server", "host"),
    [
        ("for=1.2.3.4;host=example.com;proto=https", ["example.com", 443], "example.com"),
        ('for=1.2.3.4;host="example.com:8080"', ["example.com", 8080], "example.com:8080"),
        ("for=1.2.3.4;host=bad/host", None, None),
    ],
)
def test_forwarded_host(forwarded, server, host, serve_one) -> None:
    with serve_one(echo_scope, proxy_headers_mode="forwarded", proxy_headers_host=True) as srv:
        seen = view(srv, {"Forwarded": forwarded})
        # Without --proxy-headers-host, host= is ignored.
    with serve_one(echo_scope, proxy_headers_mode="forwarded") as srv2:
        plain = view(srv2, {"Forwarded": forwarded})
    assert plain["server"] == ["127.0.0.1", srv2.port]
    if server is None:
        server, host = ["127.0.0.1", srv.port], f"127.0.0.1:{srv.port}"
    assert seen["server"] == server
    assert seen["host"] == [host]


def test_families_are_never_mixed(serve_one) -> None:
    x_forwarded = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "x.example",
        "X-Forwarded-Port": "8443",
    }
    forwarded = {"Forwarded": "for=198.51.100.1;proto=https;host=f.example"}
    both = {**x_forwarded, **forwarded}
    with serve_one(echo_scope, proxy_headers_mode="forwarded", proxy_headers_host=True) as srv:
        seen = view(srv, both)
        assert seen["client"] == ["198.51.100.1", 0]
        assert seen["server"] == ["f.example", 443]
        seen = view(srv, x_forwarded)  # X-Forwarded-* alone: ignored
        assert seen["client"][0] == "127.0.0.1" and seen["scheme"] == "http"
        assert seen["server"] == ["127.0.0.1", srv.port]
    with serve_one(echo_scope, proxy_headers_host=True) as srv:
        seen = view(srv, both)
        assert seen["client"] == ["203.0.113.7", 0]
        assert seen["server"] == ["x.example", 8443]
        seen = view(srv, forwarded)  # Forwarded alone: ignored
        assert seen["client"][0] == "127.0.0.1" and seen["scheme"] == "http"
        assert seen["server"] == ["127.0.0.1", srv.port]


@pytest.mark.parametrize("mode", ["x-forwarded", "forwarded"])
def test_untrusted_peer_ignored_in_every_mode(mode, serve_one) -> None:
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "x.example",
        "Forwarded": "for=203.0.113.7;proto=https;host=x.example",
    }
    options = {"proxy_headers_mode": mode, "proxy_headers_host": True}
    with serve_one(echo_scope, forwarded_allow_ips="10.0.0.1, unix:", **options) as srv:
        seen = view(srv, headers)
    assert seen["client"][0] == "127.0.0.1" and seen["scheme"] == "http"
    assert seen["server"] == ["127.0.0.1", srv.port]


@contextlib.contextmanager
def serve_uds(app: Any, path: str, **options: Any) -> Iterator[httpx.Client]:
    """The app served in-process on a Unix socket; an httpx client connected to it."""
    config = Config(app, uds=path, lifespan="off", http="httptools", loop="asyncio", **options)
    server = Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.005)
        transport = httpx.HTTPTransport(uds=path)
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        gc.collect()
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("allow", "trusted"),
    [("unix:", True), ("127.0.0.1, unix:", True), ("*", True), ("127.0.0.1", False)],
)
@pytest.mark.parametrize("mode", ["x-forwarded", "forwarded"])
def test_unix_socket_peer(allow, trusted, mode, tmp_path) -> None:
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=203.0.113.7;proto=https",
    }
    path = str(tmp_path / "proxy.sock")
    options = {"forwarded_allow_ips": allow, "proxy_headers_mode": mode}
    with serve_uds(echo_scope, path, **options) as client:
        seen = client.get("http://proxy/", headers=headers).json()
    if trusted:
        assert seen["client"] == ["203.0.113.7", 0] and seen["scheme"] == "https"
    else:
        assert seen["client"] is None and seen["scheme"] == "http"


def test_unix_entry_does_not_trust_addresses(serve_one) -> None:
    # `unix:` trusts Unix socket peers only: not TCP peers, nor a hop named "unix:".
    with serve_one(echo_scope, forwarded_allow_ips="unix:") as srv:
        seen = view(srv, FORWARDED)
    assert seen["client"][0] == "127.0.0.1" and seen["scheme"] == "http"
    assert "unix:" not in TrustedHosts(["unix:"])
    assert ProxyHeaders(["unix:"]).trusts(None)


@pytest.mark.parametrize("mode", ["x-forwarded", "forwarded"])
@pytest.mark.parametrize(("proto", "scheme"), [("https", "wss"), ("wss", "wss"), ("http", "ws")])
def test_websocket_scope(mode, proto, scheme, serve_one) -> None:
    if mode == "forwarded":
        headers = {"Forwarded": f"for=203.0.113.7;proto={proto};host=ws.example"}
    else:
        headers = {
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": proto,
            "X-Forwarded-Host": "ws.example",
        }
    options = {"proxy_headers_mode": mode, "proxy_headers_host": True}
    with (
        serve_one(echo_scope, ws="websockets", **options) as srv,
        ws_connect(f"ws://127.0.0.1:{srv.port}/", additional_headers=headers) as ws,
    ):
        seen = json.loads(ws.recv(timeout=TIMEOUT))
    port = 443 if scheme == "wss" else 80
    assert seen == {
        "client": ["203.0.113.7", 0],
        "server": ["ws.example", port],
        "scheme": scheme,
        "host": ["ws.example"],
    }


@pytest.mark.parametrize(("proto", "scheme"), [("wss", "https"), ("ws", "http")])
def test_websocket_proto_on_http_request(proto, scheme, serve_one) -> None:
    # An HTTP scope is told the HTTP scheme matching a ws/wss proto.
    with serve_one(echo_scope) as srv:
        assert view(srv, {"X-Forwarded-Proto": proto})["scheme"] == scheme


def test_parse_forwarded_and_node() -> None:
    assert parse_forwarded('for=a;BY="b\\"c", host=h') == [
        {"for": "a", "by": 'b"c'},
        {"host": "h"},
    ]
    assert parse_forwarded("") == []
    assert parse_forwarded("for=a;") is None
    assert parse_forwarded('for="a\x01b"') is None  # a control character
    assert parse_node("192.0.2.1:80") == ("192.0.2.1", 80)
    assert parse_node("[::1]") == ("::1", 0)
    assert parse_node("[::1]:_x") == ("::1", 0)
    for node in ("", "unknown", "_x", "[::1]:", "[::1]:²", "1.2.3.4:-1", "[::1]:123456"):
        assert parse_node(node) is None, node


def test_invalid_mode() -> None:
    with pytest.raises(ValueError, match="proxy_headers_mode"):
        ProxyHeaders(["127.0.0.1"], "both")
