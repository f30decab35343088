"""`fulmen.adapters`: an ASGI app under real WSGI servers (wsgiref in a thread, gunicorn's sync
worker in a subprocess) through `WSGIAdapter`, and a WSGI app under fulmen through
`ASGIAdapter`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import httpx
import pytest

from fulmen.adapters import ASGIAdapter, WSGIAdapter, build_scope
from fulmen.interfaces import WSGIMiddleware
from tests import apps_adapters
from tests.conftest import TIMEOUT, RecordingHandler, recv_until_closed
from tests.test_gunicorn import Gunicorn

PREFIX = "/api"  # every server mounts the app here: SCRIPT_NAME -> root_path


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


def mount(prefix: str, app: Any) -> Any:
    """What a WSGI server does for an app mounted below `prefix` (wsgiref has no option)."""

    def mounted(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"].startswith(prefix):
            environ["SCRIPT_NAME"] = prefix
            environ["PATH_INFO"] = environ["PATH_INFO"][len(prefix) :]
        return app(environ, start_response)

    return mounted


@contextlib.contextmanager
def wsgiref_server(app: Any, threaded: bool = False) -> Iterator[tuple[str, int]]:
    server_class = ThreadingWSGIServer if threaded else WSGIServer
    httpd = make_server("127.0.0.1", 0, app, server_class, QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield "127.0.0.1", httpd.server_address[1]
    finally:
        httpd.shutdown()
        thread.join(TIMEOUT)
        httpd.server_close()


class Target:
    def __init__(self, name: str, host: str, port: int, errors: Any) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}{PREFIX}"
        self.errors = errors  # () -> the error log text so far


@pytest.fixture(scope="module", params=["wsgiref", "gunicorn"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "wsgiref":
        handler = RecordingHandler()
        logger = logging.getLogger("fulmen.error")
        logger.addHandler(handler)
        try:
            with wsgiref_server(mount(PREFIX, apps_adapters.wsgi_app)) as (host, port):

                def errors() -> str:
                    return "\n".join(
                        logging.Formatter().format(record) for record in handler.records
                    )

                yield Target("wsgiref", host, port, errors)
        finally:
            logger.removeHandler(handler)
            apps_adapters.wsgi_app.shutdown()
    else:
        app = "tests.apps_adapters:wsgi_app"
        args = ("--env", f"SCRIPT_NAME={PREFIX}", "--workers", "1")
        with Gunicorn(*args, app=app, worker="sync", wait=False) as server:
            yield Target("gunicorn", "127.0.0.1", server.port, lambda: server.stderr.text)


def get(url: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(timeout=TIMEOUT) as client:
        return client.request(kwargs.pop("method", "GET"), url, **kwargs)


def test_hello(target: Target) -> None:
    response = get(target.url + "/")
    assert response.status_code == 200
    assert response.text == "hello"
    assert response.headers["content-type"] == "text/plain"


def test_scope_from_the_environ(target: Target) -> None:
    response = get(target.url + "/scope?a=1&b=%20x", headers={"X-Thing": "yes"})
    info = response.json()
    assert info["method"] == "GET"
    assert info["root_path"] == PREFIX
    assert info["path"] == PREFIX + "/scope"  # ASGI: the path includes the root path
    assert info["query_string"] == "a=1&b=%20x"
    assert info["scheme"] == "http"
    assert info["http_version"] == "1.1"
    assert ["x-thing", "yes"] in info["headers"]
    assert ["host", f"{target.host}:{target.port}"] in info["headers"]
    assert info["server"][1] == target.port
    assert info["client"][0] == "127.0.0.1"
    if target.name == "gunicorn":  # wsgiref sets no REMOTE_PORT: 0
        assert info["client"][1] > 0
    assert info["state"] == {}
    # gunicorn gives the request target as sent (RAW_URI); wsgiref does not
    assert info["raw_path"] == (PREFIX + "/scope" if target.name == "gunicorn" else None)


def test_post_headers(target: Target) -> None:
    response = get(
        target.url + "/scope", method="POST", content=b"abc", headers={"content-type": "x/y"}
    )
    headers = response.json()["headers"]
    assert ["content-type", "x/y"] in headers
    assert ["content-length", "3"] in headers
    assert not any(name.startswith("http-") for name, _ in headers)


def _body(size: int) -> bytes:
    return hashlib.sha256(b"seed").digest() * (size // 32)


def test_large_body_is_streamed_in(target: Target) -> None:
    body = _body(1 << 20)
    response = get(target.url + "/upload", method="POST", content=body)
    info = response.json()
    assert info["sha256"] == hashlib.sha256(body).hexdigest()
    assert sum(info["sizes"]) == len(body)
    # read as the app asks, one bounded chunk each time: never all at once
    assert len(info["sizes"]) >= 16
    assert max(info["sizes"]) <= 64 * 1024


def test_chunked_request_body(target: Target) -> None:
    if target.name == "wsgiref":
        pytest.skip("wsgiref does not read chunked request bodies")
    body = _body(300_000)

    def parts() -> Iterator[bytes]:
        for start in range(0, len(body), 50_000):
            yield body[start : start + 50_000]

    response = get(target.url + "/upload", method="POST", content=parts())
    info = response.json()
    assert info["sha256"] == hashlib.sha256(body).hexdigest()
    assert len(info["sizes"]) >= 2 and info["sizes"][-1] == 0  # until the end of the input


def test_empty_body(target: Target) -> None:
    assert get(target.url + "/upload", method="POST").json()["sizes"] == [0]


def test_response_is_streamed_out(target: Target, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    request = f"GET {PREFIX}/stream?{flag} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection((target.host, target.port), timeout=TIMEOUT) as sock:
        sock.sendall(request.encode())
        data = b""
        while b"first-chunk;" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        # the app sends its second chunk only once the flag exists: the first came alone
        assert b"second-chunk;" not in data
        flag.touch()
        data += recv_until_closed(sock)
    assert data.index(b"first-chunk;") < data.index(b"second-chunk;") < data.index(b"last")
    assert data.startswith(b"HTTP/1.")
    if target.name == "gunicorn":
        assert data.endswith(b"0\r\n\r\n")  # each message one HTTP chunk, then the last chunk


def test_status_and_headers_pass_through(target: Target) -> None:
    response = get(target.url + "/status")
    assert response.status_code == 201
    assert response.reason_phrase == "Created"
    assert response.headers["x-custom"] == "one"
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert response.text == "created"


def wait_text(source: Any, needle: str) -> str:
    """`source()` once it contains `needle` (logs arrive after the response), within TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while needle not in (text := source()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return str(text)


def test_error_before_the_response_is_a_500(target: Target) -> None:
    response = get(target.url + "/error")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    text = wait_text(target.errors, "boom before the response")
    assert "Exception in ASGI application" in text
    assert "ValueError: boom before the response" in text  # with its traceback


def test_error_after_the_response_started_closes_the_connection(target: Target) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        get(target.url + "/error-after")
    assert get(target.url + "/").text == "hello"  # the server goes on


# -- in-process only: apps of their own under wsgiref -----------------------------------------


@contextlib.contextmanager
def adapted(app: Any, threaded: bool = False, **options: Any) -> Iterator[tuple[str, WSGIAdapter]]:
    adapter = WSGIAdapter(app, **options)
    try:
        with wsgiref_server(adapter, threaded) as (host, port):
            yield f"http://{host}:{port}", adapter
    finally:
        adapter.shutdown()


async def _start(send: Any, status: int = 200) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})


