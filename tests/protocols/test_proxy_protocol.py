"""`--proxy-protocol`: PROXY protocol v1/v2 headers over real sockets, and behind real HAProxy."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import time
from typing import Any

import pytest
import trustme

from fulmen.protocols.proxy_protocol import ProxyProtocolError, parse
from tests.conftest import TIMEOUT, recv_until_closed
from tests.helpers import Fulmen, clean_env

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def client_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers (HTTP or WebSocket) with the scope's client and server as JSON."""
    body = json.dumps(
        {"client": scope["client"], "server": scope["server"], "scheme": scope["scheme"]}
    )
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": body})
        await send({"type": "websocket.close"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"") -> bytes:
    block = addresses + tlvs
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(block)) + block


def v2_inet(src: str, sport: int, tlvs: bytes = b"") -> bytes:
    addresses = (
        socket.inet_aton(src) + socket.inet_aton("192.0.2.2") + struct.pack("!HH", sport, 443)
    )
    return v2(addresses=addresses, tlvs=tlvs)


def v2_inet6(src: str, sport: int) -> bytes:
    addresses = (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, "2001:db8::2")
        + struct.pack("!HH", sport, 443)
    )
    return v2(family=0x21, addresses=addresses)


def _text_frame(response: bytes) -> bytes | None:
    """The first WebSocket frame's payload after the 101 head, once complete."""
    _, sep, frames = response.partition(b"\r\n\r\n")
    if not sep or len(frames) < 2 or len(frames) < 2 + frames[1]:
        return None
    assert frames[0] == 0x81  # a final text frame, unmasked, with a short length
    return frames[2 : 2 + frames[1]]


def exchange(srv: Any, *chunks: bytes) -> bytes:
    with srv.connect() as sock:
        for chunk in chunks:
            sock.sendall(chunk)
        return recv_until_closed(sock)


