"""One WebSocket served to a consumer, in the ASGI 1 (channels 1.x) message format.

Built on the ASGI 3 WebSocket scope, `receive` and `send` of the server. The consumer is called
once per event, in order and one at a time: `websocket.connect` (order 0), each
`websocket.receive` (order 1, 2, ...) and `websocket.disconnect`. A connect consumer that
returns without answering the handshake accepts the connection, unless it read
`message['channel_layer'].loop` (sync form): then the answer of the work it deferred there is
awaited, or the client's departure. Deferred work that fails (a task that raises, a queued
reply that cannot be sent) fails the connection as a raising consumer would: 500 before the
handshake is answered, close code 1011 after.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fulmen.consumers.channels import Call, Outbox, ReplyChannel, SyncReplyChannel
from fulmen.consumers.formats import WebSocketReply, connect_fields, receive_fields
from fulmen.consumers.groups import Groups
from fulmen.consumers.layer import ChannelLayer
from fulmen.types import Message, Receive, Scope, Send


def _dropping_departed(send: Send) -> Send:
    """`send`, except that replies to a closed WebSocket are dropped (the ASGI spec has the
    server raise an OSError for them), as the era's channel layers dropped them."""

    async def send_open(message: Message) -> None:
        with contextlib.suppress(OSError):
            await send(message)

    return send_open


class ConsumerWebSocket:
    """One connection: builds each event's message and calls the consumer with it."""

    __slots__ = (
        "_call",
        "_channels",
        "_fields",
        "_outbox",
        "_receive",
        "_scope",
        "channel",
        "layer",
        "order",
        "reply",
    )

    def __init__(
        self,
        call: Call,
        asynchronous: bool,
        groups: Groups,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        loop = asyncio.get_running_loop()
        send = _dropping_departed(send)
        self.reply = WebSocketReply(loop)
        self._call = call
        self._scope = scope
        self._receive = receive
        self.order = 0
        self.layer: ChannelLayer | None = None
        self._outbox: Outbox | None = None
        self.channel: ReplyChannel | SyncReplyChannel
        if asynchronous:
            self.channel = ReplyChannel(self.reply, send)
            self._channels: dict[str, Any] = {"reply": self.channel, "groups": groups.channel}
            self._fields: dict[str, Any] = {"reply_channel": self.channel}
        else:
            self._outbox = Outbox(send, loop)
            self.layer = ChannelLayer(loop, groups)
            self.channel = SyncReplyChannel(self.reply, self._outbox, loop)
            self._channels = {}
            self._fields = {"reply_channel": self.channel, "channel_layer": self.layer}
        self._fields["path"] = scope["path"]

    async def run(self) -> None:
        await self._receive()  # websocket.connect: the handshake waits for an answer
        await self._event("websocket.connect", connect_fields(self._scope))
        receiving = None
        if not self.reply.answered.done():
            if self.layer is not None and self.layer.used:
                receiving = await self._watch(self.reply.answered)  # the deferred answer
            else:
                await self.channel.put({"accept": True})
        if self.reply.refused:
            if receiving is not None:
                receiving.cancel()
            return
        while True:
            event = await self._next(receiving)
            receiving = None
            if event["type"] == "websocket.disconnect":
                await self._event("websocket.disconnect", {"code": event.get("code", 1005)})
                return
            await self._event("websocket.receive", receive_fields(event))

    async def _next(self, receiving: asyncio.Future[Message] | None) -> Message:
        """The next event, from `receiving` if a `receive()` was started already."""
        if receiving is None:
            if self._outbox is None:
                return await self._receive()
            receiving = await self._watch()
        return await receiving

    async def _watch(self, *also: asyncio.Future[None]) -> asyncio.Future[Message]:
        """Wait for the next event, or one of `also`, watching the sync form's deferred work
        meanwhile: a reply the loop queued that failed to send, or a failed task started
        through the channel layer, fails the connection. Returns the `receive()` started."""
        receiving = asyncio.ensure_future(self._receive())
        assert self._outbox is not None and self.layer is not None
        try:
            waits: list[asyncio.Future[Any]] = [receiving, *also, self._outbox.failed]
            waits.append(self.layer.failed)
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            self._check()
        except BaseException:
            receiving.cancel()
            raise
        return receiving

    async def _event(self, channel: str, fields: dict[str, Any]) -> None:
        message = {**self._fields, **fields, "channel": channel, "order": self.order}
        self.order += 1
        await self._call(message, self._channels)
        self._check()

    def _check(self) -> None:
        """Raise the failure of the sync form's deferred work, if it failed."""
        outbox, layer = self._outbox, self.layer
        if outbox is not None and outbox.error is not None:
            raise outbox.error
        if layer is not None and layer.failed.done():
            raise RuntimeError("A task started by the consumer failed")


async def serve_websocket(
    call: Call, asynchronous: bool, groups: Groups, scope: Scope, receive: Receive, send: Send
) -> None:
    """Serve the WebSocket of `scope` to the consumer `call` calls; its reply channel may join
    groups until the connection ends."""
    websocket = ConsumerWebSocket(call, asynchronous, groups, scope, receive, send)
    with groups.serving(websocket.channel):
        await websocket.run()
