"""HTTP/1.1 connection behaviour over raw sockets: keep-alive, pipelining, framing, HTTP/1.0,
100-continue, bodiless responses, flow control both ways and `http.disconnect`.

Every test runs on both parsers and both loops (the `serve` fixture).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import select
import threading

import pytest

from tests.conftest import TIMEOUT, recv_until_closed
from tests.protocols.http1_raw import (
    Reader,
    echo_app,
    in_loop,
    open_gate,
    poll_until,
    read_body,
    request,
    respond,
    the_connection,
)


def no_data_yet(sock, wait: float = 0.2) -> bool:
    """Nothing arrives within `wait` seconds: the bounded check for something not sent."""
    readable, _, _ = select.select([sock], [], [], wait)
    return not readable


async def streaming_app(scope, receive, send) -> None:
    """Streams `hello`, an empty message and ` world` (more_body=True), then ends."""
    await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for part in (b"hello", b"", b" world"):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


# Keep-alive


def test_keep_alive_serves_two_requests_on_one_connection(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        for path in ("/first", "/second"):
            sock.sendall(request(path=path))
            response = reader.response()
            assert response.status == 200
            assert response.body == f"GET {path} ".encode()
            assert response.get("connection") is None


def test_client_connection_close_closes_after_response(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request(path="/bye", headers=[("Connection", "close")]))
        response = reader.response()
        assert response.body == b"GET /bye "
        assert response.get("connection") == "close"
        assert reader.closed()


def test_requests_pipelined_after_connection_close_are_not_served(serve) -> None:
    """RFC 9112 §9.6: nothing after a request with `Connection: close` reaches the app."""
    served: list[str] = []

    async def app(scope, receive, send) -> None:
        served.append(scope["path"])
        await respond(send, scope["path"].encode())

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(
            request(path="/first")
            + request(path="/bye", headers=[("Connection", "close")])
            + request(path="/never")
            + request(path="/nor-this")
        )
        assert reader.response().body == b"/first"
        last = reader.response()
        assert last.body == b"/bye" and last.get("connection") == "close"
        assert reader.closed()
    assert served == ["/first", "/bye"]


def test_response_headers_as_lists_are_served(serve) -> None:
    """ASGI headers are two-item iterables: lists (as some frameworks send) work like tuples,
    also for the headers the server acts on, and twice (they are never cached)."""

    async def app(scope, receive, send) -> None:
        headers = [[b"content-type", b"text/plain"], [b"content-length", b"4"], [b"x-a", b"1"]]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"list"})

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        for _ in range(2):
            sock.sendall(request())
            response = reader.response()
            assert response.status == 200 and response.body == b"list"
            assert response.get("x-a") == "1" and response.get("content-length") == "4"


def test_app_connection_close_closes_connection(serve) -> None:
    async def app(scope, receive, send) -> None:
        await respond(send, b"done", headers=[(b"connection", b"close")])

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request())
        response = reader.response()
        assert response.body == b"done"
        assert response.all("connection") == ["close"]
        assert reader.closed()


# Pipelining


def test_pipelined_requests_answered_in_order(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"".join(request(path=path) for path in ("/a", "/b", "/c")))
        bodies = [reader.response().body for _ in range(3)]
        assert bodies == [b"GET /a ", b"GET /b ", b"GET /c "]
        sock.sendall(request(path="/d"))
        assert reader.response().body == b"GET /d "


@pytest.mark.parametrize("body_first", [False, True], ids=["body-second", "body-first"])
def test_pipelined_request_with_body(serve, body_first: bool) -> None:
    requests = [request(path="/plain"), request("POST", "/posted", body=b"payload")]
    expected = [b"GET /plain ", b"POST /posted payload"]
    if body_first:
        requests.reverse()
        expected.reverse()
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"".join(requests) + request(path="/last"))
        assert [reader.response().body for _ in range(3)] == [*expected, b"GET /last "]


@pytest.mark.parametrize("second", ["GET", "POST"])
def test_request_sent_while_the_previous_app_finishes(serve, second: str) -> None:
    """The client has the whole response (its last Content-Length byte) and sends the next
    request before the app's final message: it is answered once that message is sent, as
    Starlette's BaseHTTPMiddleware and Flask (through WSGI) respond on every request."""
    gate = asyncio.Event()

    async def app(scope, receive, send) -> None:
        body = await read_body(receive)
        headers = [(b"content-length", b"%d" % (len(body) + 4))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"got " + body, "more_body": True})
        if scope["path"] == "/first":
            await gate.wait()
        await send({"type": "http.response.body", "body": b""})

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request(path="/first"))
        assert reader.response().body == b"got "  # whole, while the app still runs
        sock.sendall(request(second, "/second", body=b"payload" if second == "POST" else b""))
        assert no_data_yet(sock)  # in order: not before the first response completed
        open_gate(srv, gate)
        expected = b"got payload" if second == "POST" else b"got "
        assert reader.response().body == expected
        sock.sendall(request(path="/third"))
        assert reader.response().body == b"got "


