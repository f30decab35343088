"""The application behind nginx in `tests/test_nginx.py`: `python -m fulmen tests.apps_nginx:app`.

Every answer is JSON describing what this instance saw: its pid, `scope["client"]`,
`scope["scheme"]` and the raw `X-Forwarded-*` headers nginx sent. `/slow` prints
`slow request started <id>` to stderr (the `x-request-id` header) and takes 1 s, reporting
when it started and finished on the system-wide monotonic clock, so a test can show that a
request spanned the moment it signalled the server. A WebSocket at any path echoes the first
text message inside the same JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

SLOW_SECONDS = 1.0


def _seen(scope: dict[str, Any]) -> dict[str, Any]:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    return {
        "pid": os.getpid(),
        "path": scope["path"],
        "client": list(scope["client"]) if scope["client"] else None,
        "scheme": scope["scheme"],
        "x-forwarded-for": headers.get("x-forwarded-for"),
        "x-forwarded-proto": headers.get("x-forwarded-proto"),
        "request-id": headers.get("x-request-id"),
    }


async def _http(scope: dict[str, Any], send: Any) -> None:
    seen = _seen(scope)
    if scope["path"] == "/slow":
        seen["started"] = time.monotonic()
        print(f"slow request started {seen['request-id']}", file=sys.stderr, flush=True)
        await asyncio.sleep(SLOW_SECONDS)
        seen["finished"] = time.monotonic()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(seen).encode()})


async def _websocket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    message = await receive()
    if message["type"] != "websocket.receive":
        return
    seen = _seen(scope)
    seen["echo"] = message.get("text")
    await send({"type": "websocket.send", "text": json.dumps(seen)})
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await _http(scope, send)
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    else:  # lifespan: nothing to set up
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
