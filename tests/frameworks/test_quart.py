"""Quart under fulmen: a request body, a streamed response, the error page, a WebSocket echo and
`before_serving`/`after_serving`, through a real server and a real client
(tests/frameworks/apps_quart.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import httpx
import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from tests.conftest import TIMEOUT, RunningServer
from tests.frameworks import apps_quart
from tests.frameworks.apps_quart import app

ServeApp = Callable[..., contextlib.AbstractContextManager[RunningServer]]

APP_ERROR = "Exception in ASGI application"


def test_request_body_echo(serve_app: ServeApp) -> None:
    body = os.urandom(100 * 1024)
    with serve_app(app) as srv:
        response = httpx.post(f"{srv.url}/echo", content=body, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.content == body


def test_streamed_response(serve_app: ServeApp) -> None:
    with (
        serve_app(app) as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
        client.stream("GET", "/stream", params={"parts": 5}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.read() == b"".join(f"part {i}\n".encode() for i in range(5))


def test_error_page_and_the_next_request(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.get("/error")
        assert response.status_code == 500
        assert "Internal Server Error" in response.text
        assert client.get("/hello").text == "hello"
    # Quart answers the 500 itself (and logs the error with its own logger): fulmen does not.
    assert APP_ERROR not in srv.messages()


def test_websocket_echo_and_close_code(serve_app: ServeApp) -> None:
    with serve_app(app) as srv:
        uri = f"ws://127.0.0.1:{srv.port}/ws"
        with connect(uri, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
            ws.send("hello")
            assert ws.recv(timeout=TIMEOUT) == "hello"
            ws.send(b"\x00bytes")
            assert ws.recv(timeout=TIMEOUT) == b"\x00bytes"
            ws.send("bye")
            with pytest.raises(ConnectionClosedError) as closed:
                ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "see you")


def test_before_and_after_serving(serve_app: ServeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(apps_quart, "EVENTS", events)
    with serve_app(app, lifespan="on") as srv:
        assert events == ["before_serving"]
        assert httpx.get(f"{srv.url}/hello", timeout=TIMEOUT).text == "hello"
    assert events == ["before_serving", "after_serving"]
