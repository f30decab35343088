"""One HTTP request served to a consumer, in either shape."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fulmen.consumers.channels import BodyChannel, Outbox, ReplyChannel, SyncReplyChannel
from fulmen.consumers.formats import HTTPReply, has_body, request_message
from fulmen.consumers.groups import Groups
from fulmen.consumers.layer import ChannelLayer
from fulmen.types import Receive, Scope, Send

_INCOMPLETE = "The consumer returned before its response was complete"


async def serve_async(
    app: Callable[..., Awaitable[None]], groups: Groups, scope: Scope, receive: Receive, send: Send
) -> None:
    """`await app(message, channels)` on the loop, as soon as the request head is in.

    The whole body comes through `channels['body']`, as in the era's server: the message has
    empty `content`/`body`, and `more_content` says whether there is a body to read. (Era code
    read the body only from the channel, so a first chunk in the message would be lost.)

    A consumer whose reply channel is in a group may leave its response to the group's
    messages: its response is then awaited after it returns.
    """
    more = has_body(scope)
    message = request_message(scope, b"", more)
    reply = HTTPReply()
    channel = ReplyChannel(reply, send)
    message["reply_channel"] = channel
    channels = {"reply": channel, "body": BodyChannel(receive, more), "groups": groups.channel}
    with groups.serving(channel):
        await app(message, channels)
        if reply.complete:
            return
        if not groups.joined(channel.name):
            raise RuntimeError(_INCOMPLETE)
        if await _read_body(receive) is not None:  # the rest of a body the consumer left
            await receive()  # http.disconnect: the response is complete or the client left


async def serve_sync(
    run: Callable[[dict[str, Any]], Awaitable[None]],
    groups: Groups,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """`run(message)` in a worker thread, with the whole body in the message.

    A consumer that read `message['channel_layer'].loop`, or whose reply channel is in a group,
    may leave its reply to work it scheduled there or to the group's messages: its response is
    then awaited after it returns.
    """
    body = await _read_body(receive)
    if body is None:
        return  # the client left before the body was complete: nobody to answer
    loop = asyncio.get_running_loop()
    reply = HTTPReply()
    outbox = Outbox(send, loop)
    layer = ChannelLayer(loop, groups)
    channel = SyncReplyChannel(reply, outbox, loop)
    message = request_message(scope, body, False)
    message["reply_channel"] = channel
    message["channel_layer"] = layer
    with groups.serving(channel):
        await run(message)
        if layer.used or groups.joined(channel.name):
            await _until_answered(receive, outbox, layer)
        elif outbox.error is not None:
            raise outbox.error
        elif not reply.complete:
            raise RuntimeError(_INCOMPLETE)


async def _read_body(receive: Receive) -> bytes | None:
    body = bytearray()
    while True:
        chunk = await receive()
        if chunk["type"] != "http.request":
            return None
        body += chunk.get("body", b"")
        if not chunk.get("more_body", False):
            return bytes(body)


async def _until_answered(receive: Receive, outbox: Outbox, layer: ChannelLayer) -> None:
    """Wait until the response is complete or the client left (after the body, `receive()`
    returns `http.disconnect` on either, as the ASGI spec says); a failed send or a failed task
    started through the channel layer ends the wait as an error instead."""
    gone = asyncio.ensure_future(receive())
    try:
        await asyncio.wait((gone, outbox.failed, layer.failed), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left = gone.done()
        gone.cancel()
    if outbox.error is not None:
        raise outbox.error
    if not left:
        raise RuntimeError("A task started by the consumer failed before its response was complete")
