"""`ConsumerMiddleware`: a channels-style consumer served as an ASGI 3 application."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fulmen.consumers.groups import Groups
from fulmen.consumers.http import serve_async, serve_sync
from fulmen.consumers.websocket import serve_websocket
from fulmen.types import Receive, Scope, Send


class ConsumerMiddleware:
    """Serve a channels-style consumer as ASGI3; `asynchronous` picks the two shapes.

    HTTP requests and WebSockets are served; any other scope (lifespan) raises, so
    `--lifespan auto` reports lifespan as unsupported. `groups` is the registry of the groups
    its consumers form (in this process only).
    """

    def __init__(self, app: Callable[..., Any], asynchronous: bool, workers: int = 10) -> None:
        self.app = app
        self.asynchronous = asynchronous
        self.groups = Groups()
        self.executor: ThreadPoolExecutor | None = None
        if not asynchronous:
            self.executor = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="fulmen-consumer"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.asynchronous:
                await serve_async(self.app, self.groups, scope, receive, send)
            else:
                await serve_sync(self.run, self.groups, scope, receive, send)
        elif kind == "websocket":
            await serve_websocket(self.call, self.asynchronous, self.groups, scope, receive, send)
        else:
            raise RuntimeError(f"Consumers cannot serve scope type {kind!r}")

    async def call(self, message: dict[str, Any], channels: dict[str, Any]) -> None:
        """Call the consumer with one message: on the loop, or in the pool (sync form)."""
        if self.asynchronous:
            await self.app(message, channels)
        else:
            await self.run(message)

    async def run(self, message: dict[str, Any]) -> None:
        """Run the sync consumer with `message` in a worker thread."""
        # In a copy of the request's context, as `asyncio.to_thread` runs a function.
        run = contextvars.copy_context().run
        await asyncio.get_running_loop().run_in_executor(self.executor, run, self.app, message)
