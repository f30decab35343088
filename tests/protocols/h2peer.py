"""Raw HTTP/2 peers and apps for the conformance tests of fulmen's own frame layer and
connection (`test_h2frames`, `test_h2flow`): frames written as given, answers read frame by
frame."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from typing import Any

import hpack
import pytest
from hyperframe.frame import Frame, PingFrame

from tests.conftest import TIMEOUT
from tests.protocols import h2client
from tests.protocols.test_http2_abuse import RawPeer, _no_traceback, _still_serving

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = range(6)
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(6, 10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0x0, 0x1, 0x3, 0x5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x6, 0x7, 0x8, 0x9
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, ENABLE_CONNECT_PROTOCOL = 0x4, 0x5, 0x8
MAX_WINDOW = 2**31 - 1
CREDIT_STEP = 32767  # the server gives back window in steps of half its 65535 window


def request(path: bytes = b"/", method: bytes = b"GET") -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"http"), (b":authority", b"t"), (b":path", path)]


class Raw:
    """A frame exactly as given, rules broken or not (hyperframe refuses to build some)."""

    def __init__(self, kind: int, flags: int, stream_id: int, payload: bytes = b"") -> None:
        head = struct.pack(">I", len(payload))[1:] + bytes((kind, flags))
        self.data = head + struct.pack(">I", stream_id) + payload

    def serialize(self) -> bytes:
        return self.data


class Peer(RawPeer):
    """`RawPeer`, plus: the preface left to the test, PING as a barrier, GOAWAY's last stream
    id, and the server's responses decoded."""

    def __init__(self, sock: socket.socket, preface: bool = True) -> None:
        if preface:
            super().__init__(sock)
        else:
            self.sock, self.buffer, self.frames, self.closed = sock, b"", [], False
            self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.decoded = 0  # frames whose header blocks went through `decoder`
        self.heads: dict[int, list[dict[bytes, bytes]]] = {}
        self.pings = 0

    def req(
        self, stream_id: int, path: str = "/", method: bytes = b"GET", end: bool = True
    ) -> Frame:
        return self.headers(stream_id, request(path.encode(), method), end)

    def sync(self) -> int:
        """Wait until the server has handled all sent so far (its PING ACK comes after the
        frames that handling wrote); the number of frames received before that ACK."""
        self.pings += 1
        opaque = b"sync%04d" % self.pings
        self.send(PingFrame(0, opaque))
        acked = (PING, ACK, 0, opaque)
        assert self.read_until(lambda frames: acked in frames), "no PING ACK"
        return len(self.frames) - 1

    def of(self, kind: int, stream_id: int | None = None, since: int = 0) -> list[bytes]:
        """The payloads of the frames of `kind` received (on `stream_id`), from `since` on."""
        return [f[3] for f in self.frames[since:] if f[0] == kind and stream_id in (None, f[2])]

    def wait_closed(self) -> bool:
        """Read until the server closes the connection (bounded); whether it did."""
        self.read_until(lambda frames: False)
        return self.closed

    def connection_error(self) -> tuple[int, int] | None:
        """(last stream id, error code) of the server's GOAWAY, once it has closed."""
        self.goaway()
        found = self.of(GOAWAY)
        if not found:
            return None
        last, code = struct.unpack_from(">II", found[-1])
        return last & 0x7FFFFFFF, code

    def fields(self, stream_id: int) -> list[dict[bytes, bytes]]:
        """The header blocks received on `stream_id`, decoded (in order, one decoder)."""
        for kind, _, sid, payload in self.frames[self.decoded :]:
            if kind == HEADERS:
                block = dict(self.decoder.decode(payload, raw=True))
                self.heads.setdefault(sid, []).append(block)
        self.decoded = len(self.frames)
        return self.heads.get(stream_id, [])

    def response(self, stream_id: int) -> tuple[int, bytes]:
        """Status and body of the response on `stream_id`, once it has ended."""

        def ended(frames: list[tuple[int, int, int, bytes]]) -> bool:
            return any(
                f[2] == stream_id and f[0] in (DATA, HEADERS) and f[1] & END_STREAM for f in frames
            )

        # (the message, with payload lengths only, is built once the reading failed)
        assert self.read_until(ended), [(f[0], f[1], f[2], len(f[3])) for f in self.frames]
        status = int(self.fields(stream_id)[0][b":status"])
        return status, b"".join(self.of(DATA, stream_id))


def open_peer(srv: Any, preface: bool = True, rcvbuf: int = 0) -> Peer:
    sock = socket.socket()
    h2client.OPEN.append(sock)  # closed after the test
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", srv.port))
    return Peer(sock, preface)


def writing_paused(srv: Any) -> bool:
    """Whether a connection of the server gets its writing paused (polled, bounded: the state
    is another thread's, and the client must not read meanwhile)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(getattr(c, "write_paused", False) for c in list(srv.server.state.connections)):
            return True
        time.sleep(0.01)
    return False


class App:
    """`/big?N` answers N bytes in messages of 1 MiB, `/head?N` with a header of N bytes,
    `/noread` at once; the others echo the request body: `/hold` once `release` is set (it reads
    nothing before), `/early` after its response began. An app that reads `http.disconnect`
    sets `gone`; `received` keeps what they read."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.gone = threading.Event()
        self.received: list[dict[str, Any]] = []
        self.held = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path, size = scope["path"], int(scope["query_string"] or 0)
        big = [(b"x-big", b"h" * size)] if path == "/head" else []
        start = {"type": "http.response.start", "status": 200, "headers": big}
        body = b""
        if path == "/hold":
            self.held += 1
            await asyncio.wait_for(self.release.wait(), TIMEOUT)
        if path in ("/big", "/early"):  # the response begins before any read
            await send(start)
        if path == "/early":
            await send({"type": "http.response.body", "body": b"early", "more_body": True})
        if path == "/big":
            for n in range(0, size, 1 << 20):
                chunk = b"b" * min(1 << 20, size - n)
                more = n + len(chunk) < size
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
                await asyncio.sleep(0)  # as if awaiting its source: what is queued goes out
            return
        while path != "/noread":
            message = await receive()
            self.received.append(message)
            if message["type"] == "http.disconnect":
                self.gone.set()
                return
            body += message["body"]
            if not message["more_body"]:
                break
        if path != "/early":
            await send(start)
        await send({"type": "http.response.body", "body": body})


def release(srv: Any, app: App) -> None:
    srv.server.state.loop.call_soon_threadsafe(app.release.set)


# The loops differ in how they deliver partial reads, blocked writes and closes.
LOOPS = pytest.mark.parametrize("loop", ["asyncio", "uvloop"])


def healthy(srv: Any) -> None:
    _still_serving(srv)
    _no_traceback(srv)


def quiet(srv: Any, peer: Peer, resets: int = 0) -> None:
    """All sent so far is handled: no GOAWAY, `resets` RST_STREAM frames, no traceback."""
    peer.sync()
    assert not peer.of(GOAWAY) and len(peer.of(RST_STREAM)) == resets
    _no_traceback(srv)


HOLD = "/hold"  # the path whose app waits to be released
