"""WebSocket echo app for the Autobahn|Testsuite run (scripts/autobahn): a raw ASGI3 app.

Every text or binary message is sent back as the same kind until the client disconnects.
HTTP requests get a short plain-text answer. (scripts/autobahn runs it with --lifespan off.)
"""

from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
    elif scope["type"] == "http":
        body = b"Autobahn echo app: connect with a WebSocket.\n"
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