def test_malformed_request_behind_valid_ones(serve) -> None:
    # The requests before the bad one are answered in order, then the connection closes.
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request(path="/a") + request(path="/b") + b"GARBAGE\r\n\r\n")
        assert [reader.response().body for _ in range(2)] == [b"GET /a ", b"GET /b "]
        assert recv_until_closed(sock) == b""


# Response framing


def test_whole_body_gets_content_length(serve) -> None:
    async def app(scope, receive, send) -> None:
        await respond(send, b"0123456789")

    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request())
        response = Reader(sock).response()
        assert response.get("content-length") == "10"
        assert response.get("transfer-encoding") is None
        assert response.body == b"0123456789"


def test_streamed_body_is_chunked(serve) -> None:
    with serve(streaming_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request() + request(path="/again"))
        response = reader.head()
        assert response.get("transfer-encoding") == "chunked"
        assert response.get("content-length") is None
        # Exact framing: no chunk for the empty message (a "0" chunk would end the body).
        expected = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        assert reader._take(len(expected)) == expected
        # The last chunk ended the body: the pipelined response follows right after.
        assert reader.response().chunks == [b"hello", b" world"]


def test_app_content_length_is_respected(serve) -> None:
    async def app(scope, receive, send) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"Content-Length", b"9")]}
        )
        await send({"type": "http.response.body", "body": b"abcd", "more_body": True})
        await send({"type": "http.response.body", "body": b"efghi"})

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request() + request())
        for _ in range(2):
            response = reader.response()
            assert response.all("content-length") == ["9"]
            assert response.get("transfer-encoding") is None
            assert response.body == b"abcdefghi"


def chunked_request(*chunks: bytes) -> bytes:
    return request("POST", "/upload", headers=[("Transfer-Encoding", "chunked")]) + b"".join(chunks)


