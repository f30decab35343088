"""Hostile HTTP/2 clients, frame by frame over real sockets: each abuse gets a defined answer
(GOAWAY or RST_STREAM) at a bounded cost, other connections are served meanwhile, and no
traceback is logged for a client's misbehaviour."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.conftest import TIMEOUT
from tests.protocols.h2client import connect, split_frames
from tests.protocols.test_http2 import echo

pytestmark = pytest.mark.timeout(60)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY, RST_STREAM = 7, 3
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t"), (b":path", b"/")]


class RawPeer:
    """A client that writes frames as given and reads the server's frames as (type, flags,
    stream id, payload), so that it can break every rule."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False
        self.encoder = Encoder()
        sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def send(self, *frames: Frame) -> None:
        try:
            self.sock.sendall(b"".join(frame.serialize() for frame in frames))
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True

    def headers(self, stream_id: int, block: list[tuple[bytes, bytes]], end: bool = True) -> Frame:
        frame = HeadersFrame(stream_id, self.encoder.encode(block))
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame

    def read_until(self, predicate: Any, timeout: float = TIMEOUT) -> bool:
        """Read frames until `predicate(frames)` holds or the server closes the connection."""
        deadline = time.monotonic() + timeout
        while not predicate(self.frames) and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
            frames, self.buffer = split_frames(self.buffer + data)
            for head in frames:
                stream_id = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                self.frames.append((head[3], head[4], stream_id, head[9:]))
        return bool(predicate(self.frames))

    def goaway(self) -> int | None:
        """The error code of the server's GOAWAY, once it has sent one and closed."""
        self.read_until(lambda frames: any(f[0] == GOAWAY for f in frames))
        self.read_until(lambda frames: False, timeout=2)  # then the close
        codes = [int.from_bytes(f[3][4:8], "big") for f in self.frames if f[0] == GOAWAY]
        return codes[-1] if codes else None

    def resets(self) -> dict[int, int]:
        return {f[2]: int.from_bytes(f[3][:4], "big") for f in self.frames if f[0] == RST_STREAM}


def _peer(srv: Any) -> RawPeer:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
    from tests.protocols import h2client

    h2client.OPEN.append(sock)  # closed after the test
    return RawPeer(sock)


def _still_serving(srv: Any) -> None:
    assert connect(srv.port).get("/other").status == 200


def _no_traceback(srv: Any) -> None:
    assert not [r for r in srv.records if r.exc_info], [r.getMessage() for r in srv.records]


def test_rapid_reset_gets_enhance_your_calm(serve_one) -> None:
    """CVE-2023-44487: streams opened and reset at once, faster than apps can run."""
    started: list[int] = []

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/other":
            await echo(scope, receive, send)
            return
        started.append(1)
        await asyncio.sleep(30)

    with serve_one(slow, timeout_graceful_shutdown=0.5) as srv:
        peer = _peer(srv)
        frames: list[Frame] = []
        for n in range(600):
            frames += [peer.headers(2 * n + 1, REQUEST), RstStreamFrame(2 * n + 1)]
        peer.send(*frames)
        assert peer.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
        # The apps of reset streams still running count against the stream limit.
        assert len(started) <= 100
        _still_serving(srv)
        _no_traceback(srv)


def test_ping_flood_gets_enhance_your_calm(serve_one) -> None:
    with serve_one(echo) as srv:
        peer = _peer(srv)
        peer.send(*[PingFrame(0, b"%08d" % n) for n in range(3000)])
        assert peer.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
        _still_serving(srv)
        _no_traceback(srv)
    assert any("too many PING/SETTINGS frames" in m for m in srv.messages())


def test_settings_flood_gets_enhance_your_calm(serve_one) -> None:
    with serve_one(echo) as srv:
        peer = _peer(srv)
        peer.send(*[SettingsFrame(0, {4: 65535}) for _ in range(3000)])
        assert peer.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
        _still_serving(srv)
        _no_traceback(srv)


def test_empty_data_flood_gets_enhance_your_calm(serve_one) -> None:
    async def reader(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/other":
            await echo(scope, receive, send)
            return
        while (await receive())["type"] == "http.request":
            pass

    with serve_one(reader) as srv:
        peer = _peer(srv)
        post = [(b":method", b"POST"), *REQUEST[1:]]
        peer.send(peer.headers(1, post, end=False), *[DataFrame(1, b"") for _ in range(3000)])
        assert peer.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
        _still_serving(srv)
        _no_traceback(srv)


def test_continuation_flood_is_a_connection_error(serve_one) -> None:
    """CVE-2024-27316 class: a header block that never ends, in CONTINUATION frames."""
    with serve_one(echo) as srv:
        peer = _peer(srv)
        first = HeadersFrame(1, peer.encoder.encode(REQUEST))
        more = [
            ContinuationFrame(1, peer.encoder.encode([(b"x", b"y" * 8000)])) for _ in range(200)
        ]
        peer.send(first, *more)
        assert peer.goaway() in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.ENHANCE_YOUR_CALM)
        _still_serving(srv)
        _no_traceback(srv)


