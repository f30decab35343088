"""Channels-style consumers (`--interface consumer`), served as ASGI3.

The two shapes of the 2017-era "message/channels" documentation:

- `def consumer(message)`: synchronous, run in a thread pool. It replies with
  `message['reply_channel'].send({...})`; `message['channel_layer'].loop` lets it defer work to
  the event loop, whose replies (the same synchronous `send`) are queued, never blocking it.
- `async def consumer(message, channels)`: runs on the event loop and replies with
  `await channels['reply'].send({...})` (`message['reply_channel']` is the same channel).

HTTP requests come as one `http.request` message (the async form reads the rest of the body from
`channels['body']`); WebSockets as one message per event (`websocket.connect`,
`websocket.receive`, `websocket.disconnect`). Reply channels can join named groups, and a
reply sent to a group goes to each member (`channels['groups']`, or the `channel_layer` group
methods of the sync form). The modules: `formats` (messages and replies), `channels` (reply and
body channels, the outbox), `layer` (`channel_layer`), `groups` (the group registry), `http`
and `websocket` (serving one request or connection), `middleware` (`ConsumerMiddleware`).
"""

from fulmen.consumers.middleware import ConsumerMiddleware

__all__ = ["ConsumerMiddleware"]
