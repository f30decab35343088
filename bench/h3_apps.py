"""The apps of `bench/h3.py`, raw ASGI3 (no framework), for any server to load as `h3_apps:NAME`.

- `hello`: 200, `text/plain`, `Hello, world!` on every HTTP request (the body is not read).
"""

from __future__ import annotations

from typing import Any

HELLO_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
}
HELLO_BODY = {"type": "http.response.body", "body": b"Hello, world!"}


async def hello(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send(HELLO_START)
        await send(HELLO_BODY)
    elif scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
