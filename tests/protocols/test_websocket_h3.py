"""WebSockets over HTTP/3 (RFC 9220), with aioquic's client and wsproto's frame codec over real
UDP sockets, on both engines and both loops: extended CONNECT, messages both ways, the close
handshake ending the stream, a refused handshake, and requests served alongside."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests.conftest import TIMEOUT, Certs
from tests.protocols.conftest import ServeH3
from tests.protocols.h3client import H3Client, connect, run
from tests.protocols.test_http3 import hello

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["websockets", "wsproto"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def ws_echo(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await hello(scope, receive, send)
        return
    assert (scope["http_version"], scope["scheme"]) == ("3", "wss")
    assert (await receive())["type"] == "websocket.connect"
    if scope["path"] == "/deny":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send({"type": "websocket.accept", "subprotocol": (scope["subprotocols"] or [None])[0]})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "close please":
            await send({"type": "websocket.close", "code": 4001, "reason": "asked"})
            return
        await send({"type": "websocket.send", **{k: v for k, v in message.items() if k != "type"}})


class WebSocket:
    """A WebSocket on one request stream of an `H3Client`."""

    def __init__(self, client: H3Client, path: bytes = b"/ws", headers: Any = ()) -> None:
        self.client = client
        self.frames = FrameProtocol(client=True, extensions=[])
        pseudo = [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path),
            (b"sec-websocket-version", b"13"),
            *headers,
        ]
        self.stream = client.request(pseudo=pseudo, end=False)
        self.response = client.responses[self.stream]
        self.seen = 0

    async def opened(self) -> int:
        while self.response.headers is None and not self.response.done.is_set():
            self.response.data.clear()
            await asyncio.wait_for(self._head_or_end(), TIMEOUT)
        return self.response.status

    async def _head_or_end(self) -> None:
        while self.response.headers is None and not self.response.done.is_set():
            await asyncio.sleep(0.01)

    def send(self, data: bytes) -> None:
        self.client.send(self.stream, bytes(data))

    async def frame(self) -> Any:
        """The next whole WebSocket frame from the server (bounded), as (opcode, payload)."""
        opcode: Any = None
        payload: Any = None
        while True:
            for frame in self.frames.received_frames():
                if opcode is None:
                    opcode, payload = frame.opcode, frame.payload
                else:
                    payload += frame.payload
                if frame.frame_finished:
                    return opcode, payload
            if self.response.done.is_set() and self.seen == len(self.response.body):
                return None
            if self.seen == len(self.response.body):
                self.response.data.clear()
                waiter = asyncio.ensure_future(self.response.data.wait())
                ended = asyncio.ensure_future(self.response.done.wait())
                await asyncio.wait({waiter, ended}, timeout=TIMEOUT, return_when="FIRST_COMPLETED")
                waiter.cancel()
                ended.cancel()
            new = bytes(self.response.body[self.seen :])
            self.seen += len(new)
            self.frames.receive_bytes(new)


def test_echo_and_close(serve_h3: ServeH3, certs: Certs, engine: str) -> None:
    """Text and bytes echo over the stream; the app's close (4001) ends the stream; an
    ordinary request on the same connection is served meanwhile."""

    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            ws = WebSocket(client, headers=[(b"sec-websocket-protocol", b"chat")])
            status = await ws.opened()
            subprotocol = ws.response.header(b"sec-websocket-protocol")
            ws.send(ws.frames.send_data("héllo", fin=True))
            text = await ws.frame()
            ws.send(ws.frames.send_data(b"\x00\x01" * 5000, fin=True))
            binary = await ws.frame()
            plain = await client.get(b"/plain")
            ws.send(ws.frames.send_data("close please", fin=True))
            close = await ws.frame()
            ws.send(ws.frames.close(close[1][0]))
            await client.response(ws.stream)
            return [status, subprotocol, text, binary, plain, close, ws.response]

    with serve_h3(ws_echo, ws=engine) as srv:
        status, subprotocol, text, binary, plain, close, response = run(main(srv.port))
    assert (status, subprotocol) == (200, b"chat")
    assert text == (Opcode.TEXT, "héllo")
    assert binary == (Opcode.BINARY, b"\x00\x01" * 5000)
    assert plain.status == 200 and bytes(plain.body).startswith(b"3 https GET /plain")
    assert close == (Opcode.CLOSE, (4001, "asked"))
    assert response.reset is None  # ended with FIN, not a reset


def test_client_close(serve_h3: ServeH3, certs: Certs, engine: str) -> None:
    """The client's close frame is answered and the app sees websocket.disconnect 1000."""
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        seen.append(await receive())

    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            ws = WebSocket(client)
            assert await ws.opened() == 200
            ws.send(ws.frames.close(1000, "bye"))
            return await ws.frame()

    with serve_h3(app, ws=engine) as srv:
        close = run(main(srv.port))
    assert close[0] is Opcode.CLOSE and close[1][0] == 1000
    assert seen and seen[0]["type"] == "websocket.disconnect" and seen[0]["code"] == 1000


def test_denied_and_unsupported(serve_h3: ServeH3, certs: Certs, engine: str) -> None:
    """A handshake the app refuses gets 403; a :protocol other than websocket gets 501."""

    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            denied = WebSocket(client, b"/deny")
            await client.response(denied.stream)
            other = client.request(
                pseudo=[
                    (b":method", b"CONNECT"),
                    (b":protocol", b"webtransport"),
                    (b":scheme", b"https"),
                    (b":authority", b"localhost"),
                    (b":path", b"/wt"),
                ],
                end=False,
            )
            return [denied.response, await client.response(other)]

    with serve_h3(ws_echo, ws=engine) as srv:
        denied, other = run(main(srv.port))
    assert denied.status == 403
    assert other.status == 501
