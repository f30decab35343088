"""The WebSocket message path: echo, sizes, fragments, limits, bad frames, compression, pings,
backpressure both ways, bytes that follow the handshake, and the graceful-shutdown close.

The `websockets` sync client plays a well-behaved peer; raw sockets send exact frames (built
with `websockets.frames.Frame`, masked as a client must) where a real client would refuse to.
Tests whose timing rests on the server's one-second tick run on one parser and loop
(`serve_one`), over both engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect

from tests.conftest import TIMEOUT, RunningServer
from tests.protocols.http1_raw import Reader, in_loop, open_gate, poll_until

ENGINES = ["websockets", "wsproto"]
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's example key
UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
NO_MASK = b"\x00\x00\x00\x00"  # a masking key of zeros: the payload is sent as is
CHUNK = 65536  # the size of each message in the flow-control tests


# The application


class EchoApp:
    """Accepts, then echoes every message (unless `echo=False`), keeping what each connection
    (by path) received and the `websocket.disconnect` that ended it.

    With a `gate` it waits for the gate to open (`open_gate`) before receiving anything.
    """

    def __init__(self, *, echo: bool = True, gate: asyncio.Event | None = None) -> None:
        self.echo = echo
        self.gate = gate
        self.changed = threading.Condition()
        self.received: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.disconnects: dict[str, dict[str, Any]] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "websocket"
        path = scope["path"]
        assert (await receive()) == {"type": "websocket.connect"}
        await send({"type": "websocket.accept"})
        if self.gate is not None:
            await self.gate.wait()
        while True:
            message = await receive()
            with self.changed:
                if message["type"] == "websocket.disconnect":
                    self.disconnects[path] = message
                else:
                    assert message["type"] == "websocket.receive", message
                    self.received[path].append(message)
                self.changed.notify_all()
            if message["type"] == "websocket.disconnect":
                return
            if self.echo:
                await send({"type": "websocket.send", **_data(message)})

    def wait_for(self, predicate: Any, what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, TIMEOUT), f"the app never {what}"

    def disconnect(self, path: str = "/") -> dict[str, Any]:
        """The `websocket.disconnect` the app received on `path` (waits for it)."""
        self.wait_for(lambda: path in self.disconnects, f"saw {path} disconnect")
        return self.disconnects[path]


def _data(message: dict[str, Any]) -> dict[str, Any]:
    """The `bytes` or `text` item of a `websocket.receive` message."""
    return {key: message[key] for key in ("bytes", "text") if message.get(key) is not None}


class FloodApp:
    """Accepts, then sends `count` binary messages of CHUNK bytes, numbered, and closes.

    `started` and `done` count the sends begun and completed: while `send()` waits for the
    socket to drain, `started == done + 1`.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.started = self.done = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        for index in range(self.count):
            self.started += 1
            await send({"type": "websocket.send", "bytes": numbered(index)})
            self.done += 1
        await send({"type": "websocket.close"})


def numbered(index: int, size: int = CHUNK) -> bytes:
    return b"%08d" % index + b"x" * (size - 8)


# Clients


@contextlib.contextmanager
def client(srv: RunningServer, path: str = "/", **options: Any) -> Iterator[ClientConnection]:
    """A `websockets` sync client; it does not ping unless asked (the server's pings are
    what the ping tests watch)."""
    options.setdefault("open_timeout", TIMEOUT)
    options.setdefault("close_timeout", TIMEOUT)
    options.setdefault("ping_interval", None)
    with connect(f"ws://{srv.host}:{srv.port}{path}", **options) as ws:
        yield ws


def close_code(ws: ClientConnection) -> int:
    """Read until the server closes; the code of the close frame it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            ws.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None, "the server sent no close frame"
    return int(info.value.rcvd.code)


def frame(opcode: Opcode, data: bytes, fin: bool = True, mask: bool = True) -> bytes:
    """One client frame as bytes (masked, as RFC 6455 §5.3 requires of a client)."""
    return Frame(opcode, data, fin=fin).serialize(mask=mask)


class FrameReader(Reader):
    """Reads the 101 response, then the server's frames, from a raw socket."""

    def handshake(self) -> None:
        response = self.head()
        assert response.status == 101, response.head

    def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame; the FIN bit must be set (fulmen does not
        fragment what it sends) and the frame unmasked (RFC 6455 §5.1)."""
        first, second = self._take(2)
        assert first & 0x80, "fragmented frame"
        assert not second & 0x80, "masked server frame"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._take(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._take(8))
        return first & 0x0F, self._take(length)

    def close_code(self) -> int:
        """The code of the next frame, which must be a close frame."""
        opcode, payload = self.frame()
        assert opcode == Opcode.CLOSE, (opcode, payload[:100])
        return int(struct.unpack("!H", payload[:2])[0])


@contextlib.contextmanager
def raw_client(srv: RunningServer, after: bytes = b"", path: str = "/") -> Iterator[FrameReader]:
    """A raw socket through the opening handshake; `after` goes in the same `sendall`."""
    with srv.connect() as sock:
        sock.sendall(UPGRADE.format(path=path).encode() + after)
        reader = FrameReader(sock)
        reader.handshake()
        yield reader


def the_websocket(srv: RunningServer) -> Any:
    """The server's one accepted WebSocket (its HTTP/1.1 driver, an `H1WebSocket`)."""
    connections = in_loop(srv, lambda: list(srv.server.state.connections))
    assert len(connections) == 1, connections
    assert type(connections[0]).__name__ == "H1WebSocket", connections
    return connections[0]


