"""A Starlette app for tests/frameworks/test_starlette.py.

`FILE_PATH` is the file `/file` serves (a test points it at a file in its tmp_path), and that
`/file-gone` and `/file-shrinks` change after Starlette has its size;
`EVENTS` records the lifespan's startup and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

FILE_PATH: Path | None = None
EVENTS: list[str] = []

Next = Callable[[Request], Awaitable[Response]]


class Tag(BaseHTTPMiddleware):
    """Adds an `x-middleware: <name>` header to every response."""

    def __init__(self, app: Any, name: str) -> None:
        super().__init__(app)
        self.name = name

    async def dispatch(self, request: Request, call_next: Next) -> Response:
        response = await call_next(request)
        response.headers.append("x-middleware", self.name)
        return response


async def user(request: Request) -> JSONResponse:
    return JSONResponse(
        {"user": request.path_params["user_id"], "q": request.query_params.get("q")}
    )


async def echo(request: Request) -> Response:
    return Response(await request.body(), media_type="application/octet-stream")


async def count(request: Request) -> JSONResponse:
    """The request body read chunk by chunk with `request.stream()`."""
    size = chunks = 0
    async for chunk in request.stream():
        size += len(chunk)
        chunks += bool(chunk)
    return JSONResponse({"size": size, "chunks": chunks})


async def stream(request: Request) -> StreamingResponse:
    parts = int(request.query_params.get("parts", "3"))

    async def body() -> AsyncIterator[bytes]:
        for i in range(parts):
            yield f"part {i}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


async def late_end(request: Request) -> StreamingResponse:
    """The whole body (per Content-Length) goes out at once; the app returns a bit later."""

    async def body() -> AsyncIterator[bytes]:
        yield b"complete"
        await asyncio.sleep(0.2)

    return StreamingResponse(body(), headers={"content-length": "8"})


async def file(request: Request) -> FileResponse:
    assert FILE_PATH is not None, "the test sets apps_starlette.FILE_PATH"
    return FileResponse(FILE_PATH, media_type="application/octet-stream")


async def file_changed(request: Request) -> FileResponse:
    """`FILE_PATH` as it was when stat'ed, after which it is deleted (`/file-gone`) or cut
    to half its size (`/file-shrinks`), as another process might do meanwhile."""
    assert FILE_PATH is not None, "the test sets apps_starlette.FILE_PATH"
    stat_result = os.stat(FILE_PATH)
    if request.url.path == "/file-gone":
        os.unlink(FILE_PATH)
    else:
        os.truncate(FILE_PATH, stat_result.st_size // 2)
    return FileResponse(FILE_PATH, stat_result=stat_result)


async def state(request: Request) -> JSONResponse:
    return JSONResponse(
        {"request_state": request.state.greeting, "app_state": request.app.state.started}
    )


async def error(request: Request) -> Response:
    raise RuntimeError("boom from a Starlette route")


async def ws_echo(websocket: WebSocket) -> None:
    """Echoes text and bytes; "bye" closes with code 4000."""
    await websocket.accept()
    while True:
        try:
            message = await websocket.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "bye":
            await websocket.close(code=4000, reason="see you")
            return
        if message.get("text") is not None:
            await websocket.send_text(message["text"])
        else:
            await websocket.send_bytes(message["bytes"])


async def sub_hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello from the sub-app")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    EVENTS.append("startup")
    app.state.started = True
    yield {"greeting": "hello from the lifespan"}
    EVENTS.append("shutdown")


# A sub-app with its own BaseHTTPMiddleware: under the old eager start this failed with anyio's
# NoEventLoopError.
sub_app = Starlette(routes=[Route("/hello", sub_hello)], middleware=[Middleware(Tag, name="sub")])

app = Starlette(
    routes=[
        Route("/users/{user_id:int}", user),
        Route("/echo", echo, methods=["POST"]),
        Route("/count", count, methods=["POST"]),
        Route("/stream", stream),
        Route("/late-end", late_end),
        Route("/file", file, methods=["GET", "HEAD"]),
        Route("/file-gone", file_changed),
        Route("/file-shrinks", file_changed),
        Route("/state", state),
        Route("/error", error),
        WebSocketRoute("/ws", ws_echo),
        Mount("/sub", app=sub_app),
    ],
    middleware=[Middleware(Tag, name="app")],
    lifespan=lifespan,
)
