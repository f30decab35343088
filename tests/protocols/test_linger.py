"""Lingering close: an error response to a client still sending its body reaches the client
(it reads the status, not a reset), and the half-closed connection is closed once the client
closes, or at the bounds in bytes and time. Over both parsers and both loops."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from fulmen.protocols import linger
from tests.conftest import TIMEOUT
from tests.protocols.http1_raw import in_loop, poll_until

pytestmark = pytest.mark.timeout(60)

CHUNK = b"x" * 65536


async def echo(scope: Any, receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body", "body": body})


def _upload(port: int, size: int, stop_after: int | None = None) -> tuple[bytes, str | None, bool]:
    """Send a request declaring `size` body bytes, sending (up to `stop_after` of them) while
    reading: what came back, the error if any, and whether the server closed (EOF)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.sendall(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % size)
    sock.setblocking(False)
    received, sent, closed = b"", 0, False
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and not closed:
            if stop_after is None or sent < stop_after:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(CHUNK)
            try:
                data = sock.recv(65536)
                closed = not data
                received += data
            except BlockingIOError:
                time.sleep(0.001)
    except OSError as exc:
        return received, repr(exc), closed
    finally:
        sock.close()
    return received, None, closed


def test_413_reaches_a_client_still_sending(serve) -> None:
    with serve(echo, limit_request_body=1000) as srv:
        for _ in range(3):
            received, error, closed = _upload(srv.port, 50_000_000)
            assert received.startswith(b"HTTP/1.1 413 "), (received[:60], error)
            assert error is None and closed  # past the byte bound: closed, not reset
        assert httpx.get(srv.url, timeout=TIMEOUT).status_code == 200


def test_lingering_connection_closes_when_the_client_stops(serve_one, monkeypatch) -> None:
    """A client that stops sending and never closes is closed at the time bound."""
    monkeypatch.setattr(linger, "LINGER_SECONDS", 0.5)
    with serve_one(echo, limit_request_body=1000) as srv:
        started = time.monotonic()
        received, error, closed = _upload(srv.port, 10_000_000, stop_after=200_000)
        assert received.startswith(b"HTTP/1.1 413 ")
        assert error is None and closed
        assert time.monotonic() - started < TIMEOUT


def test_lingering_ends_at_the_client_close(serve_one, monkeypatch) -> None:
    """A half-closed connection ends as soon as the client closes its side too, long before
    the time bound."""
    monkeypatch.setattr(linger, "LINGER_SECONDS", 30.0)
    lost = threading.Event()
    original = linger.Lingering.connection_lost

    def connection_lost(self: linger.Lingering, exc: Exception | None) -> None:
        original(self, exc)
        lost.set()

    monkeypatch.setattr(linger.Lingering, "connection_lost", connection_lost)
    with serve_one(echo, limit_request_body=10) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
        sock.sendall(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n" + b"y" * 100)
        received = b""
        while data := sock.recv(65536):  # the response, then the server's FIN
            received += data
        assert received.startswith(b"HTTP/1.1 413 ")
        assert not lost.is_set()  # half-closed: the server still reads
        sock.close()
        assert lost.wait(TIMEOUT)


async def answers_unread(scope: Any, receive: Any, send: Any) -> None:
    """Answers at once, reading none of the body (as an app refusing an upload does)."""
    await send({"type": "http.response.start", "status": 403})
    await send({"type": "http.response.body", "body": b"no"})


def test_a_response_before_the_body_reaches_a_client_still_sending(serve) -> None:
    """The app answers before the body has arrived: the connection closes (its unread body
    cannot be skipped), lingering, so the client reads the 403 instead of a reset."""
    with serve(answers_unread) as srv:
        for _ in range(3):
            received, error, closed = _upload(srv.port, 50_000_000)
            assert received.startswith(b"HTTP/1.1 403 "), (received[:60], error)
            assert error is None and closed


async def hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body", "body": b"hello"})


def test_an_idle_connection_closed_at_the_keep_alive_timeout_lingers(serve_one) -> None:
    """The keep-alive timeout closes by half-closing: a request the client sends as it
    happens is not answered with a reset; the connection ends when the client closes."""
    with serve_one(hello, timeout_keep_alive=1) as srv:
        state = srv.server.state
        with srv.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            assert sock.recv(4096) == b""  # the server's FIN, after the timeout
            sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")  # read and dropped
            kinds = in_loop(srv, lambda: [type(c) for c in state.connections])
            assert kinds == [linger.Lingering]  # until the client closes
        poll_until(lambda: not in_loop(srv, lambda: len(state.connections)), "still open")


class _ResetTransport:
    """A transport whose client has reset the connection between the last read and the
    close (a race a test cannot time over a socket): `write_eof` fails with ENOTCONN."""

    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        raise OSError(107, "Transport endpoint is not connected")

    def abort(self) -> None:
        self.aborted = True


def test_a_connection_reset_before_the_half_close_is_aborted() -> None:
    transport = _ResetTransport()
    linger.linger(transport, None)  # type: ignore[arg-type]  # not reached: no Lingering
    assert transport.aborted
