"""Configured limits and timeouts: body size, head size in pieces, idle and stalled connections,
concurrency and the request budget, over both parsers and both loops."""

from __future__ import annotations

import asyncio
import logging
import selectors
import socket
import threading
import time

import pytest

from fulmen.protocols.parsers import Limits, ParseError, parser_class
from tests.conftest import TIMEOUT, recv_response, recv_until_closed
from tests.protocols.http1_raw import Reader, open_gate, request

# Body size


class BodyApp:
    """Reads the body, reporting each message's size; tells the test when the first arrived."""

    def __init__(self) -> None:
        self.calls = 0
        self.sizes: list[int] = []
        self.first_body = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            self.sizes.append(len(message["body"]))
            self.first_body.set()
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"%d" % sum(self.sizes)})


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def test_content_length_over_the_limit_is_413_before_the_app_runs(serve) -> None:
    app = BodyApp()
    with serve(app, limit_request_body=100) as srv:
        with srv.connect() as sock:
            sock.sendall(request("POST", body=b"x" * 101))
            response = recv_until_closed(sock)
        assert status_of(response) == 413, response[:200]
        assert b"connection: close" in response.lower()
        assert app.calls == 0
        with srv.connect() as sock:
            sock.sendall(request("POST", body=b"x" * 100))  # at the limit: served
            assert recv_response(sock).endswith(b"\r\n\r\n100")


def test_chunked_body_over_the_limit_ends_the_request(serve) -> None:
    """The app gets the chunks within the limit, never the one that passes it."""
    app = BodyApp()
    head = request("POST", headers=[("Transfer-Encoding", "chunked")])
    with serve(app, limit_request_body=100) as srv, srv.connect() as sock:
        sock.sendall(head + b"3c\r\n" + b"a" * 60 + b"\r\n")
        assert app.first_body.wait(TIMEOUT)
        sock.sendall(b"3c\r\n" + b"b" * 60 + b"\r\n0\r\n\r\n")
        response = recv_until_closed(sock)
    assert response == b"" or status_of(response) == 413, response[:200]
    assert sum(app.sizes) <= 100, app.sizes


# Head size, fed to the adapters in pieces (a socket may merge pieces; this cannot)

HOST = b"Host: example.test\r\n"
HEADS = {
    "many-headers": b"GET / HTTP/1.1\r\n"
    + HOST
    + b"".join(b"X-Filler-%03d: %s\r\n" % (i, b"v" * 86) for i in range(200))
    + b"\r\n",
    "giant-header": b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"v" * 20000 + b"\r\n\r\n",
    "long-request-line": b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
}
EXPECTED = {"many-headers": 431, "giant-header": 431, "long-request-line": 414}


class Callbacks:
    def __init__(self) -> None:
        self.requests = 0

    def on_request(self, method, target, version, headers) -> None:
        self.requests += 1

    def on_body(self, data: bytes) -> None:
        pass

    def on_message_complete(self) -> None:
        pass


@pytest.mark.parametrize("limits", [Limits(), Limits(1024, 4096)], ids=["default", "small"])
@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_head_limits_hold_whatever_the_pieces(
    parser: str, name: str, piece: int, limits: Limits
) -> None:
    callbacks = Callbacks()
    adapter = parser_class(parser)(callbacks, limits)
    raw = HEADS[name]
    fed = 0
    with pytest.raises(ParseError) as caught:
        for start in range(0, len(raw), piece):
            adapter.feed(raw[start : start + piece])
            fed = start + piece
    assert caught.value.status == EXPECTED[name]
    assert callbacks.requests == 0
    # Rejected as soon as the limit is passed, not only at the end of the head.
    assert fed <= limits.head + 2 * piece + 64 or piece > limits.head, fed


# Timeouts


