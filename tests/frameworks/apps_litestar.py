"""A Litestar app for tests/frameworks/test_litestar.py.

`EVENTS` records the startup and shutdown hooks.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from litestar import Litestar, Request, WebSocket, get, post, websocket
from litestar.params import Body
from litestar.response import Stream

EVENTS: list[str] = []


@dataclass
class Item:
    name: str
    price: float
    tags: list[str] = field(default_factory=list)


@post("/echo", status_code=200)
async def echo(request: Request) -> bytes:
    return await request.body()


@post("/items", status_code=200)
async def create_item(data: Annotated[Item, Body()]) -> dict[str, object]:
    return {"name": data.name.upper(), "total": data.price * 2, "tags": sorted(data.tags)}


@get("/stream")
async def stream() -> Stream:
    async def body() -> AsyncIterator[bytes]:
        for i in range(5):
            await asyncio.sleep(0)
            yield f"part {i}\n".encode()

    return Stream(body(), media_type="text/plain")


@get("/async")
async def async_route() -> dict[str, int]:
    return {"thread": threading.get_ident()}


@get("/sync", sync_to_thread=True)
def sync_route() -> dict[str, int]:
    """Run in anyio's worker thread."""
    return {"thread": threading.get_ident()}


@get("/error")
async def error() -> None:
    raise RuntimeError("boom from a Litestar route")


@websocket("/ws")
async def ws_echo(socket: WebSocket) -> None:
    """Echoes text and bytes; "bye" closes with code 4000."""
    await socket.accept()
    while True:
        message = await socket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "bye":
            await socket.close(code=4000, reason="see you")
            return
        if message.get("text") is not None:
            await socket.send_text(message["text"])
        else:
            await socket.send_bytes(message["bytes"])


async def startup() -> None:
    EVENTS.append("startup")


async def shutdown() -> None:
    EVENTS.append("shutdown")


app = Litestar(
    route_handlers=[echo, create_item, stream, async_route, sync_route, error, ws_echo],
    on_startup=[startup],
    on_shutdown=[shutdown],
)