# 1. Echo


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param(["hello"], id="text"),
        pytest.param([b"\x00\x01\xfe\xff"], id="bytes"),
        pytest.param(["", b""], id="empty"),
        pytest.param(["héllo wörld €", "日本語", "🎉 emoji"], id="non-ascii"),
        pytest.param([f"message {i}" if i % 2 else b"%d" % i for i in range(50)], id="many"),
    ],
)
def test_echo(serve_ws: Any, messages: list[str | bytes]) -> None:
    app = EchoApp()
    with serve_ws(app) as srv:
        with client(srv) as ws:
            for message in messages:
                ws.send(message)
            echoed = [ws.recv(timeout=TIMEOUT) for _ in messages]
        assert app.disconnect()["code"] == 1000
    assert echoed == messages
    kinds = [("text" if isinstance(m, str) else "bytes") for m in messages]
    assert [next(iter(_data(m))) for m in app.received["/"]] == kinds


# 2. Large messages


def test_echo_one_mebibyte(serve_ws: Any) -> None:
    text = "é" * (1 << 19)  # 1 MiB once encoded
    data = os.urandom(1 << 20)
    with serve_ws(EchoApp()) as srv, client(srv, max_size=None) as ws:
        ws.send(text)
        ws.send(data)
        assert ws.recv(timeout=TIMEOUT) == text
        assert ws.recv(timeout=TIMEOUT) == data


@pytest.mark.parametrize("compression", ["deflate", None])
@pytest.mark.parametrize("engine", ENGINES)
def test_message_of_exactly_the_default_max_size(
    serve_one: Any, engine: str, compression: str | None
) -> None:
    data = bytes(range(256)) * (16777216 // 256)  # ws_max_size's default, inflated size
    with serve_one(EchoApp(), ws=engine) as srv:
        assert srv.server.config.ws_max_size == len(data)
        with client(srv, max_size=None, compression=compression) as ws:
            ws.send(data)
            assert ws.recv(timeout=TIMEOUT) == data


# 3. Fragmented messages


@pytest.mark.parametrize(
    ("fragments", "text", "message"),
    [
        pytest.param(["Hello, ", "wö", "rld"], None, "Hello, wörld", id="text"),
        pytest.param([b"\x00\x01", b"", b"\x02"], None, b"\x00\x01\x02", id="bytes"),
        # "é" is b"\xc3\xa9": the first fragment ends inside the character.
        pytest.param([b"caf\xc3", b"\xa9!"], True, "café!", id="split-utf8"),
        pytest.param([b"\xf0\x9f", b"\x8e", b"\x89"], True, "🎉", id="split-utf8-3-ways"),
    ],
)
def test_fragmented_message_is_received_whole(
    serve_ws: Any, fragments: list[Any], text: bool | None, message: str | bytes
) -> None:
    app = EchoApp()
    with serve_ws(app) as srv:
        with client(srv) as ws:
            ws.send(fragments, text=text)
            ws.send("next")
            assert ws.recv(timeout=TIMEOUT) == message
            assert ws.recv(timeout=TIMEOUT) == "next"
        app.disconnect()
    key = "text" if isinstance(message, str) else "bytes"
    assert app.received["/"] == [
        {"type": "websocket.receive", key: message},
        {"type": "websocket.receive", "text": "next"},
    ]


def test_control_frame_between_fragments(serve_ws: Any) -> None:
    """RFC 6455 §5.4: a ping may come between the fragments of a message; it is answered at
    once and the message is still delivered whole."""
    app = EchoApp()
    first = frame(Opcode.TEXT, b"frag", fin=False)
    ping = frame(Opcode.PING, b"between")
    with serve_ws(app) as srv, raw_client(srv, after=first + ping) as reader:
        assert reader.frame() == (Opcode.PONG, b"between")
        reader.sock.sendall(frame(Opcode.CONT, b"ment"))
        assert reader.frame() == (Opcode.TEXT, b"fragment")
        assert app.received["/"] == [{"type": "websocket.receive", "text": "fragment"}]


# 4. The message size limit


@pytest.mark.parametrize("text", [False, True], ids=["bytes", "text"])
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_message_at_max_size_passes(serve_ws: Any, text: bool, compression: str | None) -> None:
    message: str | bytes = "é" * 500 if text else b"x" * 1000  # 1000 bytes either way
    with serve_ws(EchoApp(), ws_max_size=1000) as srv, client(srv, compression=compression) as ws:
        ws.send(message)
        assert ws.recv(timeout=TIMEOUT) == message


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"x" * 1001, id="one-frame"),
        pytest.param([b"x" * 91] * 11, id="fragments"),  # 11 x 91 = 1001, each well under
        pytest.param("é" * 500 + "!", id="text"),  # 1001 bytes once encoded
        pytest.param(["é" * 50] * 10 + ["!"], id="text-fragments"),
    ],
)
@pytest.mark.parametrize("compression", [None, "deflate"])
def test_message_over_max_size_closes_1009(
    serve_ws: Any, message: Any, compression: str | None
) -> None:
    """Counted as received (inflated, when compressed), over every fragment of the message."""
    app = EchoApp()
    with serve_ws(app, ws_max_size=1000) as srv:
        with client(srv, compression=compression) as ws:
            ws.send(b"before")
            assert ws.recv(timeout=TIMEOUT) == b"before"
            with contextlib.suppress(ConnectionClosed):  # closed before the last fragment
                ws.send(message)
            assert close_code(ws) == 1009
        assert app.disconnect()["code"] == 1009
        assert app.received["/"] == [{"type": "websocket.receive", "bytes": b"before"}]


