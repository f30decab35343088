"""The apps of `bench/files.py`: the file named by `$BENCH_FILE`, served whole on every GET.

- `starlette`: Starlette's `FileResponse`, which sends `http.response.pathsend` where the server
  offers it and otherwise reads the file in a thread pool and sends it in 64 KiB messages.
- `starlette_stat`: the same with the file's `os.stat` result given (taken once, at import), so
  that `FileResponse` does not hop to a worker thread for it on each request;
- `pathsend`: a raw ASGI app sending `http.response.pathsend`, or, where the server does not
  offer it, the file read in 256 KiB messages (as an app without the extension must).
"""

from __future__ import annotations

import os
from typing import Any

from starlette.responses import FileResponse

PATH = os.environ["BENCH_FILE"]
CHUNK = 256 * 1024


async def starlette(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await FileResponse(PATH, media_type="application/octet-stream")(scope, receive, send)


STAT = os.stat(PATH)


async def starlette_stat(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        response = FileResponse(PATH, media_type="application/octet-stream", stat_result=STAT)
        await response(scope, receive, send)


async def pathsend(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    size = os.stat(PATH).st_size
    headers = [(b"content-type", b"application/octet-stream"), (b"content-length", b"%d" % size)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if "http.response.pathsend" in scope.get("extensions", {}):
        await send({"type": "http.response.pathsend", "path": PATH})
        return
    with open(PATH, "rb") as file:
        while chunk := file.read(CHUNK):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
