"""A Quart app for tests/frameworks/test_quart.py.

`EVENTS` records `before_serving` and `after_serving`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from quart import Quart, Response, request, websocket

EVENTS: list[str] = []

app = Quart(__name__)


@app.before_serving
async def before_serving() -> None:
    EVENTS.append("before_serving")


@app.after_serving
async def after_serving() -> None:
    EVENTS.append("after_serving")


@app.post("/echo")
async def echo() -> Response:
    return Response(await request.get_data(), content_type="application/octet-stream")


@app.get("/stream")
async def stream() -> Response:
    parts = request.args.get("parts", 3, type=int)

    async def body() -> AsyncIterator[bytes]:
        for i in range(parts):
            await asyncio.sleep(0)
            yield f"part {i}\n".encode()

    return Response(body(), content_type="text/plain")


@app.get("/hello")
async def hello() -> str:
    return "hello"


@app.get("/error")
async def error() -> str:
    raise RuntimeError("boom from a Quart route")


@app.websocket("/ws")
async def ws_echo() -> None:
    """Echoes text and bytes; "bye" closes with code 4000."""
    while True:
        message = await websocket.receive()
        if message == "bye":
            await websocket.close(4000, "see you")
            return
        await websocket.send(message)