def test_chunked_request_body_in_one_piece(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        data = chunked_request(
            b"5\r\nhello\r\n", b"a;name=value\r\n, chunked!\r\n", b"0\r\nX-Trailer: t\r\n\r\n"
        )
        sock.sendall(data + request(path="/next"))
        assert reader.response().body == b"POST /upload hello, chunked!"
        assert reader.response().body == b"GET /next "


def test_chunked_request_body_in_parts(serve) -> None:
    messages: list[dict] = []
    first = threading.Event()

    async def app(scope, receive, send) -> None:
        while True:
            message = await receive()
            messages.append(message)
            first.set()
            if not message.get("more_body"):
                break
        await respond(send, b"".join(m["body"] for m in messages))

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(chunked_request(b"5\r\nhello\r\n"))
        assert first.wait(TIMEOUT)
        assert messages[0] == {"type": "http.request", "body": b"hello", "more_body": True}
        sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
        assert reader.response().body == b"hello world"
        assert all(m["type"] == "http.request" for m in messages)
        assert [m["more_body"] for m in messages][-1] is False
        assert all(m["more_body"] for m in messages[:-1])


# HTTP/1.0


def test_http10_streamed_response_is_close_delimited(serve) -> None:
    with serve(streaming_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request(version="1.0", headers=[("Connection", "keep-alive")]))
        response = reader.head()
        assert response.get("transfer-encoding") is None
        assert response.get("content-length") is None
        assert response.get("connection") == "close"
        assert reader.until_closed() == b"hello world"


def test_http10_closes_by_default(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request(path="/old", version="1.0"))
        response = reader.response()
        assert response.body == b"GET /old "
        assert response.get("connection") == "close"
        assert reader.closed()


def test_http10_keep_alive_when_asked(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        for path in ("/one", "/two"):
            sock.sendall(request(path=path, version="1.0", headers=[("Connection", "keep-alive")]))
            response = reader.response()
            assert response.body == f"GET {path} ".encode()
            assert response.get("connection") == "keep-alive"


# Expect: 100-continue


def test_100_continue_sent_when_app_receives(serve) -> None:
    started = threading.Event()
    gate = asyncio.Event()

    async def app(scope, receive, send) -> None:
        started.set()
        await gate.wait()
        await respond(send, await read_body(receive))

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("POST", headers=[("Expect", "100-continue"), ("Content-Length", "5")]))
        try:
            assert started.wait(TIMEOUT)
            assert no_data_yet(sock), "100 Continue sent before the app asked for the body"
        finally:
            open_gate(srv, gate)
        interim = reader.head()
        assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert reader.response().body == b"hello"


def test_no_100_continue_when_app_answers_without_reading(serve) -> None:
    async def app(scope, receive, send) -> None:
        await respond(send, b"refused", status=413)

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("POST", headers=[("Expect", "100-continue"), ("Content-Length", "5")]))
        response = reader.response()
        assert response.status == 413
        assert response.body == b"refused"
        assert reader.closed()  # the unread body cannot be skipped: the connection ends


# Responses without a body


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_bodiless_response_has_no_body(serve, method: str, status: int) -> None:
    async def app(scope, receive, send) -> None:
        if scope["path"] == "/next":
            await respond(send, b"next")
            return
        # An app's Content-Length on a 204 is dropped (RFC 9110 §8.6); HEAD and 304 keep it.
        headers = [(b"content-length", b"5")] if status != 304 else []
        await respond(send, b"hello", status=status, headers=headers)

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request(method) + request(path="/next"))
        response = reader.head()
        assert response.status == status
        assert response.get("transfer-encoding") is None
        if status != 200:
            assert response.get("content-length") is None
        else:
            assert response.get("content-length") == "5"
        assert reader.buffer.startswith(b"HTTP/1.1 ") or not reader.buffer
        following = reader.response()
        assert following.status == 200
        assert following.body == b"next"


# Flow control