def test_disconnect_when_the_server_closes_the_iterable() -> None:
    disconnected = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected.set()

        listener = asyncio.ensure_future(listen())
        await _start(send)
        while not listener.done():
            await send({"type": "http.response.body", "body": b"x" * 4096, "more_body": True})
            await asyncio.sleep(0.005)
        await send({"type": "http.response.body", "body": b"ignored", "more_body": True})

    with adapted(app) as (url, _):
        host, port = url[7:].split(":")
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.0 200")
        # wsgiref notices when a write fails, and closes the iterable
        assert disconnected.wait(TIMEOUT)


def test_app_returning_without_a_response_is_a_500(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send)  # a head alone is no response

    with adapted(app) as (url, _):
        assert get(url).status_code == 500
    assert "ASGI callable returned without sending a response." in caplog.text


def test_app_returning_without_completing_the_response() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"9")]}
        )
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})

    with adapted(app) as (url, _), pytest.raises(httpx.RemoteProtocolError):
        get(url)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"type": "http.response.body", "body": b"x"}], "Expected 'http.response.start'"),
        ([{"type": "http.response.start", "status": 99}], "Invalid HTTP status 99"),
        (
            [{"type": "http.response.start", "status": 200}, {"type": "http.response.start"}],
            "Expected 'http.response.body'",
        ),
    ],
)
def test_invalid_messages_raise_in_send(messages: list[Any], error: str) -> None:
    raised: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            for message in messages:
                await send(message)
        except RuntimeError as exc:
            raised.append(str(exc))
            raise

    with adapted(app) as (url, _):
        assert get(url).status_code == 500
    assert len(raised) == 1 and error in raised[0]


