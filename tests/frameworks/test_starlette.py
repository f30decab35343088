"""Starlette under fulmen: routes, request bodies, streaming and file responses,
`BaseHTTPMiddleware` (on the app and on a mounted sub-app), WebSockets, lifespan state and the
error page, each through a real server and a real client (tests/frameworks/apps_starlette.py)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import TIMEOUT, RunningServer
from tests.frameworks import apps_starlette
from tests.frameworks.apps_starlette import app
from tests.frameworks.conftest import APP_ERROR, ServeApp, check_websocket_echo
from tests.protocols.test_filesend import count_sendfile


def client(srv: RunningServer) -> httpx.Client:
    """A keep-alive client. The BaseHTTPMiddleware on this app sends its final body message
    after a wait, so the next request often arrives while the previous app still runs."""
    return httpx.Client(base_url=srv.url, timeout=TIMEOUT)


def test_path_params_and_query(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, client(srv) as http:
        response = http.get("/users/42", params={"q": "x y"})
        assert response.status_code == 200
        assert response.json() == {"user": 42, "q": "x y"}
        assert response.headers.get_list("x-middleware") == ["app"]
        assert http.get("/users/not-a-number").status_code == 404


def test_post_echoes_a_large_body(serve_app: ServeApp) -> None:
    body = os.urandom(100 * 1024)
    with serve_app(app) as srv, client(srv) as http:
        response = http.post("/echo", content=body)
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(body))
        assert response.content == body


def test_request_stream_reads_a_chunked_upload(serve_app: ServeApp) -> None:
    def upload() -> Iterator[bytes]:
        for _ in range(64):
            yield b"x" * 4096

    with serve_app(app) as srv, client(srv) as http:
        response = http.post("/count", content=upload())  # Transfer-Encoding: chunked
        assert response.status_code == 200
        result = response.json()
        assert result["size"] == 64 * 4096
        assert result["chunks"] >= 1


def test_streaming_response(serve_app: ServeApp) -> None:
    with (
        serve_app(app) as srv,
        client(srv) as http,
        http.stream("GET", "/stream", params={"parts": 5}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers.get_list("x-middleware") == ["app"]
        assert response.read() == b"".join(f"part {i}\n".encode() for i in range(5))


def test_base_http_middleware_on_a_mounted_sub_app(serve_app: ServeApp) -> None:
    """Regression: the sub-app's BaseHTTPMiddleware raised anyio's NoEventLoopError when the
    request's first step ran outside a Task."""
    with serve_app(app) as srv, client(srv) as http:
        for _ in range(3):
            response = http.get("/sub/hello")
            assert response.status_code == 200
            assert response.text == "hello from the sub-app"
            assert response.headers.get_list("x-middleware") == ["sub", "app"]
    assert APP_ERROR not in srv.messages()


def test_next_request_sent_before_the_app_returned(serve_app: ServeApp) -> None:
    """A keep-alive client sends its next request as soon as it has the whole response, here
    while the app is still running (as Starlette's BaseHTTPMiddleware does on every response:
    its final empty body message comes after a wait)."""
    with (
        serve_app(app, timeout_keep_alive=1) as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as http,
    ):
        assert http.get("/late-end").text == "complete"
        assert http.get("/users/1").status_code == 200  # on the same connection


