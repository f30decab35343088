"""The channels a consumer reads and replies through, and the outbox behind a sync reply channel.

A reply channel turns reply dicts into ASGI messages with a translator (`formats.HTTPReply` or
`formats.WebSocketReply`). The async form sends them at once. The sync form goes through an
`Outbox`, so that a reply sent on the event loop thread (by work a sync consumer deferred there)
can be queued instead of blocking the loop, and replies still leave in the order they were sent.
Each reply channel has a `name`, unique in the process, by which it joins groups (`groups`).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fulmen.consumers.formats import Reply
from fulmen.consumers.layer import on_loop
from fulmen.protocols.flow import wake
from fulmen.types import Message, Receive, Send

# Call the consumer with one message and, for the async form, its `channels` dict.
Call = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]


class Translator(Protocol):
    def messages(self, reply: Reply) -> list[Message]: ...


def reply_channel_name() -> str:
    """A new reply channel name: 96 random bits, so names are unique and cannot be guessed."""
    return f"reply.{secrets.token_hex(12)}"


class ReplyChannel:
    """`channels['reply']` of the async form (also its `message['reply_channel']`):
    `await channel.send(reply)`."""

    __slots__ = ("_send", "_translator", "name")

    def __init__(self, translator: Translator, send: Send) -> None:
        self._translator = translator
        self._send = send
        self.name = reply_channel_name()

    async def send(self, reply: Reply) -> None:
        for message in self._translator.messages(reply):
            await self._send(message)

    put = send  # as a group member


class Outbox:
    """Sends the replies of one sync consumer, in order, from a single task.

    A send that fails breaks the outbox: `error` is set, `failed` is done, the replies still
    queued fail with the same error and later ones raise it, since the response or connection
    is broken anyway.
    """

    __slots__ = ("_items", "_loop", "_send", "_task", "error", "failed")

    def __init__(self, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        self._send = send
        self._loop = loop
        self._items: deque[tuple[list[Message], asyncio.Future[None] | None]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.failed: asyncio.Future[None] = loop.create_future()

    def put(self, messages: list[Message], sent: asyncio.Future[None] | None = None) -> None:
        """Queue `messages` (on the loop thread); `sent` is resolved once they are sent."""
        if self.error is not None:
            raise self.error
        self._items.append((messages, sent))
        if self._task is None:
            self._task = self._loop.create_task(self._drain())

    def queue(self, messages: list[Message]) -> asyncio.Future[None]:
        """Queue `messages`; the future is done once they are sent (flow control applies)."""
        sent = self._loop.create_future()
        self.put(messages, sent)
        return sent

    async def _drain(self) -> None:
        items = self._items
        while items:
            messages, sent = items.popleft()
            try:
                for message in messages:
                    await self._send(message)
            except Exception as exc:
                self._break(exc, sent)
                return
            wake(sent)
        self._task = None

    def _break(self, exc: Exception, sent: asyncio.Future[None] | None) -> None:
        self.error = exc
        self.failed.set_result(None)
        waiting = [sent, *(item[1] for item in self._items)]
        self._items.clear()
        self._task = None
        for future in waiting:
            if future is not None and not future.done():
                future.set_exception(exc)


class SyncReplyChannel:
    """`message['reply_channel']` of the sync form: `channel.send(reply)`.

    From the consumer's worker thread, `send` returns once the server took the reply (so a slow
    client slows the consumer down). On the event loop thread it queues the reply and returns
    at once: blocking there would stop the loop that has to send it.
    """

    __slots__ = ("_loop", "_outbox", "_translator", "name")

    def __init__(
        self, translator: Translator, outbox: Outbox, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._translator = translator
        self._outbox = outbox
        self._loop = loop
        self.name = reply_channel_name()

    def send(self, reply: Reply) -> None:
        if on_loop(self._loop):
            self._outbox.put(self._translator.messages(reply))
        else:
            asyncio.run_coroutine_threadsafe(self._sent(reply), self._loop).result()

    def put(self, reply: Reply) -> asyncio.Future[None]:
        """Queue `reply` after the replies queued before it (on the loop thread, where it
        returns at once); the future is done once it is sent."""
        return self._outbox.queue(self._translator.messages(reply))

    async def _sent(self, reply: Reply) -> None:
        await self.put(reply)


class BodyChannel:
    """`channels['body']`: `await channel.receive()` -> `{'content', 'more_content'}`.

    After the last chunk (or once the client has gone) it returns empty content with
    `more_content` false.
    """

    __slots__ = ("_more", "_receive")

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