def test_unexpected_message_while_streaming() -> None:
    raised: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send)
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        try:
            await send({"type": "http.response.start", "status": 200})
        except RuntimeError as exc:
            raised.append(str(exc))
        await send({"type": "http.response.body", "body": b"b", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    with adapted(app) as (url, _):
        assert get(url).text == "ab"
    assert raised == ["Unexpected ASGI message 'http.response.start'"]


def test_after_the_response_receive_disconnects_and_send_raises() -> None:
    seen: list[Any] = []
    done = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send)
        await send({"type": "http.response.body", "body": b"done"})
        seen.append((await receive())["type"])  # the response is done: nobody listens
        try:
            await send({"type": "http.response.body", "body": b"late"})
        except RuntimeError as exc:
            seen.append(str(exc))
        done.set()

    with adapted(app) as (url, _):
        assert get(url).text == "done"
        assert done.wait(TIMEOUT)
    assert seen == [
        "http.disconnect",
        "Unexpected ASGI message 'http.response.body' after the response",
    ]


def test_exception_after_the_response_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    done = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send)
        await send({"type": "http.response.body", "body": b"ok"})
        try:
            raise ValueError("background failure")
        finally:
            done.set()

    with adapted(app) as (url, _):
        assert get(url).text == "ok"
        assert done.wait(TIMEOUT)
    assert "ValueError: background failure" in caplog.text


def test_lifespan_startup_and_shutdown() -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    scope["state"]["db"] = "connected"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await _start(send)
        await send({"type": "http.response.body", "body": scope["state"]["db"].encode()})

    adapter = WSGIAdapter(app)
    adapter.startup()
    try:
        with wsgiref_server(adapter) as (host, port):
            assert get(f"http://{host}:{port}/").text == "connected"
    finally:
        adapter.shutdown()
    assert events == ["lifespan.startup", "lifespan.shutdown"]
    adapter.shutdown()  # again: nothing left to stop


def test_lifespan_startup_failure() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    adapter = WSGIAdapter(app)
    try:
        with pytest.raises(RuntimeError, match="startup failed"):
            adapter.startup()
    finally:
        adapter.shutdown()


def test_one_loop_for_concurrent_requests() -> None:
    loops: set[int] = set()
    arrived = threading.Barrier(4, timeout=TIMEOUT)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        loops.add(id(asyncio.get_running_loop()))
        await _start(send)
        await send({"type": "http.response.body", "body": b"ok"})

    def call(environ: dict[str, Any], start_response: Any) -> Any:
        arrived.wait()  # the four requests create the loop at the same time
        return adapter(environ, start_response)

    with adapted(app) as (_, adapter), wsgiref_server(call, threaded=True) as (host, port):
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(get(f"http://{host}:{port}/").text))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    assert results == ["ok"] * 4
    assert len(loops) == 1