# 5. Invalid frames


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param([frame(Opcode.TEXT, b"bad \xc3\x28")], 1007, id="invalid-utf8"),
        pytest.param([frame(Opcode.TEXT, b"\xff")], 1007, id="invalid-utf8-byte"),
        pytest.param(
            [frame(Opcode.TEXT, b"ok", fin=False), frame(Opcode.CONT, b"caf\xc3")],
            1007,
            id="truncated-utf8-fragments",
        ),
        pytest.param([frame(Opcode.TEXT, b"hi", mask=False)], 1002, id="unmasked"),
        pytest.param([b"\x83\x80" + NO_MASK], 1002, id="reserved-opcode"),
        pytest.param([b"\xc1\x80" + NO_MASK], 1002, id="rsv1-without-extension"),
        pytest.param([frame(Opcode.CONT, b"x")], 1002, id="continuation-without-start"),
        pytest.param(
            [frame(Opcode.TEXT, b"a", fin=False), frame(Opcode.TEXT, b"b")],
            1002,
            id="new-message-inside-fragments",
        ),
        # A control frame's payload is at most 125 bytes (RFC 6455 §5.5).
        pytest.param(
            [b"\x89\xfe" + struct.pack("!H", 126) + NO_MASK + b"x" * 126],
            1002,
            id="control-frame-too-long",
        ),
    ],
)
def test_bad_frame_closes_connection(serve_ws: Any, frames: list[bytes], code: int) -> None:
    app = EchoApp()
    with serve_ws(app) as srv:
        with raw_client(srv, after=frame(Opcode.TEXT, b"good")) as reader:
            assert reader.frame() == (Opcode.TEXT, b"good")
            reader.sock.sendall(b"".join(frames))
            assert reader.close_code() == code
            assert reader.closed(), "the server did not close the TCP connection"
        assert app.disconnect()["code"] == code
        assert app.received["/"] == [{"type": "websocket.receive", "text": "good"}]


# 6. permessage-deflate


@pytest.mark.parametrize(
    ("server_deflate", "compression", "agreed"),
    [
        pytest.param(True, "deflate", True, id="both"),
        pytest.param(False, "deflate", False, id="server-off"),
        pytest.param(True, None, False, id="client-off"),
    ],
)
def test_per_message_deflate(
    serve_ws: Any, server_deflate: bool, compression: str | None, agreed: bool
) -> None:
    messages: list[str | bytes] = ["spam " * 20000, b"eggs" * 30000, "x", b""]
    options = {"ws_per_message_deflate": server_deflate}
    with serve_ws(EchoApp(), **options) as srv, client(srv, compression=compression) as ws:
        answer = ws.response.headers.get("Sec-WebSocket-Extensions")
        if agreed:
            assert answer is not None and answer.startswith("permessage-deflate"), answer
            assert [ext.name for ext in ws.protocol.extensions] == ["permessage-deflate"]
        else:
            assert answer is None
            assert ws.protocol.extensions == []
        for message in messages:
            ws.send(message)
            assert ws.recv(timeout=TIMEOUT) == message