def answer(srv: Any, *chunks: bytes) -> dict[str, Any]:
    response = exchange(srv, *chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    result: dict[str, Any] = json.loads(body)
    return result


def test_v1_tcp4(serve: Any) -> None:
    with serve(client_app, proxy_protocol=True) as srv:
        got = answer(srv, b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n" + REQUEST)
    assert got["client"] == ["192.0.2.1", 56324]
    assert got["server"] == ["127.0.0.1", srv.port]  # the socket fulmen listens on


def test_v1_tcp6_split_across_sends(serve_one: Any) -> None:
    header = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\n"
    with serve_one(client_app, proxy_protocol=True) as srv, srv.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(header), 7):
            sock.sendall(header[i : i + 7])
        sock.sendall(REQUEST)
        response = recv_until_closed(sock)
    assert json.loads(response.partition(b"\r\n\r\n")[2])["client"] == ["2001:db8::1", 4000]


def test_v1_unknown_keeps_the_real_peer(serve_one: Any) -> None:
    with serve_one(client_app, proxy_protocol=True) as srv:
        got = answer(srv, b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n" + REQUEST)
    assert got["client"][0] == "127.0.0.1"


def test_v2_tcp4_with_tlvs(serve: Any) -> None:
    tlvs = b"\x01\x00\x08http/1.1" + b"\x05\x00\x03abc"  # ALPN, unique id: skipped
    with serve(client_app, proxy_protocol=True) as srv:
        got = answer(srv, v2_inet("198.51.100.7", 1234, tlvs) + REQUEST)
    assert got["client"] == ["198.51.100.7", 1234]


def test_v2_tcp6_split(serve_one: Any) -> None:
    header = v2_inet6("2001:db8::7", 9)
    with serve_one(client_app, proxy_protocol=True, loop="uvloop") as srv:
        got = answer(srv, header[:5], header[5:20], header[20:], REQUEST)
    assert got["client"] == ["2001:db8::7", 9]


def test_v2_local_keeps_the_real_peer(serve_one: Any) -> None:
    with serve_one(client_app, proxy_protocol=True) as srv:
        got = answer(srv, v2(command=0, family=0) + REQUEST)
    assert got["client"][0] == "127.0.0.1"


def test_v2_unix_and_unspec(serve_one: Any) -> None:
    unix = v2(family=0x31, addresses=b"/run/client.sock".ljust(108, b"\0") + bytes(108))
    with serve_one(client_app, proxy_protocol=True) as srv:
        assert answer(srv, unix + REQUEST)["client"] is None  # no (host, port) to give
        assert answer(srv, v2(family=0x00) + REQUEST)["client"][0] == "127.0.0.1"


def test_websocket_scope_has_the_proxied_client(serve_one: Any) -> None:
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with serve_one(client_app, proxy_protocol=True) as srv, srv.connect() as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.5 192.0.2.2 777 80\r\n" + handshake)
        response = b""
        while not _text_frame(response):  # the server then waits for our close frame
            data = sock.recv(65536)
            assert data, response
            response += data
    assert response.startswith(b"HTTP/1.1 101")
    text = _text_frame(response)
    assert text is not None
    assert json.loads(text)["client"] == ["203.0.113.5", 777]


def test_forwarded_headers_trusted_only_from_a_trusted_proxied_client(serve_one: Any) -> None:
    xff = b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.9.9.9\r\nConnection: close\r\n\r\n"
    with serve_one(client_app, proxy_protocol=True) as srv:
        untrusted = answer(srv, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n" + xff)
        trusted = answer(srv, b"PROXY TCP4 127.0.0.1 192.0.2.2 1 2\r\n" + xff)
    assert untrusted["client"] == ["192.0.2.1", 1]  # the client cannot claim another address
    assert trusted["client"] == ["10.9.9.9", 0]


BAD_HEADERS = [
    pytest.param(REQUEST, id="missing"),
    pytest.param(b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", id="v1-protocol"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n", id="v1-fields"),
    pytest.param(b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", id="v1-family"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", id="v1-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", id="v1-leading-zero"),
    pytest.param(b"PROXY TCP4 " + b"1" * 120, id="v1-too-long"),
    pytest.param(b"PROXX", id="v1-prefix"),
    pytest.param(SIG[:6] + b"X", id="v2-signature"),
    pytest.param(SIG + b"\x12\x11\x00\x00", id="v2-version"),
    pytest.param(SIG + b"\x22\x11\x00\x00", id="v2-command"),
    pytest.param(v2(family=0x12, addresses=bytes(12)), id="v2-dgram"),
    pytest.param(v2(family=0x11, addresses=bytes(8)), id="v2-short-block"),
    pytest.param(v2(family=0x41, addresses=bytes(12)), id="v2-family"),
    pytest.param(v2_inet("1.2.3.4", 1, b"\x01\x00\x09abc"), id="v2-tlv-overrun"),
    pytest.param(v2_inet("1.2.3.4", 1, b"\x01\x00"), id="v2-tlv-truncated"),
]


@pytest.mark.parametrize("header", BAD_HEADERS)
def test_bad_headers_close_without_a_response(serve_one: Any, header: bytes) -> None:
    with serve_one(client_app, proxy_protocol=True) as srv:
        assert exchange(srv, header + REQUEST) == b""
        # The server goes on serving others.
        assert answer(srv, b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n" + REQUEST)["client"]


def test_untrusted_peer_is_closed_at_once(serve: Any) -> None:
    options = {"proxy_protocol": True, "forwarded_allow_ips": "192.0.2.9"}
    with serve(client_app, **options) as srv, srv.connect() as sock:
        assert recv_until_closed(sock) == b""  # closed before anything was sent
    assert any("untrusted peer" in m for m in srv.messages())


def test_header_timeout(serve_one: Any) -> None:
    options = {"proxy_protocol": True, "timeout_request_header": 0.5}
    with serve_one(client_app, **options) as srv, srv.connect() as sock:
        sock.sendall(b"PROXY TCP4 1.2.3.4")
        started = time.monotonic()
        assert recv_until_closed(sock) == b""
        assert 0.4 <= time.monotonic() - started < TIMEOUT
    assert any("timed out" in m for m in srv.messages())


def test_eof_before_the_header(serve_one: Any) -> None:
    with serve_one(client_app, proxy_protocol=True) as srv, srv.connect() as sock:
        sock.sendall(b"PROXY ")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b""
    assert any("before the PROXY protocol header" in m for m in srv.messages())


def test_shutdown_closes_a_pending_header(serve_one: Any) -> None:
    with serve_one(client_app, proxy_protocol=True, timeout_request_header=60) as srv:
        sock = srv.connect()
        with sock:
            sock.sendall(b"PROXY TCP4 ")
            answer(srv, b"PROXY UNKNOWN\r\n" + REQUEST)  # the first connection was accepted
            started = time.monotonic()
            srv.server.should_exit = True
            assert recv_until_closed(sock) == b""
            assert time.monotonic() - started < TIMEOUT / 2  # not the 30 s graceful timeout


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n",
        b"PROXY TCP6 ::1 ::2 1 65535\r\n",
        b"PROXY UNKNOWN\r\n",
        v2_inet("192.0.2.1", 1, b"\x04\x00\x00"),
        v2_inet6("::1", 2),
        v2(command=0, family=0),
    ],
)
def test_parse_needs_every_byte(header: bytes) -> None:
    for size in range(len(header)):
        assert parse(header[:size]) is None
    parsed = parse(header + b"rest")
    assert parsed is not None and parsed[1] == len(header)


def test_parse_rejects_plain_http() -> None:
    with pytest.raises(ProxyProtocolError):
        parse(b"G")


def test_off_by_default_plain_http(serve_one: Any) -> None:
    with serve_one(client_app) as srv:
        assert answer(srv, REQUEST)["client"][0] == "127.0.0.1"
        assert exchange(srv, b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n" + REQUEST).startswith(
            b"HTTP/1.1 400"
        )


HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")


def _tls_options(tmp_path: Any) -> tuple[str, ...]:
    cert = trustme.CA().issue_cert("localhost")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return f"--ssl-certfile={certfile}", f"--ssl-keyfile={keyfile}"


@pytest.mark.haproxy
@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_behind_haproxy_send_proxy_v2(tmp_path: Any, tls: bool) -> None:
    """HAProxy in TCP mode: the PROXY v2 header, then the client's bytes (or HAProxy's own TLS
    to fulmen: `ssl` on the server line, the header in clear before the handshake)."""
    assert HAPROXY is not None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        front = probe.getsockname()[1]
    env = clean_env(FULMEN_PROXY_PROTOCOL="true")
    options = _tls_options(tmp_path) if tls else ()
    app = "tests.protocols.test_proxy_protocol:client_app"
    with Fulmen(app, "--port=0", *options, env=env) as srv:
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            "global\n  maxconn 100\n"
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 10s\n"
            "  timeout server 10s\n"
            f"frontend front\n  bind 127.0.0.1:{front}\n  default_backend fulmen\n"
            f"backend fulmen\n  server f 127.0.0.1:{srv.port} send-proxy-v2"
            + (" ssl verify none\n" if tls else "\n")
        )
        haproxy = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            sock = _connect_when_listening(front)
            with sock:
                sock.sendall(REQUEST)
                response = recv_until_closed(sock)
                local_port = sock.getsockname()[1]
        finally:
            haproxy.terminate()
            haproxy.wait(TIMEOUT)
    got = json.loads(response.partition(b"\r\n\r\n")[2])
    # The client's own port, not HAProxy's outgoing one: the address came from the header.
    assert got["client"] == ["127.0.0.1", local_port]
    assert got["scheme"] == ("https" if tls else "http")


def _connect_when_listening(port: int) -> socket.socket:
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # HAProxy has no readiness signal on stdout with -db
