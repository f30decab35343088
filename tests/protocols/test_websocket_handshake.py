"""The WebSocket handshake: the scope, accepting, refusing (by the app or by the handshake
checks), the close codes, the disconnect the app sees, the access log, `--ws none`, and an
upgrade pipelined behind a plain request. Over every engine, parser and loop (`serve_ws`).
"""

from __future__ import annotations

import base64
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect

from fulmen import Config
from fulmen.protocols.engines.websockets import WebsocketsFactory
from fulmen.protocols.websocket import ClientDisconnected
from tests.conftest import TIMEOUT, RunningServer
from tests.protocols.http1_raw import Reader, Response, read_body, request, respond

# RFC 6455 §1.3: the example key and the Sec-WebSocket-Accept it must produce.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
ACCEPT_MESSAGE = {"type": "websocket.accept"}


def handshake(
    path: str = "/",
    headers: list[tuple[str, str]] | None = None,
    key: str | None = KEY,
    version: str | None = "13",
    method: str = "GET",
    http: str = "1.1",
    body: bytes = b"",
) -> bytes:
    """An opening handshake as bytes; `None` leaves the key or version header out."""
    lines = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if key is not None:
        lines.append(("Sec-WebSocket-Key", key))
    if version is not None:
        lines.append(("Sec-WebSocket-Version", version))
    return request(method, path, [*lines, *(headers or [])], body, http)


def connect_client(srv: RunningServer, path: str = "/", **options: Any) -> ClientConnection:
    """The `websockets` client, every wait bounded, no keepalive pings."""
    url = f"ws://{srv.host}:{srv.port}{path}"
    return connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT, ping_interval=None, **options)


def answered_then_closed(srv: RunningServer, data: bytes) -> Response:
    """Send `data` on a new connection; read the one response, and check the server then
    closes the connection."""
    with srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(data)
        response = reader.response()
        assert reader.closed(), "the connection stayed open after the response"
    return response


def read_frame(reader: Reader) -> tuple[int, bytes]:
    """One unfragmented frame from the server: (opcode, payload)."""
    first, second = reader._take(2)
    assert first & 0x80, "a fragment"
    assert not second & 0x80, "a server frame must not be masked (RFC 6455 §5.1)"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", reader._take(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", reader._take(8))
    return first & 0x0F, reader._take(length)


def client_frame(opcode: Opcode, payload: bytes) -> bytes:
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


def access_lines(srv: RunningServer) -> list[str]:
    return [r.getMessage() for r in srv.records if r.name == "fulmen.access"]


