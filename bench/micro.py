"""In-process microbenchmark of the HTTP/1.1 hot path, without sockets.

Drives `H1Connection` with a transport stub that only collects writes, so the figure is the
Python cost of `data_received -> parse -> scope -> app -> write` per request, free of kernel and
load-generator noise. Use it to compare two versions of the code on the same machine; use
`scripts/bench` (real sockets, side by side with uvicorn) for claims about throughput.

    python bench/micro.py [--http httptools|h11] [--app hello|echo] [-n 200000] [--profile]
    python bench/micro.py --app ws [--ws websockets|wsproto]     # one WebSocket echo round trip

With `--app ws` a WebSocket is opened, then each iteration feeds one masked 32-byte text frame
and runs the loop until the echo is written (the app runs as a task, as it does in a server).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from typing import Any

from fulmen import Config
from fulmen.protocols import dispatch
from fulmen.protocols.http1 import H1Connection
from fulmen.state import ServerState

GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: micro\r\nAccept: */*\r\n\r\n"
POST = (
    b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/octet-stream\r\n"
    b"Content-Length: 4096\r\n\r\n" + b"x" * 4096
)
HELLO_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
}
HELLO_BODY = {"type": "http.response.body", "body": b"Hello, world!"}
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
_MASK = b"\x01\x02\x03\x04"
# One masked text frame of 32 bytes, as a client sends it (RFC 6455 §5.3).
WS_FRAME = b"\x81\xa0" + _MASK + bytes(b ^ _MASK[i % 4] for i, b in enumerate(b"x" * 32))


async def hello(scope: Any, receive: Any, send: Any) -> None:
    await send(HELLO_START)
    await send(HELLO_BODY)


async def echo(scope: Any, receive: Any, send: Any) -> None:
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def ws_echo(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": message["text"]})


class StubTransport:
    def __init__(self) -> None:
        self.written = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name)


async def drive_ws(http: str, ws: str, n: int) -> float:
    config = Config(ws_echo, http=http, ws=ws, access_log=False)
    state = ServerState(config, ws_echo, {}, asyncio.get_running_loop())
    conn = H1Connection(state)
    transport = StubTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(UPGRADE)
    for _ in range(10):
        await asyncio.sleep(0)
    protocol = transport.protocol
    start = time.perf_counter()
    for _ in range(n):
        written = transport.written
        protocol.data_received(WS_FRAME)
        while transport.written == written:
            await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    assert not transport.closed
    return elapsed


async def drive(http: str, app_name: str, n: int, ws: str) -> float:
    if app_name == "ws":
        return await drive_ws(http, ws, n)
    app = hello if app_name == "hello" else echo
    request = GET if app_name == "hello" else POST
    config = Config(app, http=http, access_log=False)
    state = ServerState(config, app, {}, asyncio.get_running_loop())
    if config.use_http2:  # as the server does: HTTP/1.1 connections then look for h2c
        dispatch.enable_http2(state)
    conn = H1Connection(state)
    transport = StubTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    start = time.perf_counter()
    for _ in range(n):
        conn.data_received(request)
        if conn.cycle is not None:  # the app waited: let the loop finish it
            await asyncio.sleep(0)
            while conn.cycle is not None:
                await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    assert not transport.closed and transport.written > 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", default="httptools")
    parser.add_argument("--app", default="hello", choices=["hello", "echo", "ws"])
    parser.add_argument("--ws", default="websockets", choices=["websockets", "wsproto"])
    parser.add_argument("-n", type=int, default=200_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
    elapsed = asyncio.run(drive(args.http, args.app, args.n, args.ws))
    if args.profile:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    name = f"{args.app} ({args.ws})" if args.app == "ws" else args.app
    print(f"{args.http} {name}: {elapsed / args.n * 1e6:.2f} us/request")


if __name__ == "__main__":
    main()
