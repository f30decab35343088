"""Applications for the worker process tests: `python -m fulmen tests.apps_workers:NAME`.

`app` answers every request with the worker's process id; `/block` blocks the worker's event
loop (as a CPU-bound or synchronous call in an async app would) and `/forever` never answers.
A WebSocket is accepted, told the worker's process id and kept open until the client or the
server closes it.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from tests.apps import _lifespan


async def app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": str(os.getpid())})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        return
    path = scope["path"]
    if path == "/block":
        print(f"blocking worker {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(60)
    elif path == "/forever":
        print(f"forever request started in {os.getpid()}", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})


async def startup_fails(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "database unreachable"})


async def _until_shutdown(scope: Any, receive: Any, send: Any, how: str) -> bool:
    """Serve like `app`; for the lifespan scope, start, then wait for the shutdown event and
    say so (`shutdown <how> in <pid>`): True then."""
    if scope["type"] != "lifespan":
        await app(scope, receive, send)
        return False
    await receive()
    await send({"type": "lifespan.startup.complete"})
    await receive()
    print(f"shutdown {how} in {os.getpid()}", file=sys.stderr, flush=True)
    return True


async def shutdown_hangs(scope: Any, receive: Any, send: Any) -> None:
    """Serves like `app`, but its lifespan shutdown never completes."""
    if await _until_shutdown(scope, receive, send, "hangs"):
        await asyncio.Event().wait()


async def shutdown_blocks(scope: Any, receive: Any, send: Any) -> None:
    """Serves like `app`, but its lifespan shutdown blocks the event loop for 60 s: nothing
    in the process can end it."""
    if await _until_shutdown(scope, receive, send, "blocks"):
        time.sleep(60)


async def fails_when_flagged(scope: Any, receive: Any, send: Any) -> None:
    """`app`, whose lifespan startup fails while the file $FULMEN_TEST_FAIL_FLAG exists."""
    if scope["type"] != "lifespan":
        await app(scope, receive, send)
        return
    await receive()
    if os.path.exists(os.environ["FULMEN_TEST_FAIL_FLAG"]):
        await send({"type": "lifespan.startup.failed", "message": "broken deploy"})
        return
    await send({"type": "lifespan.startup.complete"})
    await receive()
    await send({"type": "lifespan.shutdown.complete"})