def test_shutdown_cancels_running_requests(caplog: pytest.LogCaptureFixture) -> None:
    started = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.sleep(3600)

    with adapted(app, threaded=True) as (url, adapter), concurrent_get(url) as response:
        assert started.wait(TIMEOUT)
        adapter.shutdown()
        assert response().status_code == 500


@contextlib.contextmanager
def concurrent_get(url: str) -> Iterator[Any]:
    results: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: results.append(get(url)))
    thread.start()

    def result() -> httpx.Response:
        thread.join(TIMEOUT)
        return results[0]

    try:
        yield result
    finally:
        thread.join(TIMEOUT)


def test_build_scope_edge_cases() -> None:
    environ = {
        "REQUEST_METHOD": "PUT",
        "SERVER_PROTOCOL": "HTTP/1.0",
        "SERVER_NAME": "example",
        "SERVER_PORT": "",
        "PATH_INFO": "/caf\xc3\xa9",  # WSGI: UTF-8 bytes as latin-1 text
        "REQUEST_URI": "/caf%C3%A9?x",
        "REMOTE_ADDR": "10.0.0.1",
        "CONTENT_TYPE": "",
        "HTTP_CONTENT_TYPE": "text/plain",
        "wsgi.url_scheme": "https",
    }
    scope = build_scope(environ, {"a": 1})
    assert scope["path"] == "/café"
    assert scope["raw_path"] == b"/caf%C3%A9"
    assert scope["http_version"] == "1.0"
    assert scope["server"] == ("example", None)
    assert scope["client"] == ("10.0.0.1", 0)
    assert scope["scheme"] == "https"
    assert scope["headers"] == []
    assert scope["query_string"] == b""
    assert scope["state"] == {"a": 1}


@pytest.mark.parametrize(
    ("environ", "sizes"),
    [({"CONTENT_LENGTH": "nope"}, [0]), ({"wsgi.input_terminated": True}, [3, 3, 0])],
)
def test_body_length_from_the_environ(environ: dict[str, Any], sizes: list[int]) -> None:
    from tests.apps_adapters import app

    adapter = WSGIAdapter(app, chunk_size=3)
    base = {"REQUEST_METHOD": "POST", "PATH_INFO": "/upload", "wsgi.input": io.BytesIO(b"abcdef")}
    statuses: list[str] = []
    try:
        result = adapter({**base, **environ}, lambda status, headers: statuses.append(status))
        body = b"".join(result)
    finally:
        adapter.shutdown()
    assert statuses == ["200 OK"]
    assert httpx.Response(200, content=body).json()["sizes"] == sizes


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        WSGIAdapter(apps_adapters.app, chunk_size=0)


# -- ASGIAdapter: a WSGI app under fulmen ------------------------------------------------------


def wsgi_echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Path", environ["PATH_INFO"])])
    return [f"{environ['REQUEST_METHOD']} {environ['QUERY_STRING']} {len(body)}".encode()]


def test_asgi_adapter_is_the_wsgi_interface() -> None:
    assert issubclass(ASGIAdapter, WSGIMiddleware)
    assert ASGIAdapter.__doc__


def test_asgi_adapter_served_by_fulmen(serve: Any) -> None:
    body = _body(200_000)
    with serve(ASGIAdapter(wsgi_echo)) as adapter_srv, serve(wsgi_echo, interface="wsgi") as srv:
        for url in (adapter_srv.url, srv.url):
            response = get(url + "/p?q=1", method="POST", content=body)
            assert response.status_code == 200
            assert response.text == f"POST q=1 {len(body)}"
            assert response.headers["x-path"] == "/p"


