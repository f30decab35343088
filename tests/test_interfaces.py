"""Interfaces: ASGI3/ASGI2 detection, the ASGI2 adapter and WSGI (PEP 3333) served as ASGI."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import json
import logging
import sys
import threading

import httpx
import pytest

from fulmen.interfaces import (
    ASGI2Middleware,
    WSGIMiddleware,
    adapt,
    build_environ,
    detect_interface,
)
from tests.conftest import TIMEOUT, recv_until_closed
from tests.helpers import messages, record_logs

# ASGI3 and ASGI2 applications of every shape the detection must tell apart.


async def _answer(send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def asgi3_function(scope, receive, send):
    await _answer(send, b"asgi3 function")


async def asgi3_with_kind(kind, scope, receive, send):
    await _answer(send, kind.encode())


class ASGI3Instance:
    async def __call__(self, scope, receive, send):
        await _answer(send, b"asgi3 instance")


class ASGI3Methods:
    async def app(self, scope, receive, send):
        await _answer(send, b"asgi3 method")


def asgi2_function(scope):
    async def instance(receive, send):
        await _answer(send, b"asgi2 function")

    return instance


class ASGI2Class:
    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        await _answer(send, b"asgi2 class")


class ASGI2Instance:
    def __call__(self, scope):
        return ASGI2Class(scope)


APPS = [
    pytest.param(asgi3_function, "asgi3", "asgi3 function", id="asgi3-function"),
    pytest.param(ASGI3Instance(), "asgi3", "asgi3 instance", id="asgi3-instance"),
    pytest.param(ASGI3Methods().app, "asgi3", "asgi3 method", id="asgi3-method"),
    pytest.param(
        functools.partial(asgi3_with_kind, "asgi3 partial"), "asgi3", "asgi3 partial", id="partial"
    ),
    pytest.param(asgi2_function, "asgi2", "asgi2 function", id="asgi2-function"),
    pytest.param(ASGI2Class, "asgi2", "asgi2 class", id="asgi2-class"),
    pytest.param(ASGI2Instance(), "asgi2", "asgi2 class", id="asgi2-instance"),
]


@pytest.mark.parametrize(("app", "interface", "body"), APPS)
def test_detect_interface(app, interface, body) -> None:
    assert detect_interface(app) == interface


@pytest.mark.parametrize(("app", "interface", "body"), APPS)
def test_adapt(app, interface, body) -> None:
    adapted = adapt(app, "auto")
    if interface == "asgi3":
        assert adapted is app
    else:
        assert isinstance(adapted, ASGI2Middleware) and adapted.app is app


@pytest.mark.parametrize(("app", "interface", "body"), APPS)
def test_auto_detected_app_is_served(app, interface, body, serve_one) -> None:
    with serve_one(app) as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.text == body


@pytest.mark.parametrize(
    ("app", "interface", "body"),
    [
        (asgi2_function, "asgi2", "asgi2 function"),
        # A sync callable returning a coroutine function looks like ASGI2 to detection.
        (
            lambda scope, receive, send: asgi3_function(scope, receive, send),
            "asgi3",
            "asgi3 function",
        ),
    ],
)
def test_explicit_interface(app, interface, body, serve_one) -> None:
    with serve_one(app, interface=interface) as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == body


def test_asgi2_app_gets_lifespan(serve_one, monkeypatch) -> None:
    events = []

    def app(scope):
        async def instance(receive, send):
            if scope["type"] == "lifespan":
                while True:
                    message = await receive()
                    events.append(message["type"])
                    await send({"type": message["type"] + ".complete"})
                    if message["type"] == "lifespan.shutdown":
                        return
            await _answer(send, b"ok")

        return instance

    with record_logs(monkeypatch) as logs, serve_one(app, lifespan="on") as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "ok"
    assert events == ["lifespan.startup", "lifespan.shutdown"]
    assert "Application shutdown complete." in messages(logs)


# WSGI


def native(value: str) -> str:
    """PEP 3333 'bytes-as-str': the latin-1 decoding of the UTF-8 bytes."""
    return value.encode("utf-8").decode("latin-1")


@pytest.mark.parametrize(
    ("request_head", "body", "expected"),
    [
        pytest.param(
            b"POST /caf%C3%A9/x%20y?a=1&b=%20&c=%C3%A9 HTTP/1.1\r\nHost: example.com:8080\r\n"
            b"Content-Type: application/json\r\nContent-Length: 5\r\nX-Custom: one\r\n"
            b"X-Custom: two\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            b"hello",
            {
                "REQUEST_METHOD": "POST",
                "SCRIPT_NAME": "/mount",
                "PATH_INFO": native("/café/x y"),
                "QUERY_STRING": "a=1&b=%20&c=%C3%A9",
                "CONTENT_TYPE": "application/json",
                "CONTENT_LENGTH": "5",
                "SERVER_PROTOCOL": "HTTP/1.1",
                "HTTP_HOST": "example.com:8080",
                "HTTP_X_CUSTOM": "one,two",
                "HTTP_ACCEPT": "*/*",
                "HTTP_CONNECTION": "close",
            },
            id="post",
        ),
        pytest.param(
            b"GET /mount/ HTTP/1.0\r\n\r\n",
            b"",
            {
                "REQUEST_METHOD": "GET",
                "SCRIPT_NAME": "/mount",
                "PATH_INFO": "/mount/",
                "QUERY_STRING": "",
                "SERVER_PROTOCOL": "HTTP/1.0",
            },
            id="get-http10",
        ),
    ],
)
def test_wsgi_environ(request_head, body, expected, serve) -> None:
    seen = {}

    def app(environ, start_response):
        seen.update(environ)
        seen["body"] = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    with serve(app, interface="wsgi", root_path="/mount") as srv, srv.connect() as sock:
        sock.sendall(request_head + body)
        response = recv_until_closed(sock)
        client_port = sock.getsockname()[1]
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response_body(response) == b"ok"
    assert seen.pop("body") == body
    cgi = {key: value for key, value in seen.items() if not key.startswith("wsgi.")}
    assert cgi == {
        **expected,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": str(srv.port),
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": str(client_port),
    }
    assert all(type(value) is str for value in cgi.values())
    assert seen["wsgi.version"] == (1, 0)
    assert seen["wsgi.url_scheme"] == "http"
    assert seen["wsgi.multithread"] is True
    assert seen["wsgi.multiprocess"] is True
    assert seen["wsgi.run_once"] is False
    assert callable(seen["wsgi.errors"].write)


def response_body(response: bytes) -> bytes:
    """The body of one complete response read until close: de-chunked if chunked."""
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n"
            return b"".join(chunks)
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


def big_body() -> bytes:
    return b"".join(b"line %07d of the request body\n" % i for i in range(100_000))  # ~3 MiB


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_wsgi_input_streams_a_large_body(framing, serve) -> None:
    body = big_body()
    line_length = body.index(b"\n") + 1
    first_line_read = threading.Event()

    def app(environ, start_response):
        stream = environ["wsgi.input"]
        first = stream.readline()
        first_line_read.set()
        second = stream.readline(10)  # bounded readline: a partial line
        rest_of_second = stream.readline()
        digest = hashlib.sha256(first + second + rest_of_second)
        sizes = []
        while chunk := stream.read(65536):
            sizes.append(len(chunk))
            digest.update(chunk)
        report = {
            "first": first.decode(),
            "second": second.decode(),
            "full_sizes": all(size == 65536 for size in sizes[:-1]),
            "last": sizes[-1],
            "total": len(first + second + rest_of_second) + sum(sizes),
            "sha256": digest.hexdigest(),
            "after_end": stream.read().decode(),
            "length": environ.get("CONTENT_LENGTH"),
        }
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(report).encode()]

    if framing == "chunked":
        head = (
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        data = b"".join(
            b"%x\r\n%b\r\n" % (len(body[i : i + 100_000]), body[i : i + 100_000])
            for i in range(0, len(body), 100_000)
        )
        data += b"0\r\n\r\n"
    else:
        head = (
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        data = body
    with serve(app, interface="wsgi") as srv, srv.connect() as sock:
        sock.sendall(head + data[:1000])
        # The app reads before the body has been sent: wsgi.input streams.
        assert first_line_read.wait(TIMEOUT)
        sock.sendall(data[1000:])
        response = recv_until_closed(sock)
    report = json.loads(response_body(response))
    assert report == {
        "first": "line 0000000 of the request body\n",
        "second": "line 00000",
        "full_sizes": True,
        "last": (len(body) - 2 * line_length) % 65536 or 65536,
        "total": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "after_end": "",
        "length": None if framing == "chunked" else str(len(body)),
    }


class ClosingResult:
    """A WSGI iterable that records `close()`; raises at item `fail_at` if given."""

    def __init__(self, chunks: list[bytes], fail_at: int | None = None) -> None:
        self.chunks = chunks
        self.fail_at = fail_at
        self.closed = threading.Event()

    def __iter__(self):
        for index, chunk in enumerate(self.chunks):
            if index == self.fail_at:
                raise ValueError("iteration failed")
            yield chunk

    def close(self) -> None:
        self.closed.set()


@pytest.mark.parametrize(
    ("fail_at", "expected"),
    [
        (None, b"HTTP/1.1 200 OK\r\n"),
        (0, b"HTTP/1.1 500 Internal Server Error\r\n"),  # nothing sent yet: a 500
        (1, b"HTTP/1.1 200 OK\r\n"),  # head already sent: the connection is cut
    ],
)
def test_wsgi_close_is_always_called(fail_at, expected, serve_one, monkeypatch) -> None:
    result = ClosingResult([b"first", b"second"], fail_at)

    def app(environ, start_response):
        start_response("200 OK", [])
        return result

    with record_logs(monkeypatch) as logs, serve_one(app, interface="wsgi") as srv:
        with srv.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = recv_until_closed(sock)
        assert result.closed.wait(TIMEOUT)
    assert response.startswith(expected)
    if fail_at is None:
        assert response.endswith(b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n")
    else:
        assert "Exception in ASGI application" in messages(logs)
    if fail_at == 1:
        assert response.endswith(b"5\r\nfirst\r\n")  # no terminating chunk: incomplete


def test_wsgi_streams_response_chunks(serve_one) -> None:
    go = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        assert go.wait(TIMEOUT)
        yield b""  # empty chunks are skipped, not sent as a terminating chunk
        yield b"second"

    with serve_one(app, interface="wsgi") as srv, srv.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while b"first\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        assert b"second" not in received  # the first chunk left before the second existed
        go.set()
        received += recv_until_closed(sock)
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n"


def test_wsgi_write_callable(serve_one) -> None:
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Length", "10")])
        write(b"hello")
        return [b"world"]

    with serve_one(app, interface="wsgi") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.text == "helloworld"
    assert response.headers["content-length"] == "10"


def test_wsgi_exc_info_before_headers_replaces_the_response(serve_one) -> None:
    def app(environ, start_response):
        start_response("200 OK", [("X-Before", "1")])
        try:
            raise ValueError("late failure")
        except ValueError:
            start_response("503 Service Unavailable", [("X-Error", "1")], sys.exc_info())
        return [b"error page"]

    with serve_one(app, interface="wsgi") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 503
    assert response.text == "error page"
    assert response.headers["x-error"] == "1"
    assert "x-before" not in response.headers


def test_wsgi_exc_info_after_headers_reraises(serve_one) -> None:
    outcome = {}

    def app(environ, start_response):
        write = start_response("200 OK", [])
        write(b"partial")
        try:
            raise ValueError("late failure")
        except ValueError as original:
            try:
                start_response("500 Internal Server Error", [], sys.exc_info())
            except ValueError as raised:
                outcome["same"] = raised is original
        try:
            start_response("200 OK", [])  # a second call without exc_info is an error
        except RuntimeError as exc:
            outcome["twice"] = str(exc)
        return [b" rest"]

    with serve_one(app, interface="wsgi") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.text == "partial rest"
    assert outcome == {"same": True, "twice": "start_response called twice without exc_info"}


@pytest.mark.parametrize(
    "app",
    [
        pytest.param(lambda environ, start_response: [b"no start_response"], id="no-start"),
        pytest.param(lambda environ, start_response: 1 / 0, id="raises"),
    ],
)
def test_wsgi_app_error_is_500(app, serve_one, monkeypatch) -> None:
    with record_logs(monkeypatch) as logs, serve_one(app, interface="wsgi") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 500
    assert "Exception in ASGI application" in messages(logs)


def test_slow_wsgi_app_does_not_block_the_loop(serve_one) -> None:
    slow_started = threading.Event()
    release = threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            slow_started.set()
            assert release.wait(TIMEOUT)
        start_response("200 OK", [])
        return [environ["PATH_INFO"].encode()]

    responses = []
    with serve_one(app, interface="wsgi") as srv:
        slow = threading.Thread(
            target=lambda: responses.append(httpx.get(srv.url + "/slow", timeout=TIMEOUT))
        )
        slow.start()
        try:
            assert slow_started.wait(TIMEOUT)
            fast = httpx.get(srv.url + "/fast", timeout=TIMEOUT)
            assert fast.text == "/fast"
            assert slow.is_alive() and not responses  # /slow is still blocked meanwhile
        finally:
            release.set()
            slow.join(TIMEOUT)
    assert [r.text for r in responses] == ["/slow"]


def test_wsgi_skips_lifespan(serve_one, monkeypatch) -> None:
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b"wsgi"]

    with record_logs(monkeypatch) as logs, serve_one(app, interface="wsgi", lifespan="on") as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "wsgi"
    assert "Waiting for application startup." not in messages(logs)


@pytest.mark.parametrize(
    ("scope_type", "error"),
    [
        ("lifespan", "WSGI applications do not support the lifespan protocol"),
        ("websocket", "WSGI cannot serve scope type 'websocket'"),
    ],
)
def test_wsgi_rejects_other_scopes(scope_type, error) -> None:
    middleware = WSGIMiddleware(lambda environ, start_response: [])

    async def never(*args):
        raise AssertionError("not called")

    with pytest.raises(RuntimeError, match=error):
        asyncio.run(middleware({"type": scope_type}, never, never))


def test_wsgi_input_ends_when_the_client_disconnects(serve_one) -> None:
    read = {}
    first_read = threading.Event()
    done = threading.Event()

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST":
            stream = environ["wsgi.input"]
            read["first"] = stream.read(10)
            first_read.set()
            read["rest"] = stream.read()  # the client is gone: end of input, not a hang
            done.set()
        start_response("200 OK", [])
        return [b"nobody listens"]

    with serve_one(app, interface="wsgi") as srv:
        with srv.connect() as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            assert first_read.wait(TIMEOUT)
        assert done.wait(TIMEOUT)
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "nobody listens"  # still serving
    assert read["first"] == b"0123456789"
    assert read["rest"] == b""
    # Answering a client that left is no application error (the sends are no-ops).
    assert [r.getMessage() for r in srv.records if r.levelno >= logging.ERROR] == []


def test_environ_without_client_or_server() -> None:
    # A Unix socket peer has no address: no REMOTE_ADDR; no server address: SERVER_NAME default.
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "query_string": b"",
        "http_version": "1.1",
        "headers": [],
        "client": None,
        "server": None,
    }
    environ = build_environ(scope, io.BytesIO(b""))
    assert "REMOTE_ADDR" not in environ and "REMOTE_PORT" not in environ
    assert (environ["SERVER_NAME"], environ["SERVER_PORT"]) == ("localhost", "80")
    assert (environ["SCRIPT_NAME"], environ["wsgi.url_scheme"]) == ("", "http")


def test_wsgi_one_block_response_gets_content_length(serve_one) -> None:
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"one block"]

    with serve_one(app, interface="wsgi") as srv:
        response = httpx.get(srv.url, timeout=10)
        assert response.text == "one block"
        assert response.headers["content-length"] == "9"
        assert "transfer-encoding" not in response.headers


# WebSockets through the interfaces


def test_wsgi_app_gets_upgrade_requests_as_plain_http(serve_one) -> None:
    """WSGI has no WebSockets: a handshake is an ordinary request, then the connection closes."""
    seen = []

    def app(environ, start_response):
        seen.append((environ["HTTP_UPGRADE"], environ["wsgi.url_scheme"]))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"no websockets here"]

    handshake = (
        b"GET /chat HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with serve_one(app, interface="wsgi") as srv, srv.connect() as sock:
        assert srv.server.state.ws_factory is None
        sock.sendall(handshake)
        response = recv_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nno websockets here")
    assert seen == [("websocket", "http")]


class ASGI2Echo:
    """An ASGI2 WebSocket app: the scope first, then receive/send."""

    def __init__(self, scope):
        assert scope["type"] == "websocket"

    async def __call__(self, receive, send):
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": message["text"].upper()})
        await send({"type": "websocket.close"})


def test_asgi2_app_serves_websockets(serve_one) -> None:
    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    with serve_one(ASGI2Echo) as srv:
        url = f"ws://{srv.host}:{srv.port}/"
        with connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
            ws.send("shout")
            assert ws.recv(timeout=TIMEOUT) == "SHOUT"
            with pytest.raises(ConnectionClosedOK):
                ws.recv(timeout=TIMEOUT)
            assert ws.close_code == 1000
