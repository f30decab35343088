"""A sync WebSocket chat with rooms:
`fulmen examples.legacy.chat_rooms_sync:consumer --interface consumer`.

The path names the room (`ws://host:8000/lobby`). The consumer runs in a worker thread and
uses the groups methods of `message['channel_layer']`: each connection joins its room, everyone
there hears of arrivals and departures, and each text sent is relayed to the room, prefixed
with the end of the sender's reply channel name.
"""


def consumer(message):
    layer = message["channel_layer"]
    room = "room" + message["path"].replace("/", ".")
    me = message["reply_channel"].name
    event = message["channel"]
    if event == "websocket.connect":
        layer.group_add(room, me)
        # The handshake is accepted when the consumer returns, or by the first data sent.
        layer.send_group(room, {"text": f"* {_short(me)} joined {message['path']}"})
    elif event == "websocket.receive" and message["text"] is not None:
        layer.send_group(room, {"text": f"{_short(me)}: {message['text']}"})
    elif event == "websocket.disconnect":
        layer.group_discard(room, me)
        layer.send_group(room, {"text": f"* {_short(me)} left"})


def _short(name):
    return name[-6:]