def test_round_trip_through_both_adapters(serve_one: Any) -> None:
    wsgi = WSGIAdapter(apps_adapters.app)
    try:
        with serve_one(ASGIAdapter(wsgi)) as srv:
            body = _body(100_000)
            info = get(srv.url + "/upload", method="POST", content=body).json()
            assert info["sha256"] == hashlib.sha256(body).hexdigest()
            assert get(srv.url + "/status").status_code == 201
    finally:
        wsgi.shutdown()


def test_shutdown_stops_the_loop_thread() -> None:
    adapter = WSGIAdapter(apps_adapters.app)
    with wsgiref_server(adapter) as (host, port):
        assert get(f"http://{host}:{port}/").text == "hello"
    thread = adapter._thread
    assert thread is not None and thread.is_alive()
    adapter.shutdown()
    assert not thread.is_alive()


def test_unknown_status_gets_a_reason() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send, 299)
        await send({"type": "http.response.body", "body": b"odd"})

    with adapted(app) as (url, _):
        response = get(url)
    assert (response.status_code, response.reason_phrase) == (299, "Unknown")


# -- direct calls, for what a server cannot be made to do on cue -------------------------------


class BrokenInput:
    def read(self, size: int) -> bytes:
        raise OSError("connection reset while reading the body")


def call(adapter: WSGIAdapter, start_response: Any, **environ: Any) -> Any:
    environ.setdefault("wsgi.input", io.BytesIO())
    return adapter({"REQUEST_METHOD": "POST", "PATH_INFO": "/", **environ}, start_response)


def test_broken_input_is_a_disconnect() -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        await _start(send)
        await send({"type": "http.response.body", "body": b"ok"})

    adapter = WSGIAdapter(app)
    try:
        result = call(
            adapter, lambda *args: None, CONTENT_LENGTH="10", **{"wsgi.input": BrokenInput()}
        )
        assert b"".join(result) == b"ok"
    finally:
        adapter.shutdown()
    assert seen == [{"type": "http.disconnect"}]


def test_start_response_failure_ends_the_exchange() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send)
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        seen.append((await receive())["type"])  # the server gave up: nobody listens
        seen.append((await receive())["type"])

    def start_response(status: str, headers: Any) -> None:
        raise ValueError("refused by the server")

    adapter = WSGIAdapter(app)
    try:
        with pytest.raises(ValueError, match="refused"):
            call(adapter, start_response)
        deadline = time.monotonic() + TIMEOUT
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        adapter.shutdown()
    assert seen == ["http.disconnect", "http.disconnect"]


def test_close_answers_every_waiting_message(caplog: pytest.LogCaptureFixture) -> None:
    results: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _start(send)
        await send({"type": "http.response.body", "body": b"first", "more_body": True})

        async def record(awaitable: Any) -> None:
            results.append(await awaitable)

        loop = asyncio.get_running_loop()
        waiting = [
            loop.create_task(record(receive())),
            loop.create_task(record(send({"type": "http.response.body", "body": b"x"}))),
        ]
        cancelled = loop.create_task(receive())
        for _ in range(5):
            await asyncio.sleep(0)
        cancelled.cancel()
        app.tasks = waiting  # type: ignore[attr-defined]  # keep them referenced
        raise ValueError("failed with messages pending")

    adapter = WSGIAdapter(app)
    try:
        result = call(adapter, lambda *args: None)
        assert next(result) == b"first"
        exchange = result.exchange
        deadline = time.monotonic() + TIMEOUT
        while exchange.events.qsize() < 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # receive, send, receive (cancelled), error: all queued
        assert exchange.events.qsize() == 4
        result.close()
        assert list(result) == []
        deadline = time.monotonic() + TIMEOUT
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        adapter.shutdown()
    assert sorted(results, key=repr) == [None, {"type": "http.disconnect"}]
    assert "ValueError: failed with messages pending" in caplog.text
