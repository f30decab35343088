"""Fixtures for the framework matrix: each framework's app served by a real fulmen server.

`serve_app(app, **options)` starts an in-process server (as `serve` in tests/conftest.py) on
both loops, with the httptools parser (the parser does not change what a framework sees; the
HTTP/1.1 suites cover both). Subprocess servers (`--workers`, gunicorn) use tests.helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from tests.conftest import TIMEOUT, RunningServer, start_server


@pytest.fixture(params=["asyncio", "uvloop"])
def serve_app(
    request: pytest.FixtureRequest,
) -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """`with serve_app(app, **options) as srv:` on the asyncio and uvloop loops."""
    loop = str(request.param)

    @contextlib.contextmanager
    def start(app: Any, **options: Any) -> Iterator[RunningServer]:
        options.setdefault("http", "httptools")
        yield from start_server(app, loop, options)

    return start


ServeApp = Callable[..., contextlib.AbstractContextManager[RunningServer]]
APP_ERROR = "Exception in ASGI application"  # fulmen's log line for an app that raised


def check_websocket_echo(srv: RunningServer, data: bytes) -> None:
    """The apps' `/ws` echoes text and bytes, and closes with 4000 "see you" on "bye"."""
    uri = f"ws://127.0.0.1:{srv.port}/ws"
    with connect(uri, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        ws.send("hello")
        assert ws.recv(timeout=TIMEOUT) == "hello"
        ws.send(data)
        assert ws.recv(timeout=TIMEOUT) == data
        ws.send("bye")
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "see you")
