"""A sync WebSocket consumer that accepts, greets and echoes:
`fulmen examples.legacy.ws_greet_sync:consumer --interface consumer`.

Each event arrives in a worker thread, one at a time and in order (`message['order']`). Sending
`bye` closes the connection with code 4000 after the last echo.
"""


def consumer(message):
    reply = message["reply_channel"]
    channel = message["channel"]
    if channel == "websocket.connect":
        reply.send({"accept": True})
        reply.send({"text": f"hello, you are on {message['path']}"})
    elif channel == "websocket.receive":
        text = message["text"]
        if text is None:
            reply.send({"bytes": message["bytes"]})
        elif text == "bye":
            reply.send({"text": f"bye after {message['order']} messages", "close": 4000})
        else:
            reply.send({"text": text})
