"""Slow and stalled clients over real sockets: a body that stops or trickles ends with 408
(`--timeout-request-body`), a client that reads nothing of its response is dropped
(`--timeout-send`), while a slow application and a slow but steady reader are left alone.
Over both parsers and both loops; short timeouts (1 s) keep the tests quick."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
from hyperframe.frame import DataFrame, SettingsFrame, WindowUpdateFrame

from tests.conftest import TIMEOUT
from tests.protocols.h2peer import (
    CANCEL,
    INITIAL_WINDOW_SIZE,
    LOOPS,
    MAX_WINDOW,
    open_peer,
)
from tests.protocols.http1_raw import in_loop, poll_until
from tests.protocols.test_websocket_handshake import handshake

pytestmark = pytest.mark.timeout(60)

SHORT = {"timeout_request_body": 1.0, "timeout_send": 1.0}


class Recorder:
    """An app's last `receive()` message and whether its task has ended."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.ended = threading.Event()

    def wait(self) -> list[dict[str, Any]]:
        assert self.ended.wait(TIMEOUT), "the app never ended"
        return self.messages


def reading(recorder: Recorder, delay: float = 0.0) -> Any:
    """Reads the whole body (after `delay` seconds of its own work), then answers its size."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.sleep(delay)
            size = 0
            while True:
                message = await receive()
                recorder.messages.append(message)
                if message["type"] != "http.request":
                    return
                size += len(message["body"])
                if not message["more_body"]:
                    break
            await send({"type": "http.response.start", "status": 200})
            await send({"type": "http.response.body", "body": str(size).encode()})
        finally:
            recorder.ended.set()

    return app


def read_all(sock: socket.socket) -> bytes:
    """What the server sends until it closes (a reset counts as the end)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def head(length: int) -> bytes:
    return b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % length


# The request body


def test_a_stalled_body_gets_408(serve) -> None:
    recorder = Recorder()
    with serve(reading(recorder), **SHORT) as srv, srv.connect() as sock:
        began = time.monotonic()
        sock.sendall(head(1_000_000) + b"x" * 10)  # then nothing more
        data = read_all(sock)
        elapsed = time.monotonic() - began
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert b"\r\nconnection: close\r\n" in data
    assert recorder.wait()[-1] == {"type": "http.disconnect"}
    assert 1.0 <= elapsed < 4.0, elapsed  # the timeout, plus up to two ticks


def test_a_trickled_body_gets_408(serve) -> None:
    """A byte every 0.2 s never leaves the connection idle for the timeout, but comes far
    below the minimum rate: cut once the timeout has passed."""
    recorder = Recorder()
    with serve(reading(recorder), **SHORT) as srv, srv.connect() as sock:
        sock.sendall(head(1_000_000))
        sock.setblocking(False)
        began = time.monotonic()
        data = b""
        while time.monotonic() - began < TIMEOUT:
            try:
                sock.send(b"x")
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.2)
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - began
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]
    assert recorder.wait()[-1] == {"type": "http.disconnect"}
    assert 1.0 <= elapsed < 5.0, elapsed


def test_a_pause_while_the_app_works_is_not_the_clients_fault(serve) -> None:
    """The client pauses 2 s in its body while the app works 2.5 s before it reads: only the
    time the app waits in `receive()` counts against the client, so it is not cut off."""
    recorder = Recorder()
    with serve(reading(recorder, delay=2.5), **SHORT) as srv, srv.connect() as sock:
        sock.sendall(head(2000) + b"a" * 1000)
        time.sleep(2.0)  # the client's own pause, which the test is about
        sock.sendall(b"b" * 1000)
        data = read_all_until(sock, b"\r\n\r\n2000")
    assert data.startswith(b"HTTP/1.1 200 "), data[:80]


def test_a_body_sent_steadily_is_not_cut(serve) -> None:
    """8 KiB every 0.1 s for 2.5 s (80 KiB/s) while the app waits for it: well above the
    minimum rate."""
    recorder = Recorder()
    chunks = 25
    with serve(reading(recorder), **SHORT) as srv, srv.connect() as sock:
        sock.sendall(head(chunks * 8192))
        for _ in range(chunks):
            sock.sendall(b"z" * 8192)
            time.sleep(0.1)
        data = read_all_until(sock, b"\r\n\r\n%d" % (chunks * 8192))
    assert data.startswith(b"HTTP/1.1 200 "), data[:80]


def read_all_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while not data.endswith(end) and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# The response


def sending(recorder: Recorder, size: int) -> Any:
    """Sends `size` bytes in 64 KiB messages; records whether it saw the client leave."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": 200})
            chunk = b"r" * 65536
            for _ in range(size // len(chunk)):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            recorder.messages.append(await receive())
        finally:
            recorder.ended.set()

    return app


def small_buffer_client(srv: Any) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", srv.port))
    return sock


def test_a_client_that_reads_nothing_is_dropped(serve) -> None:
    """The response is far larger than the socket buffers: once the write buffer stays full
    for the timeout, the connection is dropped and the app's sends end."""
    recorder = Recorder()
    with serve(sending(recorder, 64 << 20), **SHORT) as srv, small_buffer_client(srv) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        began = time.monotonic()
        assert recorder.wait() == [{"type": "http.disconnect"}]
        elapsed = time.monotonic() - began
        state = srv.server.state
        poll_until(lambda: not in_loop(srv, lambda: len(state.connections)), "still open")
    assert elapsed < 5.0, elapsed