def test_hpack_bomb_is_bounded_by_the_header_list_size(serve_one) -> None:
    """A large table entry referenced over and over: the decoded list hits the 16 KiB limit."""
    with serve_one(echo) as srv:
        peer = _peer(srv)
        peer.send(peer.headers(1, [*REQUEST, (b"bomb", b"b" * 3000)]))
        # Stream 1 (which put the entry in the table) is answered before the bomb comes: the
        # connection error would end it too.
        assert peer.read_until(lambda frames: any(f[2] == 1 and f[1] & 1 for f in frames))
        block = peer.encoder.encode([*REQUEST, *[(b"bomb", b"b" * 3000)] * 100])
        assert len(block) < 1000  # indexed: tiny on the wire, 300 KB decoded
        frame = HeadersFrame(3, block)
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        peer.send(frame)
        assert peer.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
        _still_serving(srv)
        _no_traceback(srv)


def test_too_many_streams(serve_one) -> None:
    release = asyncio.Event()

    async def waiting(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/other":
            await echo(scope, receive, send)
            return
        await asyncio.wait_for(release.wait(), 20)

    with serve_one(waiting, h2_max_concurrent_streams=5, timeout_graceful_shutdown=0.5) as srv:
        peer = _peer(srv)
        peer.read_until(lambda frames: any(f[0] == 4 and f[1] & 1 for f in frames))  # ACK
        peer.send(*[peer.headers(2 * n + 1, REQUEST) for n in range(6)])
        answered = peer.read_until(
            lambda frames: any(f[0] in (GOAWAY, RST_STREAM) for f in frames), timeout=5
        )
        assert answered
        codes = set(peer.resets().values())
        goaway = [f for f in peer.frames if f[0] == GOAWAY]
        assert goaway or codes <= {ErrorCodes.REFUSED_STREAM, ErrorCodes.PROTOCOL_ERROR}
        _still_serving(srv)
        _no_traceback(srv)


def test_zero_window_with_a_large_response_holds_one_message(serve_one) -> None:
    sent: list[int] = []

    async def big(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        for n in range(10):
            await send({"type": "http.response.body", "body": b"x" * 1_000_000, "more_body": True})
            sent.append(n)
        await send({"type": "http.response.body"})

    with serve_one(big) as srv:
        peer = _peer(srv)
        peer.send(SettingsFrame(0, {4: 0}), peer.headers(1, REQUEST))  # INITIAL_WINDOW_SIZE 0
        assert peer.read_until(lambda frames: any(f[0] == 1 for f in frames))  # HEADERS
        stream = _waiting_stream(srv)
        # One message taken and held for window (1 MB), the app's next send() waits.
        assert sent == [0]
        assert stream.pending is not None and len(stream.pending) == 1_000_000
        assert not any(f[0] == 0 and f[3] for f in peer.frames)  # no DATA without window
        _still_serving(srv)
        peer.sock.close()  # the app's send() returns once the client has gone
        _no_traceback(srv)


def _waiting_stream(srv: Any) -> Any:
    """The server's stream whose body waits for send window (polled: another thread's)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for conn in list(srv.server.state.connections):
            for stream in list(getattr(conn, "blocked", ())):
                if stream.write_paused:
                    return stream
        time.sleep(0.01)
    raise AssertionError("no stream waits for window")


def test_window_overflow_is_a_flow_control_error(serve_one) -> None:
    with serve_one(echo) as srv:
        peer = _peer(srv)
        peer.send(WindowUpdateFrame(0, 2**31 - 1))
        assert peer.goaway() == ErrorCodes.FLOW_CONTROL_ERROR
        _still_serving(srv)
        _no_traceback(srv)


async def hello(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.mark.parametrize("count", [3, 500])
def test_data_after_end_stream_is_a_stream_error(serve_one, count) -> None:
    """A few frames get RST_STREAM STREAM_CLOSED; a flood of them, GOAWAY: not an answer per
    frame."""
    with serve_one(hello) as srv:
        peer = _peer(srv)
        peer.send(peer.headers(1, REQUEST), *[DataFrame(1, b"late") for _ in range(count)])
        peer.read_until(lambda frames: 1 in {f[2] for f in frames if f[0] == RST_STREAM})
        assert peer.resets().get(1) == ErrorCodes.STREAM_CLOSED
        if count > 100:
            assert peer.goaway() == ErrorCodes.ENHANCE_YOUR_CALM
            assert sum(1 for f in peer.frames if f[0] == RST_STREAM) <= 101
        else:
            assert not peer.read_until(lambda frames: any(f[0] == GOAWAY for f in frames), 0.3)
        _still_serving(srv)
        _no_traceback(srv)


def test_preface_without_a_request_times_out(serve_one) -> None:
    """The header timeout covers the preface and the first request: a client that only sends
    its preface and SETTINGS gets GOAWAY NO_ERROR, then the close."""
    with serve_one(echo, timeout_request_header=1) as srv:
        peer = _peer(srv)
        started = time.monotonic()
        assert peer.goaway() == ErrorCodes.NO_ERROR
        assert peer.closed
        assert time.monotonic() - started < 4


def test_priority_frames_are_accepted_and_ignored(serve_one) -> None:
    with serve_one(echo) as srv:
        peer = _peer(srv)
        priority = [PriorityFrame(n, depends_on=0, stream_weight=16) for n in (1, 3, 5, 7)]
        peer.send(*priority, peer.headers(1, REQUEST))
        # The response ends its stream (END_STREAM on HEADERS or DATA), nothing is reset.
        assert peer.read_until(
            lambda fs: any(f[2] == 1 and f[0] in (0, 1) and f[1] & 1 for f in fs)
        )
        assert not any(f[0] in (GOAWAY, RST_STREAM) for f in peer.frames)
        _no_traceback(srv)