# 7. Compression bomb


@pytest.mark.parametrize("engine", ENGINES)
def test_compression_bomb_is_refused_before_inflating(serve_one: Any, engine: str) -> None:
    """50 MB of zeros deflate to about 50 KB: the server stops inflating past ws_max_size."""
    app = EchoApp()
    bomb = bytes(50_000_000)  # allocated before tracing starts: only new allocations count
    with serve_one(app, ws=engine, ws_max_size=1_000_000) as srv:
        with client(srv) as ws:
            assert ws.protocol.extensions, "permessage-deflate was not agreed"
            tracemalloc.start()
            try:
                ws.send(bomb)
                assert close_code(ws) == 1009
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert app.disconnect()["code"] == 1009
    assert app.received["/"] == []
    # The client's compressed copy is ~50 KB; the server may inflate ~1 MB, not 50.
    assert peak < 10_000_000, f"{peak} bytes allocated while refusing the bomb"


# 8. Pings


@pytest.mark.parametrize("engine", ENGINES)
def test_server_pings_keep_live_client_and_drop_silent_one(serve_one: Any, engine: str) -> None:
    """A client that answers the server's pings stays; one that never reads is dropped (the
    app sees 1006) once a ping goes unanswered for ws_ping_timeout."""
    app = EchoApp()
    options = {"ws": engine, "ws_ping_interval": 1, "ws_ping_timeout": 1}
    with serve_one(app, **options) as srv, client(srv, "/live") as ws:
        with raw_client(srv, path="/silent") as reader:
            accepted = time.monotonic()
            assert app.disconnect("/silent")["code"] == 1006
            elapsed = time.monotonic() - accepted
            # At least one ping interval, then the pong timeout; within a few ticks.
            assert 1.0 <= elapsed < 7.0, elapsed
            opcode, _ = reader.frame()
            assert opcode == Opcode.PING  # it was pinged before being dropped
            reader.until_closed()
        # The live client has answered pings for as long: still connected and served.
        ws.send("still here")
        assert ws.recv(timeout=TIMEOUT) == "still here"
        assert "/live" not in app.disconnects


def test_client_pings_are_answered(serve_ws: Any) -> None:
    with serve_ws(EchoApp()) as srv:
        with client(srv) as ws:
            assert ws.ping(b"one").wait(TIMEOUT)
            assert ws.ping().wait(TIMEOUT)
        with raw_client(srv) as reader:
            reader.sock.sendall(frame(Opcode.PING, b"payload") + frame(Opcode.PING, b""))
            assert reader.frame() == (Opcode.PONG, b"payload")
            assert reader.frame() == (Opcode.PONG, b"")


# 9. Backpressure


def test_full_queue_pauses_reading(serve_ws: Any) -> None:
    """ws_max_queue=2: with the app not receiving, the server stops reading the socket; once
    the app reads again, every message arrives, in order."""
    count = 200
    gate = asyncio.Event()
    app = EchoApp(echo=False, gate=gate)
    with serve_ws(app, ws_max_queue=2) as srv, client(srv, compression=None) as ws:
        websocket = the_websocket(srv)
        sender = threading.Thread(
            target=lambda: [ws.send(numbered(i).decode()) for i in range(count)], daemon=True
        )
        sender.start()

        def paused() -> bool:
            return not in_loop(srv, websocket.transport.is_reading)

        poll_until(paused, "the server kept reading with a full queue")
        # Up to the limit, plus what the one read that reached it brought (256 KiB at most).
        assert len(websocket.session.queue) <= 2 + (256 * 1024) // CHUNK + 1, len(
            websocket.session.queue
        )
        assert app.received["/"] == []
        open_gate(srv, gate)
        app.wait_for(lambda: len(app.received["/"]) == count, f"received {count} messages")
        sender.join(TIMEOUT)
        assert not sender.is_alive()
        assert in_loop(srv, websocket.transport.is_reading)
    texts = [message["text"] for message in app.received["/"]]
    assert texts == [numbered(i).decode() for i in range(count)]