def test_large_request_body_to_slow_app(serve) -> None:
    size = 4 * 1024 * 1024
    payload = hashlib.sha256(b"seed").digest() * (size // 32)
    first_read = threading.Event()
    gate = asyncio.Event()

    async def app(scope, receive, send) -> None:
        message = await receive()
        digest = hashlib.sha256(message["body"])
        total = len(message["body"])
        first_read.set()
        await gate.wait()
        while message.get("more_body"):
            message = await receive()
            digest.update(message["body"])
            total += len(message["body"])
        await respond(send, b"%d %s" % (total, digest.hexdigest().encode()))

    with serve(app) as srv, srv.connect() as sock:
        sender = threading.Thread(
            target=sock.sendall, args=(request("POST", body=payload),), daemon=True
        )
        sender.start()
        try:
            assert first_read.wait(TIMEOUT)
            conn = the_connection(srv)
            poll_until(lambda: conn.flow.read_paused, "reading not paused for an idle app")
            buffered = in_loop(srv, lambda: len(conn.parsing.body))
            assert buffered < 1024 * 1024, f"{buffered} bytes buffered while the app does not read"
        finally:
            open_gate(srv, gate)
        response = Reader(sock).response()
        sender.join(TIMEOUT)
        assert not sender.is_alive()
        assert response.body == b"%d %s" % (size, hashlib.sha256(payload).hexdigest().encode())


def test_large_streamed_response_to_slow_client(serve) -> None:
    chunk_count, chunk_size = 256, 65536  # 16 MiB: more than the socket buffers hold
    done = threading.Event()

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for index in range(chunk_count):
            chunk = index.to_bytes(4, "big") * (chunk_size // 4)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        done.set()

    expected = hashlib.sha256()
    for index in range(chunk_count):
        expected.update(index.to_bytes(4, "big") * (chunk_size // 4))

    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request())
        conn = the_connection(srv)
        poll_until(lambda: conn.flow.write_paused, "the transport never paused writing")
        assert not done.wait(0.2), "the app finished while the client was not reading"
        response = Reader(sock).response()
        assert done.wait(TIMEOUT)
        assert len(response.body) == chunk_count * chunk_size
        assert hashlib.sha256(response.body).hexdigest() == expected.hexdigest()


# http.disconnect


@pytest.mark.parametrize("mid_body", [False, True], ids=["after-body", "mid-body"])
def test_disconnect_delivered_to_waiting_receive(serve, mid_body: bool) -> None:
    waiting = threading.Event()
    received: list[dict] = []
    got = threading.Event()

    async def app(scope, receive, send) -> None:
        received.append(await receive())
        waiting.set()
        received.append(await receive())
        got.set()

    with serve(app) as srv, srv.connect() as sock:
        if mid_body:
            sock.sendall(request("POST", headers=[("Content-Length", "10")]) + b"hello")
        else:
            sock.sendall(request())
        assert waiting.wait(TIMEOUT)
        expected_first = {"type": "http.request", "body": b"hello" if mid_body else b""}
        assert received[0] == {**expected_first, "more_body": mid_body}
        sock.close()
        assert got.wait(TIMEOUT)
        assert received[1] == {"type": "http.disconnect"}


def test_disconnect_during_streaming_response(serve) -> None:
    got = threading.Event()
    received: list[dict] = []

    async def app(scope, receive, send) -> None:
        await read_body(receive)
        waiter = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while not waiter.done():
            await send({"type": "http.response.body", "body": b"tick", "more_body": True})
            await asyncio.sleep(0)
        received.append(waiter.result())
        got.set()

    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request())
        assert reader.head().get("transfer-encoding") == "chunked"
        assert reader._take(9) == b"4\r\ntick\r\n"
        sock.close()
        assert got.wait(TIMEOUT)
        assert received == [{"type": "http.disconnect"}]


# Resources


def test_closed_connections_are_freed_without_the_garbage_collector(serve) -> None:
    """A closed connection holds no reference cycle: with the cyclic collector off, every
    connection object is gone once its socket closed and its request ended."""
    from fulmen.protocols.http1 import H1Connection

    def connections() -> int:
        return sum(isinstance(o, H1Connection) for o in gc.get_objects())

    with serve(echo_app) as srv:
        gc.collect()
        gc.disable()
        try:
            before = connections()
            for n in range(20):
                with srv.connect() as sock:
                    sock.sendall(request(path=f"/{n}", headers=[("Connection", "close")]))
                    assert recv_until_closed(sock).startswith(b"HTTP/1.1 200 ")
            state = srv.server.state
            poll_until(lambda: not state.connections and not state.tasks, "still open")
            # The loop may hold the last one a moment longer (a handle of its last callback).
            poll_until(lambda: connections() == before, "closed connections left for the gc")
        finally:
            gc.enable()
