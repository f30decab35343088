"""An async consumer streaming its response: `fulmen examples.legacy.stream_async:app`.

Each reply with `more_content: True` is sent at once (chunked to HTTP/1.1 clients); the
response ends with the reply whose `more_content` is false.
"""

import asyncio


async def app(message, channels):
    count = int(message["query_string"] or b"3")
    reply = channels["reply"]
    await reply.send(
        {
            "status": 200,
            "headers": [[b"content-type", b"text/plain"]],
            "content": b"start\n",
            "more_content": True,
        }
    )
    for number in range(count):
        await asyncio.sleep(0)
        await reply.send({"content": f"line {number}\n".encode(), "more_content": True})
    await reply.send({"content": b"end\n", "more_content": False})
