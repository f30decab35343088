"""Proxy headers: X-Forwarded-For/Proto from trusted peers set the scope's client and scheme."""

from __future__ import annotations

import httpx
import pytest

from fulmen.middleware.proxy_headers import ProxyHeaders, TrustedHosts
from tests.conftest import TIMEOUT


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
