"""Litestar under fulmen: request bodies, `Stream`, a `sync_to_thread` route, the error page,
a WebSocket echo and the startup/shutdown hooks, through a real server and a real client
(tests/frameworks/apps_litestar.py)."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import TIMEOUT
from tests.frameworks import apps_litestar
from tests.frameworks.apps_litestar import app
from tests.frameworks.conftest import APP_ERROR, ServeApp, check_websocket_echo


def test_request_body_echo(serve_app: ServeApp) -> None:
    body = os.urandom(100 * 1024)
    with serve_app(app) as srv:
        response = httpx.post(f"{srv.url}/echo", content=body, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.content == body


def test_json_body(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.post("/items", json={"name": "lamp", "price": 2.5, "tags": ["b", "a"]})
        assert response.status_code == 200
        assert response.json() == {"name": "LAMP", "total": 5.0, "tags": ["a", "b"]}
        assert client.post("/items", json={"name": "lamp"}).status_code == 400


def test_stream(serve_app: ServeApp) -> None:
    with (
        serve_app(app) as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
        client.stream("GET", "/stream") as response,
    ):
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.read() == b"".join(f"part {i}\n".encode() for i in range(5))


def test_sync_to_thread_route(serve_app: ServeApp) -> None:
    """Regression: Litestar's requests (here a route run in anyio's worker thread) raised
    anyio's NoEventLoopError when the request's first step ran outside a Task."""
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        loop_thread = client.get("/async").json()["thread"]
        for _ in range(3):
            response = client.get("/sync")
            assert response.status_code == 200
            assert response.json()["thread"] != loop_thread
    assert APP_ERROR not in srv.messages()


def test_error_page_and_the_next_request(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.get("/error")
        assert response.status_code == 500
        assert response.json() == {"status_code": 500, "detail": "Internal Server Error"}
        assert client.get("/async").status_code == 200
    # Litestar answers the 500 itself and does not re-raise: fulmen has nothing to log.
    assert APP_ERROR not in srv.messages()


def test_websocket_echo_and_close_code(serve_app: ServeApp) -> None:
    with serve_app(app) as srv:
        check_websocket_echo(srv, b"\x00bytes")


def test_startup_and_shutdown_hooks(serve_app: ServeApp, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(apps_litestar, "EVENTS", events)
    with serve_app(app, lifespan="on") as srv:
        assert events == ["startup"]
        assert httpx.get(f"{srv.url}/async", timeout=TIMEOUT).status_code == 200
    assert events == ["startup", "shutdown"]
