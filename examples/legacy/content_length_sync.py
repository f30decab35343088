"""A sync consumer framing its own response:
`fulmen examples.legacy.content_length_sync:consumer --interface consumer`.

It returns what `send` returns, as consumers often did, and sets `content-length` itself, so the
response is sent with that length rather than the one fulmen would compute.
"""

import json


def consumer(message):
    body = json.dumps(
        {
            "method": message["method"],
            "path": message["path"],
            "received": len(message["content"]),
        }
    ).encode()
    return message["reply_channel"].send(
        {
            "status": 200,
            "headers": [
                [b"content-type", b"application/json"],
                [b"content-length", str(len(body)).encode()],
            ],
            "content": body,
        }
    )