class Recorder:
    """What a test app saw, filled on the server's thread; `wait()` returns it once `done()`."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.event = threading.Event()

    def add(self, item: Any) -> None:
        self.items.append(item)

    def done(self) -> None:
        self.event.set()

    def wait(self) -> list[Any]:
        assert self.event.wait(TIMEOUT), "the app did not finish"
        return self.items


# Apps


async def ws_echo_app(scope, receive, send) -> None:
    """Echoes every message until the client leaves; answers plain HTTP with `plain`."""
    if scope["type"] == "http":
        await respond(send, b"plain")
        return
    assert (await receive())["type"] == "websocket.connect"
    await send(ACCEPT_MESSAGE)
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send(
            {"type": "websocket.send", "bytes": message.get("bytes"), "text": message.get("text")}
        )


def recording_app(recorder: Recorder) -> Callable[..., Any]:
    """Records the scope and the first message, accepts, then waits for the disconnect."""

    async def app(scope, receive, send) -> None:
        recorder.add(scope)
        recorder.add(await receive())
        await send(ACCEPT_MESSAGE)
        while (await receive())["type"] != "websocket.disconnect":
            pass

    return app


async def close_before_accept(scope, receive, send) -> None:
    await receive()
    await send({"type": "websocket.close"})


DENIAL_START = {
    "type": "websocket.http.response.start",
    "status": 401,
    "headers": [(b"www-authenticate", b"Bearer"), (b"content-type", b"text/plain")],
}


async def deny(scope, receive, send) -> None:
    await receive()
    await send(DENIAL_START)
    await send({"type": "websocket.http.response.body", "body": b"denied"})


async def deny_streamed(scope, receive, send) -> None:
    await receive()
    await send(DENIAL_START)
    await send({"type": "websocket.http.response.body", "body": b"den", "more_body": True})
    await send({"type": "websocket.http.response.body", "body": b"ied"})


async def raise_before_accept(scope, receive, send) -> None:
    await receive()
    raise RuntimeError("boom")


async def return_before_accept(scope, receive, send) -> None:
    await receive()


async def raise_after_accept(scope, receive, send) -> None:
    await receive()
    await send(ACCEPT_MESSAGE)
    raise RuntimeError("boom")


async def return_after_accept(scope, receive, send) -> None:
    await receive()
    await send(ACCEPT_MESSAGE)


async def close_with_code(scope, receive, send) -> None:
    await receive()
    await send(ACCEPT_MESSAGE)
    await send({"type": "websocket.close", "code": 4001, "reason": "custom reason"})


# The scope


@pytest.mark.parametrize(
    ("root_path", "protocol_headers", "subprotocols"),
    [
        pytest.param("", ["superchat, chat"], ["superchat", "chat"], id="one header"),
        pytest.param(
            "/api", ["chat", "superchat , v2"], ["chat", "superchat", "v2"], id="two headers"
        ),
    ],
)
def test_scope(
    serve_ws, root_path: str, protocol_headers: list[str], subprotocols: list[str]
) -> None:
    recorder = Recorder()
    headers = [("Sec-WebSocket-Protocol", value) for value in protocol_headers]
    headers.append(("X-Custom", "Value"))
    with serve_ws(recording_app(recorder), root_path=root_path) as srv, srv.connect() as sock:
        sock.sendall(handshake("/chat%20room?x=1&y=%20", headers))
        assert Reader(sock).head().status == 101
        client = sock.getsockname()
        scope, first = recorder.items  # recorded before the accept sent the 101
    assert first == {"type": "websocket.connect"}
    assert scope["type"] == "websocket"
    assert scope["scheme"] == "ws"
    assert scope["http_version"] == "1.1"
    assert scope["root_path"] == root_path
    assert scope["path"] == root_path + "/chat room"
    assert scope["raw_path"] == root_path.encode() + b"/chat%20room"
    assert scope["query_string"] == b"x=1&y=%20"
    assert scope["subprotocols"] == subprotocols
    assert scope["client"] == (client[0], client[1])
    assert scope["server"] == ("127.0.0.1", srv.port)
    assert scope["extensions"] == {"websocket.http.response": {}}
    assert scope["asgi"]["version"] == "3.0"
    assert isinstance(scope["state"], dict)
    assert (b"host", b"test") in scope["headers"]
    assert (b"x-custom", b"Value") in scope["headers"]
    assert (b"sec-websocket-key", KEY.encode()) in scope["headers"]
    assert "method" not in scope


# Accepting


def test_accept_with_subprotocol_and_headers(serve_ws) -> None:
    async def app(scope, receive, send) -> None:
        await receive()
        accept = {"subprotocol": "two", "headers": [(b"x-extra", b"yes")]}
        await send({**ACCEPT_MESSAGE, **accept})
        await send({"type": "websocket.send", "text": "hello"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    with serve_ws(app) as srv, connect_client(srv, subprotocols=["one", "two"]) as ws:
        assert ws.subprotocol == "two"
        assert ws.response.headers["x-extra"] == "yes"
        assert ws.recv(timeout=TIMEOUT) == "hello"


def test_accept_response_bytes(serve_ws) -> None:
    with serve_ws(ws_echo_app) as srv, srv.connect() as sock:
        sock.sendall(handshake())
        response = Reader(sock).head()
    assert response.head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert response.get("sec-websocket-accept") == ACCEPT
    assert response.get("upgrade").lower() == "websocket"
    assert response.get("connection").lower() == "upgrade"
    assert response.get("server") == "fulmen"
    assert parsedate_to_datetime(response.get("date")).tzname() == "UTC"
    assert response.get("sec-websocket-protocol") is None  # none was chosen
    assert response.get("content-length") is None
    assert response.get("transfer-encoding") is None


# Refusals by the handshake checks (RFC 6455 §4.2.1): the app is not called


def _key(size: int) -> str:
    return base64.b64encode(bytes(size)).decode()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(handshake(version="8"), 426, id="version 8"),
        pytest.param(handshake(version=None), 426, id="no version"),
        pytest.param(handshake(key=None), 400, id="no key"),
        pytest.param(handshake(headers=[("Sec-WebSocket-Key", KEY)]), 400, id="two keys"),
        pytest.param(handshake(key=_key(8)), 400, id="8-byte key"),
        pytest.param(handshake(key="not base64 at all!!!"), 400, id="not base64"),
        pytest.param(handshake(method="POST"), 400, id="POST"),
        pytest.param(handshake(http="1.0"), 400, id="HTTP/1.0"),
        pytest.param(handshake(body=b"hello"), 400, id="body"),
        pytest.param(
            handshake(headers=[("Transfer-Encoding", "chunked")], body=b"5\r\nhello\r\n0\r\n\r\n"),
            400,
            id="chunked body",
        ),
    ],
)
def test_bad_handshake_is_refused(serve_ws, data: bytes, status: int) -> None:
    recorder = Recorder()
    with serve_ws(recording_app(recorder)) as srv:
        response = answered_then_closed(srv, data)
    assert response.status == status
    if status == 426:  # RFC 6455 §4.2.2: name the versions the server speaks
        assert response.get("sec-websocket-version") == "13"
    assert recorder.items == [], "the app was called"
    (line,) = access_lines(srv)
    assert line.endswith(f'"WebSocket /" {status}')


# Refusals by the app


@dataclasses.dataclass
class Refusal:
    app: Callable[..., Any]
    status: int
    body: bytes
    chunks: list[bytes] | None = None  # the body's chunks, when streamed
    error: str | None = None  # the error logged


REFUSALS = [
    pytest.param(Refusal(close_before_accept, 403, b"Forbidden"), id="close"),
    pytest.param(Refusal(deny, 401, b"denied"), id="http.response"),
    pytest.param(
        Refusal(deny_streamed, 401, b"denied", chunks=[b"den", b"ied"]), id="http.response streamed"
    ),
    pytest.param(
        Refusal(raise_before_accept, 500, b"Internal Server Error", error="Exception in ASGI"),
        id="raise",
    ),
    pytest.param(
        Refusal(
            return_before_accept,
            500,
            b"Internal Server Error",
            error="ASGI callable returned without completing the WebSocket handshake.",
        ),
        id="return",
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS)
def test_app_refuses(serve_ws, refusal: Refusal) -> None:
    with serve_ws(refusal.app) as srv:
        with pytest.raises(InvalidStatus) as info:
            connect_client(srv, "/path")
        response = answered_then_closed(srv, handshake("/path"))
    assert info.value.response.status_code == refusal.status
    assert info.value.response.body == refusal.body
    assert response.status == refusal.status
    assert response.body == refusal.body
    assert response.chunks == refusal.chunks
    assert response.get("connection") == "close"
    if refusal.app is deny or refusal.app is deny_streamed:
        assert info.value.response.headers["www-authenticate"] == "Bearer"
        assert response.get("www-authenticate") == "Bearer"
        assert response.get("content-type") == "text/plain"
    errors = [r for r in srv.records if r.name == "fulmen.error" and r.levelname == "ERROR"]
    if refusal.error is None:
        assert errors == []
    else:  # one per handshake
        assert [r.getMessage().startswith(refusal.error) for r in errors] == [True, True]
    lines = access_lines(srv)
    assert len(lines) == 2
    assert all(line.endswith(f'"WebSocket /path" {refusal.status}') for line in lines)


# Close codes sent by the server


@pytest.mark.parametrize(
    ("app", "code", "reason", "error"),
    [
        pytest.param(raise_after_accept, 1011, "", "Exception in ASGI application", id="raise"),
        pytest.param(return_after_accept, 1000, "", None, id="return"),
        pytest.param(close_with_code, 4001, "custom reason", None, id="close"),
    ],
)
def test_close_code(serve_ws, app, code: int, reason: str, error: str | None) -> None:
    with serve_ws(app) as srv, connect_client(srv) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
        errors = [r for r in srv.records if r.levelname == "ERROR"]
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (code, reason)
    if error is None:
        assert errors == []
    else:  # logged before the close frame was sent
        (record,) = errors
        assert record.getMessage() == error
        assert record.exc_info is not None and str(record.exc_info[1]) == "boom"


INVALID_CLOSE_CODES = [999, 1004, 1005, 1006, 1015, 2999, 5000]


def test_invalid_close_code_raises(serve_ws) -> None:
    recorder = Recorder()

    async def app(scope, receive, send) -> None:
        await receive()
        await send(ACCEPT_MESSAGE)
        for code in INVALID_CLOSE_CODES:
            try:
                await send({"type": "websocket.close", "code": code})
            except RuntimeError:
                recorder.add(code)
        recorder.done()
        await send({"type": "websocket.send", "text": "still open"})

    with serve_ws(app) as srv, connect_client(srv) as ws:
        assert recorder.wait() == INVALID_CLOSE_CODES
        assert ws.recv(timeout=TIMEOUT) == "still open"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1000


# The client leaves


def close_with_4002(srv: RunningServer) -> None:
    with connect_client(srv) as ws:
        ws.close(4002, "bye")


def close_without_code(srv: RunningServer) -> None:
    with srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(handshake())
        assert reader.head().status == 101
        sock.sendall(client_frame(Opcode.CLOSE, b""))
        assert read_frame(reader) == (Opcode.CLOSE, b"")  # echoed (RFC 6455 §5.5.1)
        assert reader.closed()


def drop(srv: RunningServer, reset: bool = False) -> None:
    with srv.connect() as sock:
        sock.sendall(handshake())
        assert Reader(sock).head().status == 101
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize(
    ("leave", "code", "reason"),
    [
        pytest.param(close_with_4002, 4002, "bye", id="code and reason"),
        pytest.param(close_without_code, 1005, "", id="no code"),
        pytest.param(drop, 1006, "", id="TCP closed"),
        pytest.param(lambda srv: drop(srv, reset=True), 1006, "", id="TCP reset"),
    ],
)
def test_app_sees_disconnect(serve_ws, leave, code: int, reason: str) -> None:
    recorder = Recorder()

    async def app(scope, receive, send) -> None:
        await receive()
        await send(ACCEPT_MESSAGE)
        recorder.add(await receive())
        try:
            await send({"type": "websocket.send", "text": "too late"})
        except OSError as exc:
            recorder.add(exc)
        recorder.done()

    with serve_ws(app) as srv:
        leave(srv)
        message, error = recorder.wait()
    assert message == {"type": "websocket.disconnect", "code": code, "reason": reason}
    assert isinstance(error, ClientDisconnected)


# Access log


def test_access_log_accepted(serve_ws) -> None:
    with serve_ws(ws_echo_app) as srv:
        with connect_client(srv, "/path?x=1") as ws:
            port = ws.local_address[1]
        # The closing handshake has completed: the line, logged at the accept, is there.
        assert access_lines(srv) == [f'127.0.0.1:{port} - "WebSocket /path?x=1" [accepted]']


# Without WebSocket support


def test_upgrade_is_plain_http_without_websocket_support(serve) -> None:
    recorder = Recorder()

    async def app(scope, receive, send) -> None:
        recorder.add(scope["type"])
        await respond(send, b"plain http")

    with serve(app, ws="none") as srv:
        response = answered_then_closed(srv, handshake("/chat"))
    assert recorder.items == ["http"]
    assert (response.status, response.body) == (200, b"plain http")
    assert response.get("connection") == "close"
    assert response.get("sec-websocket-accept") is None


UPGRADE_BODIES = [
    pytest.param([], b"hello", id="content-length"),
    pytest.param([("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n", id="chunked"),
]


@pytest.mark.parametrize(("framing", "body"), UPGRADE_BODIES)
@pytest.mark.parametrize("ws", ["none", "auto"])
def test_upgrade_body_reaches_app_served_as_plain_http(
    serve, ws: str, framing: list[tuple[str, str]], body: bytes
) -> None:
    """An upgrade served as plain HTTP (no WebSocket support, or another protocol such as h2c)
    delivers its body on both parsers (llhttp skips it; the httptools adapter reads it)."""

    async def app(scope, receive, send) -> None:
        await respond(send, await read_body(receive))

    headers = [("Connection", "Upgrade"), ("Upgrade", "websocket" if ws == "none" else "h2c")]
    with serve(app, ws=ws) as srv:
        data = request("POST", "/chat", [*headers, *framing], body)
        # Bytes after the body are not HTTP any more: never parsed as a second request.
        response = answered_then_closed(srv, data + b"GET / HTTP/1.1\r\n\r\n")
    assert (response.status, response.body) == (200, b"hello")


def test_websockets_sansio_is_an_alias(serve_one) -> None:
    assert Config(ws_echo_app, ws="websockets-sansio").ws == "websockets-sansio"
    with serve_one(ws_echo_app, ws="websockets-sansio") as srv, connect_client(srv) as ws:
        assert isinstance(srv.server.state.ws_factory, WebsocketsFactory)
        ws.send("ping")
        assert ws.recv(timeout=TIMEOUT) == "ping"


# Pipelining


@pytest.mark.parametrize("frame_in_same_write", [False, True], ids=["frame after", "frame too"])
def test_pipelined_request_then_upgrade(serve_ws, frame_in_same_write: bool) -> None:
    frame = client_frame(Opcode.TEXT, b"hello")
    data = request(path="/plain") + handshake("/ws")
    with serve_ws(ws_echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(data + frame if frame_in_same_write else data)
        response = reader.response()
        assert (response.status, response.body) == (200, b"plain")
        assert reader.head().status == 101
        if not frame_in_same_write:
            sock.sendall(frame)
        assert read_frame(reader) == (Opcode.TEXT, b"hello")
    (plain, websocket) = access_lines(srv)
    assert plain.endswith('"GET /plain HTTP/1.1" 200 OK')
    assert websocket.endswith('"WebSocket /ws" [accepted]')
