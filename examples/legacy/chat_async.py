"""An async WebSocket chat: `fulmen examples.legacy.chat_async:app`.

Each connection's reply channel joins the group `chat` on connect and leaves it on disconnect;
whatever a client sends goes to the whole group, the sender included. Groups live in one server
process: with `--workers N`, a client hears only the clients of its own worker.
"""

CHAT = "chat"


async def app(message, channels):
    groups = channels["groups"]
    me = message["reply_channel"].name
    event = message["channel"]
    if event == "websocket.connect":
        await groups.send({"group": CHAT, "add": me})
    elif event == "websocket.receive":
        # One of `text` and `bytes` is None, and a reply leaves out what is None.
        said = {"text": message["text"], "bytes": message["bytes"]}
        await groups.send({"group": CHAT, "send": said})
    else:  # websocket.disconnect (the reply channel would leave the group anyway)
        await groups.send({"group": CHAT, "discard": me})
