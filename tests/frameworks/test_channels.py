"""Channels under fulmen: a `ProtocolTypeRouter` (tests/frameworks/apps_channels.py) with a sync
`WebsocketConsumer` and an `AsyncWebsocketConsumer` echoing text and bytes and closing with a
code, and the Django HTTP app routed through the same router, over a real server and real
clients.

Regression: no request or connection makes fulmen log "Exception in ASGI application" (once
asgiref's `thread_sensitive_context` ValueError on every Django request; see test_django.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.conftest import TIMEOUT, RunningServer
from tests.frameworks.apps_channels import application

ServeApp = Callable[..., contextlib.AbstractContextManager[RunningServer]]


def assert_no_app_error(srv: RunningServer) -> None:
    errors = srv.messages(logging.ERROR)
    assert errors == [], errors
    assert not any(record.exc_info for record in srv.records)


def ws_url(srv: RunningServer, kind: str) -> str:
    return f"ws://127.0.0.1:{srv.port}/ws/{kind}"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_consumer_echoes_text_and_bytes(serve_app: ServeApp, kind: str) -> None:
    payload = os.urandom(32 * 1024)
    with (
        serve_app(application) as srv,
        connect(ws_url(srv, kind), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws,
    ):
        for text in ("hello", "héllo wörld"):
            ws.send(text)
            assert ws.recv(timeout=TIMEOUT) == f"{kind}: {text}"
        ws.send(payload)
        assert ws.recv(timeout=TIMEOUT) == payload
        ws.close()
        assert_no_app_error(srv)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_consumer_closes_with_a_code(serve_app: ServeApp, kind: str) -> None:
    with (
        serve_app(application) as srv,
        connect(ws_url(srv, kind), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws,
    ):
        ws.send("close 4001")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4001
        assert_no_app_error(srv)


def test_unrouted_websocket_path_is_answered_500(serve_app: ServeApp) -> None:
    with serve_app(application) as srv:
        with (
            pytest.raises(InvalidStatus) as refused,
            connect(ws_url(srv, "nowhere"), open_timeout=TIMEOUT, close_timeout=TIMEOUT),
        ):
            pass
        assert refused.value.response.status_code == 500
        # URLRouter raised before accepting: the one error fulmen logs is that one.
        errors = [r for r in srv.records if r.levelno >= logging.ERROR]
        assert [r.getMessage() for r in errors] == ["Exception in ASGI application"]
        assert errors[0].exc_info is not None
        assert "No route found for path" in str(errors[0].exc_info[1])


def test_django_http_through_the_router_logs_no_app_error(serve_app: ServeApp) -> None:
    with (
        serve_app(application) as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
    ):
        for view in ("sync", "async") * 3:
            response = client.get(f"/{view}")
            assert response.status_code == 200
            assert response.json()["view"] == view
        assert client.post("/echo", content=b"through channels").content == b"through channels"
        assert client.get("/error").status_code == 500
        assert client.get("/sync").status_code == 200
        assert_no_app_error(srv)


def test_websocket_and_http_side_by_side(serve_app: ServeApp) -> None:
    with (
        serve_app(application) as srv,
        connect(ws_url(srv, "async"), open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
    ):
        ws.send("before")
        assert ws.recv(timeout=TIMEOUT) == "async: before"
        assert client.get("/async").status_code == 200  # while the WebSocket stays open
        ws.send("after")
        assert ws.recv(timeout=TIMEOUT) == "async: after"
        ws.close()
        assert_no_app_error(srv)
