"""Fixtures of the protocol tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Certs, RunningServer, start_server
from tests.protocols.h2peer import (
    App,
    release,
)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """caplog, seeing the `fulmen` loggers even where a logging config stopped propagation."""
    monkeypatch.setattr(logging.getLogger("fulmen"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("fulmen.access"), "propagate", True)
    caplog.set_level(logging.INFO, logger="fulmen")
    caplog.set_level(logging.INFO, logger="fulmen.access")
    yield caplog


@pytest.fixture(autouse=True)
def h2_sockets() -> Iterator[None]:
    """Close the sockets of the test's HTTP/2 clients (`tests.protocols.h2client`)."""
    yield
    from tests.protocols import h2client

    while h2client.OPEN:
        h2client.OPEN.pop().close()


@pytest.fixture
def server(serve_one: Any) -> Iterator[Callable[..., tuple[Any, App]]]:
    """`srv, app = server(**options)`: held apps are released before the server stops."""
    with contextlib.ExitStack() as stack:

        def start(**options: Any) -> tuple[Any, App]:
            app = App()
            srv = stack.enter_context(serve_one(app, **options))
            stack.callback(release, srv, app)  # runs first: the stack unwinds in reverse
            return srv, app

        yield start


ServeH3 = Callable[..., contextlib.AbstractContextManager[RunningServer]]


@pytest.fixture
def serve_h3(loop: str, certs: Certs) -> ServeH3:
    """`with serve_h3(app, **options) as srv:` HTTP/3 on srv.port (UDP) beside TLS on TCP,
    on both loops."""

    @contextlib.contextmanager
    def start(app: Any, **options: Any) -> Iterator[RunningServer]:
        options.setdefault("http", "httptools")
        options.update(ssl_certfile=certs.cert, ssl_keyfile=certs.key, http3=True)
        yield from start_server(app, loop, options)

    return start
