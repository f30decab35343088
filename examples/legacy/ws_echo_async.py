"""An async WebSocket echo: `fulmen examples.legacy.ws_echo_async:app`.

It handles only `websocket.receive`: the connection is accepted because the consumer returns
from `websocket.connect` without refusing it, and `websocket.disconnect` needs nothing.
"""


async def app(message, channels):
    if message["channel"] != "websocket.receive":
        return
    if message["text"] is not None:
        await channels["reply"].send({"text": message["text"]})
    else:
        await channels["reply"].send({"bytes": message["bytes"]})