def test_send_waits_for_the_socket_to_drain(serve_ws: Any) -> None:
    """A client that does not read: the app's `send()` waits once the transport's buffer is
    full, instead of buffering all it sends. When the client reads, every message follows."""
    count = 400  # 25 MiB, more than the socket buffers hold
    app = FloodApp(count)
    with serve_ws(app, ws_per_message_deflate=False) as srv, raw_client(srv) as reader:
        websocket = the_websocket(srv)

        def blocked() -> bool:
            return bool(in_loop(srv, lambda: websocket.flow.write_paused))

        poll_until(blocked, "the transport never paused writing")
        paused, started, done = in_loop(
            srv, lambda: (websocket.flow.write_paused, app.started, app.done)
        )
        assert paused and started == done + 1 and done < count  # the app waits inside send()
        buffered = in_loop(srv, websocket.transport.get_write_buffer_size)
        assert buffered <= 4 * CHUNK, buffered
        for index in range(count):
            assert reader.frame() == (Opcode.BINARY, numbered(index))
        assert reader.close_code() == 1000
        assert app.done == count


# 10. Bytes after the handshake


@pytest.mark.parametrize("slow_accept", [False, True], ids=["eager", "after-a-wait"])
def test_frames_sent_with_the_upgrade_request_are_kept(serve_ws: Any, slow_accept: bool) -> None:
    """The upgrade request and frames in one segment: the frames are read once accepted."""
    app = EchoApp()
    after = frame(Opcode.TEXT, "first ☃".encode()) + frame(Opcode.BINARY, b"second")

    async def accept_later(scope: Any, receive: Any, send: Any) -> None:
        if slow_accept:
            await asyncio.sleep(0)  # accept in a later loop iteration, not while parsing
        await app(scope, receive, send)

    with serve_ws(accept_later) as srv, raw_client(srv, after=after) as reader:
        assert reader.frame() == (Opcode.TEXT, "first ☃".encode())
        assert reader.frame() == (Opcode.BINARY, b"second")
    assert app.received["/"] == [
        {"type": "websocket.receive", "text": "first ☃"},
        {"type": "websocket.receive", "bytes": b"second"},
    ]


def test_frames_read_before_the_accept_are_kept(serve_ws: Any) -> None:
    """Frames that arrive in a later read, while the app has not yet accepted, are kept for the
    WebSocket (not parsed as HTTP, not dropped)."""
    app = EchoApp()
    gate = asyncio.Event()

    async def accept_when_told(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()
        await app(scope, receive, send)

    def kept(srv: RunningServer) -> int:
        (conn,) = in_loop(srv, lambda: list(srv.server.state.connections))
        return len(conn.parser.trailing)

    after = frame(Opcode.TEXT, b"early") + frame(Opcode.BINARY, b"bird")
    with serve_ws(accept_when_told) as srv, srv.connect() as sock:
        sock.sendall(UPGRADE.format(path="/").encode())
        poll_until(lambda: in_loop(srv, lambda: bool(srv.server.state.tasks)), "no handshake")
        sock.sendall(after[:5])
        poll_until(lambda: kept(srv) == 5, "the first bytes were not kept")
        sock.sendall(after[5:])
        poll_until(lambda: kept(srv) == len(after), "the other bytes were not kept")
        open_gate(srv, gate)
        reader = FrameReader(sock)
        reader.handshake()
        assert reader.frame() == (Opcode.TEXT, b"early")
        assert reader.frame() == (Opcode.BINARY, b"bird")


# 11. Graceful shutdown


@pytest.mark.parametrize(("restart", "code"), [(False, 1001), (True, 1012)])
def test_graceful_shutdown_closes_with_1001_or_1012(
    serve_ws: Any, restart: bool, code: int
) -> None:
    """A shutdown closes with 1001 (going away), a restart with 1012 (service restart)."""
    app = EchoApp()
    with serve_ws(app) as srv:
        with client(srv) as ws:
            ws.send("hi")
            assert ws.recv(timeout=TIMEOUT) == "hi"
            if restart:
                srv.server.restart()  # as a supervisor replacing this server asks
            else:
                srv.server.should_exit = True
            assert close_code(ws) == code
        assert app.disconnect()["code"] == code
        leaving = time.monotonic()
    # The client answered the close frame: the server stops without waiting out a timeout.
    assert time.monotonic() - leaving < 2.0


def test_request_limit_closes_with_1012(serve_ws: Any) -> None:
    """`limit_max_requests` ends the server to be restarted: open WebSockets get 1012."""
    echo = EchoApp()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await echo(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    with serve_ws(app, limit_max_requests=1) as srv, client(srv) as ws:
        ws.send("hi")
        assert ws.recv(timeout=TIMEOUT) == "hi"
        with srv.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")  # the one request allowed
            assert sock.recv(100).startswith(b"HTTP/1.1 204 ")
            assert close_code(ws) == 1012
    assert echo.disconnect()["code"] == 1012
