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

from tests.conftest import RunningServer, _start


@pytest.fixture(params=["asyncio", "uvloop"])
def serve_app(
    request: pytest.FixtureRequest,
) -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """`with serve_app(app, **options) as srv:` on the asyncio and uvloop loops."""
    loop = str(request.param)

    @contextlib.contextmanager
    def start(app: Any, **options: Any) -> Iterator[RunningServer]:
        options.setdefault("http", "httptools")
        yield from _start(app, loop, options)

    return start
