"""WebSockets over HTTP/2 (RFC 8441), with h2's client and wsproto's frame codec over real
sockets, on both engines: extended CONNECT, messages both ways, closing with END_STREAM,
denials, and other streams served alongside."""

from __future__ import annotations

from typing import Any

import h2.errors
import h2.settings
import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from tests.protocols.h2client import H2Client, connect
from tests.protocols.test_http2 import echo

pytestmark = pytest.mark.timeout(60)


async def ws_echo(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await echo(scope, receive, send)
        return
    assert scope["http_version"] == "2"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept", "subprotocol": (scope["subprotocols"] or [None])[0]})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") == "close please":
            await send({"type": "websocket.close", "code": 4001, "reason": "asked"})
            return
        await send({"type": "websocket.send", **{k: v for k, v in message.items() if k != "type"}})


class WSClient:
    """A WebSocket on one stream of an `H2Client`."""

    def __init__(self, client: H2Client, path: str = "/ws", headers: Any = ()) -> None:
        self.client = client
        self.frames = FrameProtocol(client=True, extensions=[])
        block = [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"http"),
            (b":authority", b"test"),
            (b":path", path.encode()),
            *headers,
        ]
        self.stream = client.conn.get_next_available_stream_id()
        client.send_headers(self.stream, block, end_stream=False)
        self.response = client.responses[self.stream]
        self.seen = 0
        self.messages: list[Any] = []

    def opened(self) -> bool:
        return self.client.until(
            lambda: self.response.status != 0 or self.response.reset is not None
        )

    def send(self, data: str | bytes) -> None:
        self.client.send_body(self.stream, self.frames.send_data(data, fin=True), end=False)

    def close(self, code: int = 1000) -> None:
        self.client.send_body(self.stream, self.frames.close(code, ""), end=False)

    def _frames(self) -> list[Any]:
        body = self.response.body
        if len(body) > self.seen:
            self.frames.receive_bytes(body[self.seen :])
            self.seen = len(body)
            self.messages.extend(self.frames.received_frames())
        return self.messages

    def next(self) -> Any:
        count = len(self.messages)
        assert self.client.until(lambda: len(self._frames()) > count), self.response
        return self.messages[count]


def _settings(client: H2Client) -> Any:
    client.until(lambda: bool(client.conn.remote_settings))
    return client.conn.remote_settings


def test_echo_and_client_close(serve_ws) -> None:
    with serve_ws(ws_echo) as srv:
        client = connect(srv.port)
        client.until(
            lambda: _settings(client)[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 1
        )
        ws = WSClient(
            client,
            headers=[(b"sec-websocket-version", b"13"), (b"sec-websocket-protocol", b"chat")],
        )
        assert ws.opened()
        assert ws.response.status == 200
        assert ws.response.fields[b"sec-websocket-protocol"] == b"chat"
        ws.send("héllo")
        assert ws.next().payload == "héllo"
        ws.send(b"\x00\x01")
        assert ws.next().payload == b"\x00\x01"
        # An ordinary request on the same connection, while the WebSocket is open.
        assert client.get("/plain").status == 200
        ws.close(1000)
        reply = ws.next()
        assert reply.opcode is Opcode.CLOSE
        assert client.until(lambda: ws.response.ended)  # END_STREAM: the server's side closed
    assert any('"WebSocket /ws" [accepted]' in m for m in srv.messages())


def test_request_body_limit_is_not_applied_to_messages(serve_ws) -> None:
    with serve_ws(ws_echo, limit_request_body=10) as srv:
        client = connect(srv.port)
        ws = WSClient(client, headers=[(b"sec-websocket-version", b"13")])
        assert ws.opened()
        ws.send("m" * 5000)
        assert ws.next().payload == "m" * 5000
        ws.close(1000)
        assert ws.next().opcode is Opcode.CLOSE
        assert client.until(lambda: ws.response.ended)


def test_server_close_ends_the_stream(serve_ws) -> None:
    with serve_ws(ws_echo) as srv:
        client = connect(srv.port)
        ws = WSClient(client, headers=[(b"sec-websocket-version", b"13")])
        assert ws.opened()
        ws.send("close please")
        frame = ws.next()
        assert frame.opcode is Opcode.CLOSE
        assert tuple(frame.payload) == (4001, "asked")
        ws.close(4001)
        assert client.until(lambda: ws.response.ended or ws.response.reset is not None)


def test_denial_is_an_http_response_on_the_stream(serve_ws) -> None:
    async def deny(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await echo(scope, receive, send)
            return
        await send({"type": "websocket.close"})

    with serve_ws(deny) as srv:
        client = connect(srv.port)
        ws = WSClient(client, headers=[(b"sec-websocket-version", b"13")])
        denied = client.response(ws.stream)
        assert client.get("/after").status == 200
    assert denied.status == 403


def test_missing_version_is_426(serve_one) -> None:
    with serve_one(ws_echo) as srv:
        client = connect(srv.port)
        ws = WSClient(client)
        response = client.response(ws.stream)
    assert response.status == 426
    assert response.fields[b"sec-websocket-version"] == b"13"


def test_unknown_protocol_is_501(serve_one) -> None:
    with serve_one(ws_echo) as srv:
        client = connect(srv.port)
        stream = client.conn.get_next_available_stream_id()
        block = [
            (b":method", b"CONNECT"),
            (b":protocol", b"webtransport"),
            (b":scheme", b"http"),
            (b":authority", b"test"),
            (b":path", b"/"),
        ]
        client.send_headers(stream, block, end_stream=False)
        response = client.response(stream)
    assert response.status == 501


def test_without_websockets_extended_connect_is_not_offered(serve_one) -> None:
    with serve_one(ws_echo, ws="none") as srv:
        client = connect(srv.port)
        assert client.get().status == 200
        assert client.conn.remote_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL] == 0
        ws = WSClient(client, headers=[(b"sec-websocket-version", b"13")])
        response = client.response(ws.stream)
    assert response.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_client_leaving_closes_the_session(serve_ws) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        seen.append(await receive())

    with serve_ws(app) as srv:
        client = connect(srv.port)
        ws = WSClient(client, headers=[(b"sec-websocket-version", b"13")])
        assert ws.opened()
        client.conn.end_stream(ws.stream)  # like a TCP FIN, without a close frame
        client.flush()
        assert client.until(lambda: ws.response.ended or ws.response.reset is not None)
    assert seen == [{"type": "websocket.disconnect", "code": 1006, "reason": ""}]