def test_file_response(
    serve_app: ServeApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = os.urandom(200 * 1024)
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    monkeypatch.setattr(apps_starlette, "FILE_PATH", path)
    with serve_app(app) as srv, client(srv) as http:
        response = http.get("/file")
        assert response.status_code == 200
        assert response.headers["content-length"] == str(len(content))
        assert hashlib.sha256(response.content).digest() == hashlib.sha256(content).digest()
        head = http.head("/file")
        assert head.status_code == 200
        assert head.headers["content-length"] == str(len(content))
        assert head.headers["etag"] == response.headers["etag"]
        assert head.content == b""
        assert http.get("/users/1").status_code == 200


@pytest.fixture
def big_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A 5 MiB file served at `/file`: more than the socket buffers hold."""
    content = os.urandom(5 * 1024 * 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(content)
    monkeypatch.setattr(apps_starlette, "FILE_PATH", path)
    return content


def test_file_response_goes_zero_copy(
    serve_app: ServeApp, big_file: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fulmen offers `http.response.pathsend`, so FileResponse hands the file over (through
    the app's BaseHTTPMiddleware) and it is sent with `os.sendfile`."""
    counts = count_sendfile(monkeypatch)
    with serve_app(app) as srv, client(srv) as http:
        for _ in range(3):
            response = http.get("/file")
            assert response.content == big_file
    assert counts.count(len(big_file)) == 3  # each file's first call asked for all of it


def test_file_ranges(serve_app: ServeApp, big_file: bytes) -> None:
    with serve_app(app) as srv, client(srv) as http:
        one = http.get("/file", headers={"range": "bytes=100-199"})
        assert one.status_code == 206
        assert one.headers["content-range"] == f"bytes 100-199/{len(big_file)}"
        assert one.content == big_file[100:200]
        tail = http.get("/file", headers={"range": "bytes=-1000"})
        assert tail.content == big_file[-1000:]
        two = http.get("/file", headers={"range": "bytes=0-9,20-29"})
        assert two.status_code == 206
        assert two.headers["content-type"].startswith("multipart/byteranges")
        assert big_file[0:10] in two.content and big_file[20:30] in two.content
        wrong = http.get("/file", headers={"range": f"bytes={len(big_file)}-"})
        assert wrong.status_code == 416
        assert http.get("/file").content == big_file  # the connection goes on


def test_a_file_deleted_before_it_is_sent_is_a_500(serve_app: ServeApp, big_file: bytes) -> None:
    with serve_app(app) as srv, client(srv) as http:
        response = http.get("/file-gone")
        assert response.status_code == 500
        assert any(record.getMessage() == APP_ERROR for record in srv.records)
        assert http.get("/users/1").status_code == 200


def test_a_file_that_shrank_cuts_the_response(serve_app: ServeApp, big_file: bytes) -> None:
    """Its Content-Length says the old size: the client gets what the file still has and the
    connection closes (never a hang), the error is logged, the next request is served."""
    with serve_app(app) as srv, client(srv) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            http.get("/file-shrinks")
        assert any(record.getMessage() == APP_ERROR for record in srv.records)
        assert http.get("/users/1").status_code == 200


def test_a_client_leaving_mid_file(serve_app: ServeApp, big_file: bytes) -> None:
    with serve_app(app) as srv:
        with client(srv) as http, http.stream("GET", "/file") as response:
            assert len(next(response.iter_raw(65536))) > 0
        # leaving the client closes its connection with most of the file unread
        with client(srv) as http:
            assert http.get("/file").content == big_file
        assert srv.messages(logging.ERROR) == []  # the first request's app ended without one


def test_websocket_echo_and_close_code(serve_app: ServeApp) -> None:
    with serve_app(app) as srv:
        check_websocket_echo(srv, b"\x00\x01binary")


def test_lifespan_state(serve_app: ServeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(apps_starlette, "EVENTS", events)
    with serve_app(app, lifespan="on") as srv:
        assert events == ["startup"]
        response = httpx.get(srv.url + "/state", timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.json() == {"request_state": "hello from the lifespan", "app_state": True}
    assert events == ["startup", "shutdown"]


def test_error_page_and_the_next_request(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, client(srv) as http:
        response = http.get("/error")
        assert response.status_code == 500
        assert response.text == "Internal Server Error"
        assert http.get("/users/7").json() == {"user": 7, "q": None}
    # Starlette's ServerErrorMiddleware sends its 500, then re-raises for the server to log:
    # fulmen logs it once, with the route's exception.
    logged = [r for r in srv.records if r.getMessage() == APP_ERROR]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert logged[0].exc_info is not None
    assert str(logged[0].exc_info[1]) == "boom from a Starlette route"
