"""Applications for the gunicorn worker tests: `gunicorn -k fulmen.workers.FulmenWorker
tests.apps_gunicorn:app` (cwd = the repo).

Markers go to stderr (gunicorn's error log is stderr too), each with the worker's pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any


def marker(text: str) -> None:
    # One write per line: print() writes the newline separately, and other processes share
    # this stderr (a line of another process could land between the two).
    os.write(sys.stderr.fileno(), f"{text} {os.getpid()}\n".encode())


async def _lifespan(scope: Any, receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            scope["state"]["started_by"] = os.getpid()
            marker("lifespan startup")
            await send({"type": "lifespan.startup.complete"})
        else:
            marker("lifespan shutdown")
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _websocket(receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": f"{os.getpid()} {message.get('text')}"})


async def app(scope: Any, receive: Any, send: Any) -> None:
    """JSON about the worker; `/slow?<seconds>` awaits first, `/block?<seconds>` blocks the
    loop first; WebSockets echo."""
    if scope["type"] == "lifespan":
        await _lifespan(scope, receive, send)
        return
    if scope["type"] == "websocket":
        await _websocket(receive, send)
        return
    if scope["path"] == "/slow":
        marker("slow request started")
        await asyncio.sleep(float(scope["query_string"] or 1))
    elif scope["path"] == "/block":
        time.sleep(float(scope["query_string"] or 1))  # blocks the event loop: no heartbeat
    body = {
        "pid": os.getpid(),
        "started_by": scope["state"].get("started_by"),
        "loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        "root_path": scope["root_path"],
        "scheme": scope["scheme"],
    }
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def failing_startup(scope: Any, receive: Any, send: Any) -> None:
    """An application whose lifespan startup fails."""
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "no database"})


def slow_factory() -> Any:
    """`tests.apps_gunicorn:slow_factory()`: gunicorn calls it while loading, before any loop
    runs; it takes a second."""
    marker("factory called")
    time.sleep(1)
    return app


def _fastapi_app() -> Any:
    """A FastAPI app whose lifespan writes `shutdown-<pid>` into `$TEST_MARKER_DIR` when
    it ends (`fastapi_app`)."""
    from contextlib import asynccontextmanager
    from pathlib import Path

    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        marker("fastapi startup")
        yield
        Path(os.environ["TEST_MARKER_DIR"], f"shutdown-{os.getpid()}").write_text("done")
        marker("fastapi shutdown")

    api = FastAPI(lifespan=lifespan)

    @api.get("/")
    async def root() -> dict[str, int]:
        return {"pid": os.getpid()}

    @api.get("/slow")
    async def slow() -> dict[str, int]:
        marker("slow request started")
        await asyncio.sleep(1)
        return {"pid": os.getpid()}

    return api


def __getattr__(name: str) -> Any:
    if name == "fastapi_app":  # built when asked for: the other apps need no FastAPI
        return _fastapi_app()
    raise AttributeError(name)


def _h3_worker() -> type:
    from fulmen.workers import FulmenWorker

    class H3Worker(FulmenWorker):
        """Fulmen's worker with HTTP/3 on (gunicorn has no setting for it)."""

        CONFIG_KWARGS = {**FulmenWorker.CONFIG_KWARGS, "http3": True}

    return H3Worker


H3Worker = _h3_worker()
