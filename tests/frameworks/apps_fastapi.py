"""A FastAPI app for tests/frameworks/test_fastapi.py, also served by gunicorn and `--workers`.

`EVENTS` records the lifespan's startup and shutdown; `TEARDOWN`, `BACKGROUND` and `RELEASE`
hold one `threading.Event` per token a test passes, for dependency teardowns and background
tasks that finish after the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import anyio
from fastapi import BackgroundTasks, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

TIMEOUT = 10.0  # the bound on the waits in the app (tests.conftest.TIMEOUT)

EVENTS: list[str] = []
TEARDOWN: defaultdict[str, threading.Event] = defaultdict(threading.Event)
BACKGROUND: defaultdict[str, threading.Event] = defaultdict(threading.Event)
RELEASE: defaultdict[str, threading.Event] = defaultdict(threading.Event)
RELEASED: dict[str, bool] = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    EVENTS.append("startup")
    app.state.pid = os.getpid()
    yield
    EVENTS.append("shutdown")


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


@app.get("/async")
async def async_route() -> dict[str, object]:
    return {"task": asyncio.current_task() is not None, "thread": threading.get_ident()}


@app.get("/sync")
def sync_route() -> dict[str, object]:
    """A plain `def` route: FastAPI runs it in anyio's worker thread."""
    return {"thread": threading.get_ident(), "pid": os.getpid()}


@app.get("/pid")
async def pid(request: Request) -> dict[str, int]:
    return {"pid": os.getpid(), "started_by": request.app.state.pid}


@app.post("/items")
async def create_item(item: Item) -> dict[str, object]:
    return {"name": item.name.upper(), "total": item.price * 2, "tags": sorted(item.tags)}


@app.post("/raw")
async def raw(request: Request) -> dict[str, object]:
    body = await request.body()
    return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@app.get("/stream")
async def stream(parts: int = 3) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        for i in range(parts):
            await asyncio.sleep(0)
            yield f"async {i}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/stream-sync")
def stream_sync(parts: int = 3) -> StreamingResponse:
    """A sync generator: Starlette iterates it in anyio's worker thread."""

    def body() -> Iterator[bytes]:
        for i in range(parts):
            yield f"sync {i}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


def resource(token: str) -> Iterator[str]:
    """A `yield` dependency (sync: run in anyio's worker thread) whose teardown is recorded."""
    yield f"resource {token}"
    TEARDOWN[token].set()


@app.get("/dependency")
def dependency(value: Annotated[str, Depends(resource)]) -> dict[str, str]:
    return {"value": value}


def background_job(token: str) -> None:
    """Waits (bounded) for the test to say it has the response, then records that it did."""
    RELEASED[token] = RELEASE[token].wait(TIMEOUT)
    BACKGROUND[token].set()


@app.get("/background")
async def background(token: str, tasks: BackgroundTasks) -> dict[str, str]:
    tasks.add_task(background_job, token)
    return {"queued": token}


@app.get("/background/{token}")
async def background_result(token: str) -> dict[str, object]:
    return {"done": BACKGROUND[token].is_set(), "released": RELEASED.get(token)}


if sys.version_info >= (3, 11):

    @app.get("/timeout")
    async def timeout_route(seconds: float = 0.0) -> dict[str, object]:
        """`asyncio.timeout` needs the current Task: it cancels it when the time is up."""
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(seconds)
        except TimeoutError:
            return {"timed_out": True}
        return {"timed_out": False}


@app.get("/fail-after")
async def fail_after(seconds: float = 0.0) -> dict[str, object]:
    """anyio's cancel scope, on every Python version."""
    try:
        with anyio.fail_after(0.05):
            await asyncio.sleep(seconds)
    except TimeoutError:
        return {"timed_out": True, "task": asyncio.current_task() is not None}
    return {"timed_out": False, "task": asyncio.current_task() is not None}


@app.get("/error")
async def error() -> None:
    raise RuntimeError("boom from a FastAPI route")


@app.get("/sync-error")
def sync_error() -> None:
    raise RuntimeError("boom from a FastAPI def route")


@app.websocket("/ws")
async def ws_echo(websocket: WebSocket) -> None:
    """Echoes text and bytes; "bye" closes with code 4000."""
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") == "bye":
                await websocket.close(code=4000, reason="see you")
                return
            if message.get("text") is not None:
                await websocket.send_text(message["text"])
            else:
                await websocket.send_bytes(message["bytes"])
    except WebSocketDisconnect:
        return
