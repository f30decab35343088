"""The least an ASGI server in Python must do per HTTP/1.1 request: a lower bound, not a server.

It parses with httptools, builds the scope (every key ASGI requires, the header list as the
parser gave it), runs the app in an asyncio Task of its own with a copy of one context (as
fulmen must, for frameworks), hands it `receive` and `send`, and writes the head and the body in
one `transport.write`. It checks nothing, supports no body framing but Content-Length, no
pipelining, no `connection: close`, no timeouts, no limits, no logging: every feature fulmen has
is left out. So it serves only the keep-alive scenarios `hello`, `hello-c1000` and `echo4k`.

Serving the benchmark's apps with it measures what a request costs at least under the rules fulmen
keeps, on the same loop and parser; the ratio of that to uvicorn bounds what any Python ASGI
server can reach against uvicorn on this machine.

    python bench/floor.py apps:hello --port 8000 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import importlib
import signal
import sys
from typing import Any

import httptools
import uvloop

REASONS = {200: b"OK", 404: b"Not Found"}


class Floor(asyncio.Protocol):
    def __init__(self, app: Any, context: contextvars.Context) -> None:
        self.app = app
        self.context = context
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.client = transport.get_extra_info("peername")[:2]
        self.server = transport.get_extra_info("sockname")[:2]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        path, _, query = self.url.partition(b"?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": self.parser.get_http_version(),
            "method": self.parser.get_method().decode("ascii"),
            "scheme": "http",
            "path": path.decode("latin-1"),
            "raw_path": path,
            "query_string": query,
            "root_path": "",
            "headers": self.headers,
            "client": self.client,
            "server": self.server,
        }
        body = self.body
        self.url = self.body = b""
        self.headers = []
        asyncio.get_running_loop().create_task(
            Cycle(self.transport, body).run(self.app, scope), context=self.context.copy()
        )


class Cycle:
    def __init__(self, transport: Any, body: bytes) -> None:
        self.transport = transport
        self.body = body
        self.head = b""

    async def run(self, app: Any, scope: dict[str, Any]) -> None:
        await app(scope, self.receive, self.send)

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": self.body, "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status = message["status"]
            lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b""))]
            lines.extend(b"%s: %s\r\n" % (n, v) for n, v in message.get("headers", ()))
            self.head = b"".join(lines) + b"\r\n"
        else:
            self.transport.write(self.head + message.get("body", b""))
            self.head = b""


async def serve(app: Any, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()
    server = await loop.create_server(lambda: Floor(app, context), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    sys.path.insert(0, ".")
    module, _, name = args.app.partition(":")
    app = getattr(importlib.import_module(module), name)
    uvloop.run(serve(app, args.host, args.port))


if __name__ == "__main__":
    main()
