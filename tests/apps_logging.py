"""Apps for the logging configuration tests (tests/test_logging_config.py)."""

from __future__ import annotations

from typing import Any


async def app(scope: Any, receive: Any, send: Any) -> None:
    """`/boom` raises; any other path is answered in two body chunks with an `x-id` header."""
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept", "headers": [(b"x-id", b"ws")]})
        await send({"type": "websocket.close"})
        return
    if scope["path"] == "/boom":
        raise RuntimeError("boom\ninjected line")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-id", b"seven")]})
    await send({"type": "http.response.body", "body": b"hello ", "more_body": True})
    await send({"type": "http.response.body", "body": b"world"})
