"""`--proxy-protocol` with TLS: the PROXY header in clear, then the TLS handshake, over real
sockets (in-process on both loops, and through the CLI over TCP and a Unix socket)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fulmen.protocols.proxy_tls import ProxyTLSListener
from tests.conftest import TIMEOUT, Certs, recv_until_closed, wss_first_message
from tests.helpers import Fulmen, clean_env
from tests.protocols.test_proxy_protocol import REQUEST, client_app, v2, v2_inet
from tests.test_tls import read_until_closed, tls_app

V1 = b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n"


@pytest.fixture(params=["asyncio", "uvloop"])
def serve_proxy_tls(
    request: pytest.FixtureRequest, serve_one: Callable[..., Any], certs: Certs
) -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """`with serve_proxy_tls(app, **options) as srv:` with both options on, per loop."""

    def start(app: Any, **options: Any) -> contextlib.AbstractContextManager[Any]:
        options.update(ssl_certfile=certs.cert, ssl_keyfile=certs.key, proxy_protocol=True)
        return serve_one(app, loop=request.param, **options)  # type: ignore[no-any-return]

    return start


@contextlib.contextmanager
def tls_after(sock: socket.socket, header: bytes, certs: Certs) -> Iterator[ssl.SSLSocket]:
    """Send the header, then run the TLS handshake on the same socket."""
    sock.sendall(header)
    with certs.context().wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        yield tls


def scope_after(sock: socket.socket, header: bytes, certs: Certs) -> dict[str, Any]:
    with tls_after(sock, header, certs) as tls:
        tls.sendall(REQUEST)
        response = read_until_closed(tls)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    result: dict[str, Any] = json.loads(body)
    return result


class MemoryTLS:
    """A TLS client over memory buffers, so the test decides how its bytes are cut into writes."""

    def __init__(self, sock: socket.socket, certs: Certs) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        context = certs.context()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def _pump(self, step: Callable[[], Any]) -> Any:
        for _ in range(100):  # a handshake takes a few round trips
            try:
                return step()
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                if not data:
                    self.incoming.write_eof()
                self.incoming.write(data)
        raise AssertionError("TLS exchange did not finish")

    def request(self, request: bytes) -> bytes:
        self._pump(self.tls.do_handshake)
        self.tls.write(request)
        self.sock.sendall(self.outgoing.read())
        response = b""
        with contextlib.suppress(ssl.SSLZeroReturnError, ssl.SSLEOFError):
            while chunk := self._pump(lambda: self.tls.read(65536)):
                response += chunk
        return response


@pytest.mark.parametrize("header", [V1, v2_inet("192.0.2.1", 56324)], ids=["v1", "v2"])
def test_client_from_the_header_scheme_https(serve_proxy_tls, certs, header) -> None:
    with serve_proxy_tls(client_app) as srv, srv.connect() as sock:
        got = scope_after(sock, header, certs)
    assert got["client"] == ["192.0.2.1", 56324]
    assert got["scheme"] == "https"
    assert got["server"] == ["127.0.0.1", srv.port]


@pytest.mark.parametrize("header", [V1, v2_inet("192.0.2.1", 56324)], ids=["v1", "v2"])
def test_header_and_client_hello_in_one_segment(serve_proxy_tls, certs, header) -> None:
    """The header and the start of the handshake arrive in one read: none of the TLS bytes may
    be taken with the header."""
    with serve_proxy_tls(client_app) as srv, srv.connect() as sock:
        client = MemoryTLS(sock, certs)
        sock.sendall(header + client.client_hello())
        response = client.request(REQUEST)
    assert response.startswith(b"HTTP/1.1 200"), response
    assert json.loads(response.partition(b"\r\n\r\n")[2])["client"] == ["192.0.2.1", 56324]


def test_header_sent_a_byte_at_a_time(serve_proxy_tls, certs) -> None:
    header = v2_inet("192.0.2.7", 9)
    with serve_proxy_tls(client_app, backlog=1) as srv, srv.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in header[:-1]:
            sock.sendall(bytes([byte]))
        assert scope_after(sock, header[-1:], certs)["client"] == ["192.0.2.7", 9]


def test_local_command_keeps_the_real_peer(serve_proxy_tls, certs) -> None:
    with serve_proxy_tls(client_app) as srv, srv.connect() as sock:
        local = sock.getsockname()
        got = scope_after(sock, v2(command=0, family=0), certs)
    assert got["client"] == [local[0], local[1]]


def test_websocket_is_wss_with_the_proxied_client(serve_proxy_tls, certs) -> None:
    with serve_proxy_tls(client_app) as srv, srv.connect() as sock:
        sock.sendall(V1)
        uri = f"wss://127.0.0.1:{srv.port}/"
        got = json.loads(wss_first_message(uri, certs.context(), sock))
    assert got["client"] == ["192.0.2.1", 56324]
    assert got["scheme"] == "wss"


def test_bad_header_closes_before_any_tls(serve_proxy_tls, certs) -> None:
    with serve_proxy_tls(client_app) as srv:
        with srv.connect() as sock:
            sock.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello without a header
            assert recv_until_closed(sock) == b""
        with srv.connect() as sock:  # the server goes on serving others
            assert scope_after(sock, V1, certs)["client"][0] == "192.0.2.1"
    assert any("no PROXY protocol header" in m for m in srv.messages())


def test_untrusted_peer_is_closed_at_once(serve_proxy_tls) -> None:
    options = {"forwarded_allow_ips": "192.0.2.9"}
    with serve_proxy_tls(client_app, **options) as srv, srv.connect() as sock:
        assert recv_until_closed(sock) == b""
    assert any("untrusted peer" in m for m in srv.messages())


def test_header_timeout(serve_proxy_tls) -> None:
    with serve_proxy_tls(client_app, timeout_request_header=0.5) as srv, srv.connect() as sock:
        sock.sendall(b"PROXY TCP4 1.2.3.4")
        assert recv_until_closed(sock) == b""
    assert any("PROXY protocol header timed out" in m for m in srv.messages())


def test_eof_before_the_header(serve_proxy_tls) -> None:
    with serve_proxy_tls(client_app) as srv, srv.connect() as sock:
        sock.sendall(b"PROXY ")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_closed(sock) == b""
    assert any("before the PROXY protocol header was complete" in m for m in srv.messages())


def test_failed_handshake_is_logged_and_closed(serve_proxy_tls, certs) -> None:
    with serve_proxy_tls(client_app) as srv:
        with srv.connect() as sock:
            sock.sendall(V1 + REQUEST)  # plain HTTP where TLS should start
            with contextlib.suppress(ConnectionResetError):
                recv_until_closed(sock)
        with srv.connect() as sock:
            assert scope_after(sock, V1, certs)["scheme"] == "https"
    assert any("TLS handshake failed" in m for m in srv.messages())


def test_shutdown_closes_a_pending_header(serve_proxy_tls, certs) -> None:
    with serve_proxy_tls(client_app, timeout_request_header=60) as srv, srv.connect() as sock:
        sock.sendall(b"PROXY TCP4 ")
        with srv.connect() as other:  # the first connection was accepted by now
            scope_after(other, V1, certs)
        srv.server.should_exit = True
        assert recv_until_closed(sock) == b""


def test_the_listener_as_an_asyncio_server(serve_proxy_tls) -> None:
    with serve_proxy_tls(client_app) as srv:
        listener = srv.server.servers[0]
        assert isinstance(listener, ProxyTLSListener)
        loop = listener.get_loop()
        assert listener.is_serving()
        assert listener.sockets[0].getsockname()[1] == srv.port
        asyncio.run_coroutine_threadsafe(listener.start_serving(), loop).result(TIMEOUT)
        forever = asyncio.run_coroutine_threadsafe(listener.serve_forever(), loop)
        srv.server.should_exit = True
        forever.result(TIMEOUT)  # returns once the shutdown closed the listener
        assert not listener.is_serving()
    listener.close()  # again: nothing to do


class FailingOnce:
    """A listening socket whose next accept() fails as when out of file descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.failed = False

    def accept(self) -> tuple[socket.socket, Any]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_accept_out_of_descriptors_pauses_then_resumes(serve_proxy_tls, certs) -> None:
    with serve_proxy_tls(client_app) as srv:
        listener = srv.server.servers[0]
        listener.sock = FailingOnce(listener.sock)
        with srv.connect() as sock:  # waits out the one-second pause, then is served
            assert scope_after(sock, V1, certs)["client"][0] == "192.0.2.1"
    assert any("socket.accept() failed" in m for m in srv.messages())


