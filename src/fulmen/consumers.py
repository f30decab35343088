"""Channels-style consumers (`--interface consumer`) served as ASGI3.

Two legacy shapes are supported:

- `def consumer(message)`: synchronous, run in a thread pool. The whole request body is read
  first and given as `message['content']`; the consumer replies with
  `message['reply_channel'].send({...})`, which blocks until the message was handed over.
- `async def consumer(message, channels)`: runs on the event loop. `message['content']` is the
  first body chunk and `message['more_content']` says whether more follows;
  `await channels['body'].receive()` returns `{'content', 'more_content'}` for the rest. The
  consumer replies with `await channels['reply'].send({...})` (`message['reply_channel']` is the
  same channel).

A reply is `{'status', 'headers', 'content', 'more_content'}`: the first one starts the response
(`status` defaults to 200, `headers` to none); with `more_content` true, later replies carry more
`content` until one has `more_content` false. Only `http` scopes are served: a WebSocket
handshake is refused (403) and a `lifespan` scope raises, so `--lifespan auto` reports lifespan
as unsupported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fulmen.types import Message, Receive, Scope, Send


def _header_bytes(value: Any) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


class _Reply:
    """Turns reply dicts into `http.response.start` / `http.response.body` messages."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.complete = False

    def messages(self, reply: dict[str, Any]) -> list[Message]:
        if self.complete:
            raise RuntimeError("Reply sent after the response was complete")
        out: list[Message] = []
        if not self.started:
            self.started = True
            headers = [
                (_header_bytes(name).lower(), _header_bytes(value))
                for name, value in reply.get("headers", ())
            ]
            out.append(
                {
                    "type": "http.response.start",
                    "status": int(reply.get("status", 200)),
                    "headers": headers,
                }
            )
        more = bool(reply.get("more_content", False))
        self.complete = not more
        content = reply.get("content", b"")
        if isinstance(content, str):
            content = content.encode("utf-8")
        out.append({"type": "http.response.body", "body": bytes(content), "more_body": more})
        return out

    async def send(self, reply: dict[str, Any]) -> None:
        for message in self.messages(reply):
            await self._send(message)


class ReplyChannel:
    """`channels['reply']` of the async form: `await channel.send(reply)`."""

    def __init__(self, reply: _Reply) -> None:
        self._reply = reply

    async def send(self, reply: dict[str, Any]) -> None:
        await self._reply.send(reply)


class SyncReplyChannel:
    """`message['reply_channel']` of the sync form: `channel.send(reply)` from a worker thread."""

    def __init__(self, reply: _Reply, loop: asyncio.AbstractEventLoop) -> None:
        self._reply = reply
        self._loop = loop

    def send(self, reply: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(self._reply.send(reply), self._loop).result()


class BodyChannel:
    """`channels['body']`: `await channel.receive()` -> `{'content', 'more_content'}`.

    After the last chunk (or once the client has gone) it returns empty content with
    `more_content` false.
    """

    def __init__(self, receive: Receive, more: bool) -> None:
        self._receive = receive
        self._more = more

    async def receive(self) -> dict[str, Any]:
        if not self._more:
            return {"content": b"", "more_content": False}
        message = await self._receive()
        if message["type"] != "http.request":
            self._more = False
            return {"content": b"", "more_content": False}
        self._more = bool(message.get("more_body", False))
        return {"content": message.get("body", b""), "more_content": self._more}


def request_message(scope: Scope, content: bytes, more: bool) -> dict[str, Any]:
    """The legacy request message for an ASGI HTTP scope (without its reply channel)."""
    return {
        "channel": "http.request",
        "http_version": scope["http_version"],
        "method": scope["method"],
        "scheme": scope.get("scheme", "http"),
        "path": scope["path"],
        "root_path": scope.get("root_path", ""),
        "query_string": scope["query_string"],
        "headers": [[name, value] for name, value in scope["headers"]],
        "client": scope.get("client"),
        "server": scope.get("server"),
        "content": content,
        "more_content": more,
    }


class ConsumerMiddleware:
    """Serve a channels-style consumer as ASGI3; `asynchronous` picks the two shapes."""

    def __init__(self, app: Callable[..., Any], asynchronous: bool, workers: int = 10) -> None:
        self.app = app
        self.asynchronous = asynchronous
        self.executor: ThreadPoolExecutor | None = None
        if not asynchronous:
            self.executor = ThreadPoolExecutor(
                max_workers=workers, thread_name_prefix="fulmen-consumer"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        if scope["type"] != "http":
            raise RuntimeError(f"Consumers cannot serve scope type {scope['type']!r}")
        reply = _Reply(send)
        if self.asynchronous:
            first = await receive()
            more = first["type"] == "http.request" and bool(first.get("more_body", False))
            message = request_message(scope, first.get("body", b""), more)
            channel = ReplyChannel(reply)
            message["reply_channel"] = channel
            await self.app(message, {"reply": channel, "body": BodyChannel(receive, more)})
        else:
            body = bytearray()
            while True:
                chunk = await receive()
                if chunk["type"] != "http.request":
                    return  # the client left before the body was complete: nobody to answer
                body += chunk.get("body", b"")
                if not chunk.get("more_body", False):
                    break
            loop = asyncio.get_running_loop()
            message = request_message(scope, bytes(body), False)
            message["reply_channel"] = SyncReplyChannel(reply, loop)
            await loop.run_in_executor(self.executor, self.app, message)
        if not reply.complete:
            raise RuntimeError("The consumer returned before its response was complete")