def test_timeouts(serve) -> None:
    """An idle keep-alive connection, a silent one and a stalled head (slowloris) are closed
    once their timeout has passed, never before; a request the app is busy with is not."""
    timeout = 0.5
    gate = asyncio.Event()
    busy = threading.Event()

    async def app(scope, receive, send) -> None:
        if scope["path"] == "/busy":
            busy.set()
            await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    options = {"timeout_keep_alive": timeout, "timeout_request_header": timeout}
    with serve(app, **options) as srv:
        active = srv.connect()
        active.sendall(request(path="/busy"))
        assert busy.wait(TIMEOUT)
        idle, silent, stalled = srv.connect(), srv.connect(), srv.connect()
        try:
            idle.sendall(request())
            assert recv_response(idle).endswith(b"done")
            started = time.monotonic()  # idle from now; the other two since they connected
            stalled.sendall(b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Slow: ")
            closed_at, received = wait_for_eof([idle, silent, stalled])
            for sock in (idle, silent, stalled):
                assert timeout - 0.05 <= closed_at[sock] - started <= timeout + 2.5, closed_at
            assert received[idle] == received[silent] == b""
            assert status_of(received[stalled]) == 408, received[stalled][:200]
            # All three timed out: the busy request, older than any of them, is still there.
            assert not readable(active)
            open_gate(srv, gate)
            assert recv_response(active).endswith(b"done")
        finally:
            for sock in (active, idle, silent, stalled):
                sock.close()


def wait_for_eof(socks: list[socket.socket]) -> tuple[dict, dict]:
    """When each socket reached end of file, and what it received before."""
    selector = selectors.DefaultSelector()
    received = {sock: b"" for sock in socks}
    closed_at: dict = {}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(closed_at) < len(socks):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"still open: {set(socks) - set(closed_at)}"
            for key, _ in selector.select(remaining):
                sock = key.fileobj
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data:
                    received[sock] += data
                else:
                    closed_at[sock] = time.monotonic()
                    selector.unregister(sock)
    finally:
        selector.close()
    return closed_at, received


def readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(0))


# Concurrency


def test_limit_concurrency_answers_503_beyond_the_limit(serve) -> None:
    limit = 2
    gate = asyncio.Event()
    running = threading.Semaphore(0)

    async def app(scope, receive, send) -> None:
        running.release()
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    with serve(app, limit_concurrency=limit) as srv:
        busy = [srv.connect() for _ in range(limit)]
        try:
            for sock in busy:
                sock.sendall(request())
            for _ in busy:
                assert running.acquire(timeout=TIMEOUT)
            with srv.connect() as extra:
                extra.sendall(request())
                assert status_of(recv_response(extra)) == 503
            open_gate(srv, gate)
            for sock in busy:
                assert recv_response(sock).endswith(b"done")
        finally:
            for sock in busy:
                sock.close()


def test_limit_concurrency_one_serves_a_lone_request(serve) -> None:
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"alone"})

    with serve(app, limit_concurrency=1) as srv, srv.connect() as sock:
        for _ in range(2):  # and again on the same connection
            sock.sendall(request())
            response = recv_response(sock)
            assert status_of(response) == 200 and response.endswith(b"alone")


def test_limit_concurrency_counts_requests_not_idle_connections(serve) -> None:
    """The unit is a running request: idle keep-alive connections beyond the limit do not
    make the server refuse a request that is within it."""

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served"})

    with serve(app, limit_concurrency=1) as srv:
        idle = [srv.connect() for _ in range(3)]
        try:
            for sock in idle:  # each served once, then left open and idle
                sock.sendall(request())
                assert status_of(recv_response(sock)) == 200
            with srv.connect() as sock:
                sock.sendall(request())
                response = recv_response(sock)
                assert status_of(response) == 200 and response.endswith(b"served")
        finally:
            for sock in idle:
                sock.close()


# Request budget


class FinishedHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.finished = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Finished server process"):
            self.finished.set()


def test_limit_max_requests_serves_that_many_then_stops(serve) -> None:
    budget = 3

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    handler = FinishedHandler()
    logger = logging.getLogger("fulmen.error")
    with serve(app, limit_max_requests=budget) as srv:
        logger.addHandler(handler)
        try:
            with srv.connect() as sock:
                sock.sendall(b"".join(request(path=f"/{i}") for i in range(budget)))
                reader = Reader(sock)
                for i in range(budget):
                    response = reader.response()
                    assert response.status == 200 and response.body == f"/{i}".encode()
                assert reader.closed()
            assert handler.finished.wait(TIMEOUT), "the server did not stop by itself"
            assert srv.server.should_exit
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((srv.host, srv.port), timeout=TIMEOUT).close()
        finally:
            logger.removeHandler(handler)