def test_reset_before_the_header(serve_proxy_tls) -> None:
    """asyncio reports the reset at once. libuv reports a reset socket to uvloop's `add_reader`
    as neither readable nor writable, so under uvloop the header timeout ends it, unless the
    reset came in before the bytes were read (then the next read reports it)."""
    with serve_proxy_tls(client_app, timeout_request_header=0.5) as srv:
        sock = srv.connect()
        sock.sendall(b"PROXY TCP4 ")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, not a FIN
        reasons = ["connection failed"]
        if srv.server.config.loop == "uvloop":
            reasons.append("timed out")
        deadline = time.monotonic() + TIMEOUT
        while srv.server.state.connections or not any(
            reason in m for m in srv.messages() for reason in reasons
        ):
            assert time.monotonic() < deadline, srv.messages()
            time.sleep(0.02)  # nothing to await: the server thread logs and forgets it


def test_shutdown_waits_for_a_handshake_at_most_its_timeout(serve_proxy_tls) -> None:
    with serve_proxy_tls(client_app, timeout_tls_handshake=0.5) as srv, srv.connect() as sock:
        sock.sendall(V1)  # then no ClientHello: the handshake waits
        with srv.connect() as other:  # the header was read by the time this one is answered
            other.sendall(b"PROXY ")
            other.shutdown(socket.SHUT_WR)
            recv_until_closed(other)
        started = time.monotonic()
        srv.server.should_exit = True
        assert recv_until_closed(sock) == b""
        assert time.monotonic() - started < TIMEOUT / 2


def test_through_the_cli_over_tcp_and_a_unix_socket(certs, tmp_path) -> None:
    path = str(tmp_path / "f.sock")
    options = (f"--ssl-certfile={certs.cert}", f"--ssl-keyfile={certs.key}", "--proxy-protocol")
    env = clean_env(FULMEN_FORWARDED_ALLOW_IPS="127.0.0.1,unix:")
    app = "tests.protocols.test_proxy_protocol:client_app"
    with Fulmen(app, "--port=0", *options, env=env) as srv:
        assert srv.url.startswith("https://")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
            assert scope_after(sock, V1, certs)["client"] == ["192.0.2.1", 56324]
    with Fulmen(app, f"--uds={path}", *options, env=env), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        assert scope_after(sock, V1, certs)["client"] == ["192.0.2.1", 56324]


def test_tls_extension_after_the_header(serve_proxy_tls, certs) -> None:
    """The ASGI `tls` extension describes the handshake made after the PROXY header."""
    with (
        serve_proxy_tls(tls_app) as srv,
        srv.connect() as sock,
        tls_after(sock, V1, certs) as tls,
    ):
        tls.sendall(REQUEST)
        response = read_until_closed(tls)
    body = json.loads(response.partition(b"\r\n\r\n")[2])
    assert body["tls_version"] == 0x0304
    assert body["client_cert_chain"] == []
