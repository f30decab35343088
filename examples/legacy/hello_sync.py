"""A synchronous consumer: `fulmen examples.legacy.hello_sync:hello_world --interface consumer`.

It runs in a worker thread, so it may block; it replies through `message['reply_channel']`.
"""


def hello_world(message):
    name = message["query_string"].decode("latin-1") or "world"
    body = f"Hello, {name}! ({message['method']} {message['path']})".encode()
    message["reply_channel"].send(
        {
            "status": 200,
            "headers": [[b"content-type", b"text/plain; charset=utf-8"]],
            "content": body,
        }
    )