def test_a_slow_steady_reader_gets_the_whole_response(serve) -> None:
    """4 MiB read 32 KiB at a time every 20 ms: slower than the server writes, for longer
    than the timeout, but never stalled for it."""
    recorder = Recorder()
    size = 4 << 20
    with serve(sending(recorder, size), **SHORT) as srv, small_buffer_client(srv) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        received = 0
        began = time.monotonic()
        while time.monotonic() - began < 3 * TIMEOUT:
            chunk = sock.recv(32768)
            if not chunk:
                break
            received += len(chunk)
            if received >= size and b"0\r\n\r\n" in chunk[-5:]:
                break
            time.sleep(0.02)
        elapsed = time.monotonic() - began
    assert received > size
    assert elapsed > 1.5, elapsed  # it did take longer than the timeout


# WebSockets


def test_a_websocket_peer_that_reads_nothing_is_dropped(serve_ws) -> None:
    """The app sends 1 MiB messages to a peer that never reads: once nothing has moved for
    the timeout, the connection is dropped and the app sees the abnormal close (1006)."""
    recorder = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await receive()
            await send({"type": "websocket.accept"})
            for _ in range(1000):
                await send({"type": "websocket.send", "bytes": b"w" * (1 << 20)})
            recorder.messages.append({"type": "sent everything"})
        except OSError:  # ASGI spec 2.4: a send to a closed WebSocket
            recorder.messages.append(await receive())
        finally:
            recorder.ended.set()

    with serve_ws(app, **SHORT) as srv, small_buffer_client(srv) as sock:
        sock.sendall(handshake())
        assert sock.recv(12) == b"HTTP/1.1 101"  # then nothing is read
        messages = recorder.wait()
    assert messages[-1]["type"] == "websocket.disconnect"
    assert messages[-1]["code"] == 1006


# HTTP/2: per stream, the connection lives on


@LOOPS
def test_an_http2_body_that_stalls_gets_408_on_its_stream(server, loop: str) -> None:
    srv, app = server(loop=loop, **SHORT)
    peer = open_peer(srv)
    peer.send(peer.req(1, "/echo", b"POST", end=False), DataFrame(1, b"abc"))  # then nothing
    assert peer.response(1)[0] == 408
    assert app.gone.wait(TIMEOUT)  # the app saw http.disconnect
    peer.send(peer.req(3))
    assert peer.response(3) == (200, b"")


@LOOPS
def test_an_http2_stream_given_no_window_is_reset(server, loop: str) -> None:
    """1 MiB to a client that never sends WINDOW_UPDATE: after the timeout the stream is
    reset (CANCEL); the next stream is served on the same connection."""
    srv, _ = server(loop=loop, **SHORT)
    peer = open_peer(srv)
    peer.send(peer.req(1, "/big?1048576"))
    assert peer.read_until(lambda frames: bool(peer.resets()), timeout=TIMEOUT)
    assert peer.resets() == {1: CANCEL}
    peer.send(peer.req(3))
    assert peer.response(3) == (200, b"")


# Under load


def test_two_thousand_stalled_bodies_do_not_hold_the_server(serve_one) -> None:
    """2,000 clients stall in their bodies at once: a normal client is still served quickly
    (p99 under 50 ms), and after the timeout every stalled one has its 408 and its app task
    has ended."""
    recorder = Recorder()
    app = reading(recorder)
    with serve_one(app, loop="uvloop", timeout_request_body=2.0) as srv:
        stalled = []
        for _ in range(2000):
            sock = srv.connect()
            sock.sendall(head(1_000_000) + b"x")
            stalled.append(sock)
        state = srv.server.state
        poll_until(lambda: in_loop(srv, lambda: len(state.tasks)) == 2000, "not all waiting")
        latencies = []
        with srv.connect() as sock:
            for _ in range(200):
                began = time.perf_counter()
                sock.sendall(head(2) + b"ok")
                assert read_all_until(sock, b"\r\n\r\n2").startswith(b"HTTP/1.1 200 ")
                latencies.append(time.perf_counter() - began)
        latencies.sort()
        assert latencies[197] < 0.05, latencies[-5:]  # the 99th percentile of 200
        answers = [read_all(sock)[:13] for sock in stalled]
        assert answers == [b"HTTP/1.1 408 "] * 2000
        poll_until(lambda: not in_loop(srv, lambda: len(state.tasks)), "app tasks left")
        for sock in stalled:
            sock.close()
        poll_until(lambda: not in_loop(srv, lambda: len(state.connections)), "connections left")


@LOOPS
def test_an_http2_client_that_reads_nothing_is_dropped(server, loop: str) -> None:
    """The client grants all the window it can, then reads nothing: once the socket's write
    buffer has stayed full for the timeout, the connection is dropped."""
    srv, _ = server(loop=loop, **SHORT)
    peer = open_peer(srv, rcvbuf=16384)
    peer.send(
        SettingsFrame(0, settings={INITIAL_WINDOW_SIZE: MAX_WINDOW}),
        WindowUpdateFrame(0, MAX_WINDOW - 65535),
        peer.req(1, "/big?268435456"),  # 256 MiB, far more than the socket buffers
    )
    state = srv.server.state
    poll_until(lambda: in_loop(srv, lambda: len(state.tasks)) == 1, "not started")
    began = time.monotonic()
    poll_until(lambda: not in_loop(srv, lambda: len(state.connections)), "still open")
    assert time.monotonic() - began < 5.0
