"""An ASGI application served through `fulmen.adapters.WSGIAdapter`, for the adapter tests:
in-process under `wsgiref`, and `python -m gunicorn -k sync tests.apps_adapters:wsgi_app`.

Routes: `/` hello; `/scope` the scope as JSON; `/upload` reads the body message by message;
`/stream?<file>` sends a chunk, waits for `<file>` to exist, sends another; `/error` raises
before answering; `/error-after` raises after a first body chunk; `/status` a 201 with
custom and hop-by-hop headers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from fulmen.adapters import WSGIAdapter


async def _send_json(send: Any, data: Any, status: int = 200) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _upload(receive: Any, send: Any) -> None:
    digest = hashlib.sha256()
    sizes = []
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        digest.update(message["body"])
        sizes.append(len(message["body"]))
        if not message["more_body"]:
            break
    await _send_json(send, {"sizes": sizes, "sha256": digest.hexdigest()})


async def _stream(scope: Any, send: Any) -> None:
    flag = scope["query_string"].decode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first-chunk;", "more_body": True})
    for _ in range(1000):  # the test creates the file once it has read the first chunk
        if os.path.exists(flag):
            break
        await asyncio.sleep(0.01)
    await send({"type": "http.response.body", "body": b"second-chunk;", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": True})  # skipped
    await send({"type": "http.response.body", "body": b"last"})


def _scope_info(scope: Any) -> dict[str, Any]:
    return {
        "method": scope["method"],
        "path": scope["path"],
        "raw_path": scope["raw_path"] and scope["raw_path"].decode("latin-1"),
        "root_path": scope["root_path"],
        "query_string": scope["query_string"].decode("latin-1"),
        "scheme": scope["scheme"],
        "http_version": scope["http_version"],
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
        "server": scope["server"],
        "client": scope["client"],
        "state": scope["state"],
    }


async def app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    route = scope["path"][len(scope["root_path"]) :]
    if route == "/scope":
        await _send_json(send, _scope_info(scope))
    elif route == "/upload":
        await _upload(receive, send)
    elif route == "/stream":
        await _stream(scope, send)
    elif route == "/error":
        raise ValueError("boom before the response")
    elif route == "/error-after":
        headers = [(b"content-length", b"100")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise ValueError("boom after the response started")
    elif route == "/status":
        headers = [
            (b"x-custom", b"one"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"connection", b"keep-alive"),  # hop-by-hop: the WSGI server's business
            (b"transfer-encoding", b"chunked"),
        ]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"created"})
    else:
        headers = [(b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello"})


wsgi_app = WSGIAdapter(app)
