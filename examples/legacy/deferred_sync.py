"""A sync consumer that leaves its reply to the event loop:
`fulmen examples.legacy.deferred_sync:consumer --interface consumer`.

The consumer only schedules `answer_later` on `message['channel_layer'].loop` and returns; the
coroutine replies after a pause with the same synchronous `reply_channel.send`, which on the
event loop queues the reply instead of blocking. `?delay=0.5` sets the pause in seconds.
"""

import asyncio
from urllib.parse import parse_qs


async def answer_later(message, delay):
    reply = message["reply_channel"]
    reply.send(
        {
            "status": 200,
            "headers": [[b"content-type", b"text/plain"]],
            "content": b"waiting...\n",
            "more_content": True,
        }
    )
    await asyncio.sleep(delay)
    reply.send({"content": f"done after {delay} s\n".encode(), "more_content": False})


def consumer(message):
    query = parse_qs(message["query_string"].decode("latin-1"))
    delay = float(query.get("delay", ["0.1"])[0])
    loop = message["channel_layer"].loop
    loop.create_task(answer_later(message, delay))
