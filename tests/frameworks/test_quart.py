"""Quart under fulmen: a request body, a streamed response, the error page, a WebSocket echo and
`before_serving`/`after_serving`, through a real server and a real client
(tests/frameworks/apps_quart.py)."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import TIMEOUT
from tests.frameworks import apps_quart
from tests.frameworks.apps_quart import app
from tests.frameworks.conftest import APP_ERROR, ServeApp, check_websocket_echo


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
        check_websocket_echo(srv, b"\x00bytes")


def test_before_and_after_serving(serve_app: ServeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(apps_quart, "EVENTS", events)
    with serve_app(app, lifespan="on") as srv:
        assert events == ["before_serving"]
        assert httpx.get(f"{srv.url}/hello", timeout=TIMEOUT).text == "hello"
    assert events == ["before_serving", "after_serving"]
