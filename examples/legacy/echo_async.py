"""An async consumer that echoes the request body: `fulmen examples.legacy.echo_async:app`.

`auto` recognises the two-argument `(message, channels)` form; `--interface consumer` also works.
"""


async def read_body(message, channels):
    body = message["content"]
    more = message["more_content"]
    while more:
        chunk = await channels["body"].receive()
        body += chunk["content"]
        more = chunk["more_content"]
    return body


async def app(message, channels):
    body = await read_body(message, channels)
    await channels["reply"].send(
        {
            "status": 200,
            "headers": [[b"content-type", b"application/octet-stream"]],
            "content": body,
        }
    )
