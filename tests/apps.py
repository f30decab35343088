"""Applications for the subprocess tests: `python -m fulmen tests.apps:NAME` (cwd = the repo).

Apps print a marker line to stderr when a slow request has started, so a test can wait for the
request to be in flight before it signals the server.
"""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace
from typing import Any


def marker(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        else:
            await send({"type": "lifespan.shutdown.complete"})
            return


async def pathsend(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the file its query string names, by ASGI pathsend."""
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.pathsend", "path": scope["query_string"].decode()})


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with its path; `/slow` takes 0.5 s and `/forever` never answers."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    path = scope["path"]
    if path == "/slow":
        marker("slow request started")
        await asyncio.sleep(0.5)
    elif path == "/forever":
        marker("forever request started")
        await asyncio.Event().wait()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": path.encode()})


def create_app() -> Any:
    """An application factory, for `--factory`."""
    return app


namespace = SimpleNamespace(inner=SimpleNamespace(app=app))  # `tests.apps:namespace.inner.app`

not_callable = 42


async def startup_fails(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "database unreachable"})


async def startup_raises(scope: Any, receive: Any, send: Any) -> None:
    raise RuntimeError("no lifespan here")
