"""HTTP/3 (`--http3`) against hostile and malformed input, over real UDP sockets on loopback:
connection floods from one address, rapid reset, oversized and undecodable header sections,
broken framing on request and unidirectional streams, Version Negotiation, Retry, and
datagrams for a connection from another address (migration is off).

Each case asserts the exact outcome (the error code of CONNECTION_CLOSE or RESET_STREAM, or
that nothing is answered) and, where the server goes on, that another, well-behaved
connection is still served. Every case runs on both loops; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aioquic._buffer import Buffer
from aioquic.quic.packet import QuicHeader, QuicPacketType, pull_quic_header

import fulmen.protocols.quic as quic_module
from fulmen.protocols.http3 import RESETS_PER_TICK, H3Connection
from fulmen.protocols.quic import TOKEN_LIFETIME, QuicListener, RetryTokens
from tests.conftest import TIMEOUT, Certs, RunningServer
from tests.protocols.conftest import ServeH3
from tests.protocols.h3client import H3Client, connect, run

# Error codes (RFC 9114 §8.1, RFC 9204 §6)
H3_NO_ERROR = 0x100
H3_STREAM_CREATION_ERROR = 0x103
H3_CLOSED_CRITICAL_STREAM = 0x104
H3_FRAME_UNEXPECTED = 0x105
H3_FRAME_ERROR = 0x106
H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_INCOMPLETE = 0x10D
H3_MESSAGE_ERROR = 0x10E
QPACK_DECOMPRESSION_FAILED = 0x200
QPACK_ENCODER_STREAM_ERROR = 0x201
QPACK_DECODER_STREAM_ERROR = 0x202

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
UNKNOWN_VERSION = 0x1A2A3A4A  # of the form RFC 9000 §15 reserves for forcing negotiation
LOCALHOST = "127.0.0.1"


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the request body (returns on http.disconnect), answers `METHOD PATH SIZE`; on
    /early, answers at once without reading it."""
    if scope["path"] == "/early":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"early"})
        return
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    text = f"{scope['method']} {scope['path']} {size}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text})


def listener(srv: RunningServer) -> QuicListener:
    return srv.server.quic_listeners[0]


async def until(condition: Callable[[], bool], interval: float = 0.01) -> None:
    """Bounded polling of the server's state (read from the test's thread)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


async def stream_allowed(client: H3Client, unidirectional: bool = False) -> None:
    """Until the server's MAX_STREAMS lets the client open its next stream (aioquic's client
    would send RESET_STREAM for a stream past the limit, a STREAM_LIMIT_ERROR)."""
    quic = client._quic

    def allowed() -> bool:
        if unidirectional:
            return quic._local_next_stream_id_uni // 4 < quic._remote_max_streams_uni
        return quic._local_next_stream_id_bidi // 4 < quic._remote_max_streams_bidi

    await until(lambda: allowed() or client.terminated is not None, 0.001)


def ignore_stop_sending(client: H3Client) -> None:
    """The client goes on sending after the server's STOP_SENDING, as one does while that
    frame is on its way over a long path (aioquic would otherwise stop the stream at once)."""
    handlers = client._quic._QuicConnection__frame_handlers  # type: ignore[attr-defined]

    def ignore(context: Any, frame_type: int, buf: Buffer) -> None:
        buf.pull_uint_var()  # stream id
        buf.pull_uint_var()  # error code

    handlers[0x05] = (ignore, handlers[0x05][1])


async def served(port: int, certs: Certs, path: bytes = b"/ok") -> None:
    """A fresh, well-behaved connection is served."""
    async with connect(port, certs) as client:
        response = await client.get(path)
    assert (response.status, bytes(response.body)) == (200, b"GET " + path + b" 0")


# HTTP/3 frames and QPACK header blocks, made by hand (not by the code under test)


def varint(value: int) -> bytes:
    """A QUIC variable-length integer (RFC 9000 §16), shortest form."""
    for size, flag in ((1, 0), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            return (value | flag << (8 * size - 8)).to_bytes(size, "big")
    raise ValueError(value)


def frame(frame_type: int, payload: bytes) -> bytes:
    return varint(frame_type) + varint(len(payload)) + payload


def qpack_int(value: int, bits: int, flags: int = 0) -> bytes:
    """A QPACK prefixed integer (RFC 7541 §5.1) in the low `bits` of its first byte."""
    limit = (1 << bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = [flags | limit]
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def qpack_field(name: bytes, value: bytes, huffman: bool = False) -> bytes:
    """A field line with a literal name and value (RFC 9204 §4.5.6); `value` as given."""
    return qpack_int(len(name), 3, 0x20) + name + qpack_int(len(value), 7, 0x80 * huffman) + value


def huffman_a(count: int) -> bytes:
    """`count` (a multiple of 8) letters a, Huffman-coded (RFC 7541 Appendix B: 00011)."""
    assert count % 8 == 0
    return int("00011" * count, 2).to_bytes(count * 5 // 8, "big")


def request_headers(path: bytes = b"/", extra: bytes = b"") -> bytes:
    """A HEADERS frame of a GET request, its block static-table only (no QPACK state)."""
    block = b"\x00\x00"  # Required Insert Count 0, Delta Base 0
    for name, value in (
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", path),
    ):
        block += qpack_field(name, value)
    return frame(0x01, block + extra)


# Datagrams made by hand


@contextlib.contextmanager
def udp(port: int) -> Iterator[socket.socket]:
    """A UDP socket of its own (its own port), connected to the server's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((LOCALHOST, 0))
        sock.connect((LOCALHOST, port))
        sock.settimeout(TIMEOUT)
        yield sock
    finally:
        sock.close()


def long_packet(
    version: int,
    dcid: bytes,
    scid: bytes,
    *,
    first: int = 0xC0,
    token: bytes = b"",
    size: int = 1200,
) -> bytes:
    """A long-header packet of `size` bytes (an Initial, with `first` 0xC0): type, version,
    CIDs, token, length, and a payload of random bytes (never decryptable)."""
    head = bytes((first,)) + version.to_bytes(4, "big")
    head += bytes((len(dcid),)) + dcid + bytes((len(scid),)) + scid + varint(len(token)) + token
    rest = size - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def parse(datagram: bytes) -> QuicHeader:
    return pull_quic_header(Buffer(data=datagram), host_cid_length=8)


def negotiation(datagram: bytes) -> tuple[bytes, bytes, list[int]] | None:
    """The destination and source CIDs and the versions of a Version Negotiation packet (RFC
    8999 §6: CIDs of up to 255 bytes), else None."""
    if len(datagram) < 7 or not datagram[0] & 0x80 or datagram[1:5] != bytes(4):
        return None
    dcid_end = 6 + datagram[5]
    scid_end = dcid_end + 1 + datagram[dcid_end]
    versions = datagram[scid_end:]
    if len(datagram) < scid_end or len(versions) % 4:
        return None
    found = [int.from_bytes(versions[i : i + 4], "big") for i in range(0, len(versions), 4)]
    return datagram[6:dcid_end], datagram[dcid_end + 1 : scid_end], found


def answers(sock: socket.socket) -> list[bytes]:
    """What the server answered to the datagrams sent on `sock` so far. A datagram it must
    answer goes last (an unknown version: Version Negotiation); the server reads its socket in
    order and answers at once, so whatever else it answered arrives before."""
    dcid, scid = os.urandom(8), os.urandom(8)
    sock.send(long_packet(UNKNOWN_VERSION, dcid, scid))
    got: list[bytes] = []
    while True:
        data = sock.recv(65536)  # bounded: the socket's timeout
        vn = negotiation(data)
        if vn is not None and vn[:2] == (scid, dcid):
            return got
        got.append(data)


# 1. Many connections from one address


def test_connections_per_address(
    serve_h3: ServeH3, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_PER_ADDRESS, Initials are dropped (the handshake never completes); closing one
    connection releases its place."""
    monkeypatch.setattr(quic_module, "MAX_PER_ADDRESS", 2)

    async def main(srv: RunningServer) -> None:
        quic = listener(srv)
        async with connect(srv.port, certs) as second:
            async with connect(srv.port, certs) as first:
                assert quic.per_address == {LOCALHOST: 2}
                with pytest.raises(ConnectionError):
                    # The client gives up after its idle timeout: 1 s without an answer.
                    async with connect(srv.port, certs, idle_timeout=1):
                        pass
                assert quic.per_address == {LOCALHOST: 2} and len(quic.connections) == 2
                assert (await first.get(b"/first")).status == 200
            # CONNECTION_CLOSE: the server drains the connection (3 PTO), then forgets it.
            await until(lambda: quic.per_address == {LOCALHOST: 1})
            async with connect(srv.port, certs) as third:
                response = await third.get(b"/third")
                assert bytes(response.body) == b"GET /third 0"
                assert quic.per_address == {LOCALHOST: 2}
            assert bytes((await second.get(b"/second")).body) == b"GET /second 0"
        await until(lambda: not quic.per_address and not quic.connections)

    with serve_h3(app) as srv:
        run(main(srv))
        dropped = [
            r
            for r in srv.records
            if r.levelno == logging.DEBUG
            and r.getMessage() == f"HTTP/3: too many connections from {LOCALHOST}, Initial dropped"
        ]
    assert dropped


# 2. Rapid reset, stream floods and stream limits


def test_rapid_reset(serve_h3: ServeH3, certs: Certs) -> None:
    """Request streams opened and reset at once, more than RESETS_PER_TICK within a tick:
    H3_EXCESSIVE_LOAD closes the connection, with a warning; other connections are served."""

    async def main(port: int) -> tuple[int, int]:
        async with connect(port, certs) as client:
            sent = 0
            # More than one tick's worth, whichever way the server's tick splits them.
            while sent < 20 * RESETS_PER_TICK:
                await stream_allowed(client)
                if client.terminated is not None:
                    break
                stream_id = client.request(b"POST", body=b"x", end=False)
                client.reset(stream_id)
                sent += 1
            code = await client.closed_with()
        await served(port, certs)
        return code, sent

    with serve_h3(app) as srv:
        code, sent = run(main(srv.port))
        warnings = [r.getMessage() for r in srv.records if r.levelno == logging.WARNING]
    assert code == H3_EXCESSIVE_LOAD
    assert sent > RESETS_PER_TICK
    assert any(
        m.startswith("HTTP/3 client ") and "reset or opened too many streams" in m for m in warnings
    )


def test_unknown_stream_flood(serve_h3: ServeH3, certs: Certs) -> None:
    """Unidirectional streams of an unknown type count like resets: a flood of them closes the
    connection with H3_EXCESSIVE_LOAD."""

    async def main(port: int) -> int:
        async with connect(port, certs) as client:
            opened = 0
            while opened < 20 * RESETS_PER_TICK:
                await stream_allowed(client, unidirectional=True)
                if client.terminated is not None:
                    break
                client.raw_unidirectional(b"\x21", end=True)
                opened += 1
            code = await client.closed_with()
        await served(port, certs)
        return code

    with serve_h3(app) as srv:
        assert run(main(srv.port)) == H3_EXCESSIVE_LOAD


def test_reset_apps_count_against_the_limit(serve_h3: ServeH3, certs: Certs) -> None:
    """Rapid reset with apps that go on after http.disconnect: while the apps of reset streams
    still run, new streams are refused (H3_REQUEST_REJECTED), as in HTTP/2 (RFC 9113 §8.7), so
    that resetting cannot start more apps at once than the stream limit (100)."""
    limit = 100
    started: list[str] = []
    release = threading.Event()

    async def stubborn(scope: Any, receive: Any, send: Any) -> None:
        started.append(scope["path"])
        for _ in range(int(TIMEOUT / 0.01)):  # deaf to http.disconnect
            if release.is_set():
                return
            await asyncio.sleep(0.01)

    async def main(srv: RunningServer) -> tuple[list[str], list[int | None]]:
        async with connect(srv.port, certs) as client:
            (conn,) = listener(srv).connections
            first = [client.request(path=b"/first") for _ in range(limit)]
            await until(lambda: len(started) == limit)
            for stream_id in first:  # each request is whole: STOP_SENDING resets it
                client.stop(stream_id)
            await until(lambda: not conn.streams and not conn.incoming)
            # Past the QUIC stream limit, aioquic holds them until MAX_STREAMS (STREAMS_BLOCKED).
            second = [client.request(path=b"/second") for _ in range(10)]
            responses = [client.responses[stream_id] for stream_id in second]
            await until(lambda: len(started) > limit or all(r.done.is_set() for r in responses))
            return list(started), [r.reset for r in responses]

    with serve_h3(stubborn, h2_max_concurrent_streams=limit) as srv:
        try:
            apps, resets = run(main(srv))
        finally:
            release.set()
    assert apps == ["/first"] * limit
    assert resets == [H3_REQUEST_REJECTED] * 10


def test_concurrent_uploads(serve_h3: ServeH3, certs: Certs) -> None:
    """--h2-max-concurrent-streams 4: four requests whose bodies are still coming are all
    served (QUIC let the client open them), none refused."""
    started: list[str] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        started.append(scope["path"])
        await app(scope, receive, send)

    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            ids = [client.request(b"POST", b"/%d" % i, body=b"a", end=False) for i in range(4)]
            responses = [client.responses[stream_id] for stream_id in ids]
            await until(lambda: len(started) == 4 or any(r.done.is_set() for r in responses))
            for stream_id, response in zip(ids, responses, strict=True):
                if not response.done.is_set():  # not refused
                    client.send(stream_id, b"bc", end=True)
            return [await client.response(stream_id) for stream_id in ids]

    with serve_h3(recording, h2_max_concurrent_streams=4) as srv:
        responses = run(main(srv.port))
    assert [r.reset for r in responses] == [None] * 4
    assert [bytes(r.body) for r in responses] == [b"POST /%d 3" % i for i in range(4)]


def test_small_stream_limit(serve_h3: ServeH3, certs: Certs) -> None:
    """--h2-max-concurrent-streams 4 limits the requests open at once, not the requests a
    connection serves: the fifth, sixth... are served once the first are done."""

    async def main(port: int) -> list[bytes]:
        async with connect(port, certs) as client:
            bodies = [bytes((await client.get(b"/%d" % i)).body) for i in range(4)]
            # Once the four are done, the server grants more streams at once (MAX_STREAMS).
            fifth = client.request(path=b"/4")
            response = await asyncio.wait_for(client.response(fifth), TIMEOUT / 4)
            return [*bodies, bytes(response.body)]

    with serve_h3(app, h2_max_concurrent_streams=4) as srv:
        bodies = run(main(srv.port))
    assert bodies == [b"GET /%d 0" % i for i in range(5)]


def test_refused_stream_counts_once(serve_h3: ServeH3, certs: Certs) -> None:
    """After GOAWAY, a request on a later stream is refused (H3_REQUEST_REJECTED). Its body
    still arriving (the client has not seen STOP_SENDING yet: 400 KB, some 300 packets) is
    discarded: it counts as one refusal, the request open before GOAWAY is answered, and the
    connection closes with H3_NO_ERROR."""
    started = threading.Event()
    release = threading.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            started.set()
            await asyncio.to_thread(release.wait, TIMEOUT)
        await app(scope, receive, send)

    async def main(srv: RunningServer) -> tuple[Any, Any, int]:
        async with connect(srv.port, certs) as client:
            slow_id = client.request(path=b"/slow")
            assert await asyncio.to_thread(started.wait, TIMEOUT)
            (conn,) = listener(srv).connections
            srv.server.should_exit = True
            await until(lambda: conn.goaway is not None)
            ignore_stop_sending(client)
            late = client.request(b"POST", b"/late", end=False)
            client.send(late, b"x" * 400_000)

            def all_in() -> bool:
                stream = conn.quic._streams.get(late)
                return conn.closed or (
                    stream is not None and stream.receiver.highest_offset >= 400_000
                )

            await until(all_in)
            release.set()
            answered = await client.response(slow_id)
            return answered, client.responses[late], await client.closed_with()

    with serve_h3(slow) as srv:
        try:
            answered, refused, code = run(main(srv))
        finally:
            release.set()
        warnings = srv.messages(logging.WARNING)
    assert not [m for m in warnings if "too many streams" in m]
    assert code == H3_NO_ERROR
    assert refused.reset == H3_REQUEST_REJECTED and refused.headers is None
    assert (answered.status, bytes(answered.body)) == (200, b"GET /slow 0")


def test_many_requests_at_once(serve_h3: ServeH3, certs: Certs) -> None:
    """A client that keeps to the server's MAX_STREAMS (aioquic's does) may send 400 requests
    at once: every one is served, none refused, the connection is not closed."""

    async def slowish(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.05)
        await app(scope, receive, send)

    async def main(port: int) -> tuple[list[Any], Any]:
        async with connect(port, certs) as client:
            ids = [client.request(path=b"/%d" % i) for i in range(400)]
            responses = [await client.response(stream_id) for stream_id in ids]
            return responses, client.terminated

    with serve_h3(slowish) as srv:
        responses, terminated = run(main(srv.port))
    assert terminated is None
    assert [(r.reset, r.headers is not None) for r in responses] == [(None, True)] * 400
    assert [bytes(r.body) for r in responses] == [b"GET /%d 0" % i for i in range(400)]


def test_open_streams_bounded(serve_h3: ServeH3, certs: Certs) -> None:
    """Request streams whose HEADERS never complete stay within --h2-max-concurrent-streams
    (100): the server grants no more streams while they are open."""

    async def main(srv: RunningServer) -> tuple[int, int]:
        async with connect(srv.port, certs) as client:
            (conn,) = listener(srv).connections
            part = request_headers(b"/part")[:-1]  # one byte short
            for _ in range(300):  # past MAX_STREAMS, aioquic holds them (STREAMS_BLOCKED)
                client.raw_request(part, end=False)
            await until(lambda: len(conn.incoming) >= 100)
            for _ in range(2):  # any MAX_STREAMS comes by then, and the streams it lets in
                await asyncio.wait_for(client.ping(), TIMEOUT)
            return len(conn.incoming), client._quic._remote_max_streams_bidi

    with serve_h3(app) as srv:
        assert run(main(srv)) == (100, 100)


# 3. Oversized header sections


def test_header_section_too_large(serve_h3: ServeH3, certs: Certs) -> None:
    """A header section over 16 KiB decoded (a 20 KiB value, Huffman-coded into a 13 KB
    HEADERS frame): 431 on that stream; the connection serves the next request. A HEADERS
    frame over the frame limit closes the connection with H3_EXCESSIVE_LOAD."""

    async def main(port: int) -> tuple[Any, Any, int]:
        async with connect(port, certs) as client:
            big = qpack_field(b"x-big", huffman_a(20 * 1024), huffman=True)
            frame_size = len(request_headers(b"/big", big))
            assert frame_size < 16384  # under the frame limit: decoded, then refused
            too_large = await client.response(client.raw_request(request_headers(b"/big", big)))
            after = await client.get(b"/after")
            assert client.terminated is None
            client.raw_request(b"\x01" + varint(1 << 20) + b"\x00" * 1000, end=False)
            code = await client.closed_with()
        await served(port, certs)
        return too_large, after, code

    with serve_h3(app) as srv:
        too_large, after, code = run(main(srv.port))
    assert too_large.status == 431
    assert bytes(too_large.body) == b"Request Header Fields Too Large"
    assert (after.status, bytes(after.body)) == (200, b"GET /after 0")
    assert code == H3_EXCESSIVE_LOAD


# 4. QPACK


def test_qpack_errors(serve_h3: ServeH3, certs: Certs) -> None:
    """Header blocks that cannot be decoded: QPACK_DECOMPRESSION_FAILED; garbage on the
    encoder stream: QPACK_ENCODER_STREAM_ERROR; on the decoder stream:
    QPACK_DECODER_STREAM_ERROR; a second encoder, decoder or control stream:
    H3_STREAM_CREATION_ERROR."""

    def bad_block(block: bytes) -> Callable[[H3Client], None]:
        def send(client: H3Client) -> None:
            client.raw_request(frame(0x01, block))

        return send

    def too_many_blocked(client: H3Client) -> None:
        # Required Insert Count 1 (encoded 2) with an empty table: blocked, up to the 16
        # blocked streams announced in SETTINGS; the 17th is a connection error.
        for _ in range(17):
            client.raw_request(frame(0x01, b"\x02\x00\x80"), end=False)

    def encoder(data: bytes) -> Callable[[H3Client], None]:
        def send(client: H3Client) -> None:
            stream_id = client.h3._local_encoder_stream_id
            assert stream_id is not None
            client.raw(stream_id, data)

        return send

    def decoder(data: bytes) -> Callable[[H3Client], None]:
        def send(client: H3Client) -> None:
            stream_id = client.h3._local_decoder_stream_id
            assert stream_id is not None
            client.raw(stream_id, data)

        return send

    def second(kind: bytes) -> Callable[[H3Client], None]:
        def send(client: H3Client) -> None:
            client.raw_unidirectional(kind)

        return send

    cases: dict[str, tuple[Callable[[H3Client], None], int]] = {
        # An indexed field line naming dynamic entry 0 with Required Insert Count 0.
        "missing dynamic entry": (bad_block(b"\x00\x00\x80"), QPACK_DECOMPRESSION_FAILED),
        # Encoded Required Insert Count 510, past 2 * MaxEntries (256).
        "insert count too large": (bad_block(b"\xff\xff\x01\x00\xd1"), QPACK_DECOMPRESSION_FAILED),
        "truncated block": (bad_block(b"\x00"), QPACK_DECOMPRESSION_FAILED),
        "too many blocked streams": (too_many_blocked, QPACK_DECOMPRESSION_FAILED),
        # Set Dynamic Table Capacity far past the 4096 announced.
        "encoder stream garbage": (encoder(b"\x3f\xff\xff\xff\x0f"), QPACK_ENCODER_STREAM_ERROR),
        "encoder duplicate of nothing": (encoder(b"\x00"), QPACK_ENCODER_STREAM_ERROR),
        # Insert Count Increment of 0 (RFC 9204 §4.4.3).
        "decoder stream garbage": (decoder(b"\x00"), QPACK_DECODER_STREAM_ERROR),
        "second encoder stream": (second(b"\x02"), H3_STREAM_CREATION_ERROR),
        "second decoder stream": (second(b"\x03"), H3_STREAM_CREATION_ERROR),
        "second control stream": (second(b"\x00" + frame(0x04, b"")), H3_STREAM_CREATION_ERROR),
    }

    async def main(port: int) -> dict[str, int]:
        codes = {}
        for name, (attack, _) in cases.items():
            async with connect(port, certs) as client:
                attack(client)
                codes[name] = await client.closed_with()
        await served(port, certs)
        return codes

    with serve_h3(app) as srv:
        codes = run(main(srv.port))
    assert codes == {name: code for name, (_, code) in cases.items()}


# 5. Malformed frames on request streams


def test_request_stream_framing(serve_h3: ServeH3, certs: Certs) -> None:
    """Frames out of place on a request stream close the connection with H3_FRAME_UNEXPECTED;
    a stream that ends inside a frame, with H3_FRAME_ERROR."""
    headers = request_headers()
    trailers = frame(0x01, b"\x00\x00" + qpack_field(b"x-trailer", b"1"))
    cases: dict[str, tuple[bytes, bool, int]] = {
        "DATA before HEADERS": (frame(0x00, b"abc"), False, H3_FRAME_UNEXPECTED),
        "HTTP/2 PRIORITY (0x2)": (frame(0x02, b""), False, H3_FRAME_UNEXPECTED),
        "HTTP/2 PING (0x6)": (frame(0x06, b"12345678"), False, H3_FRAME_UNEXPECTED),
        "HTTP/2 WINDOW_UPDATE (0x8)": (frame(0x08, b"\x00" * 4), False, H3_FRAME_UNEXPECTED),
        "HTTP/2 CONTINUATION (0x9)": (headers + frame(0x09, b"x"), False, H3_FRAME_UNEXPECTED),
        "SETTINGS": (frame(0x04, b""), False, H3_FRAME_UNEXPECTED),
        "SETTINGS after HEADERS": (headers + frame(0x04, b""), False, H3_FRAME_UNEXPECTED),
        "GOAWAY": (frame(0x07, varint(0)), False, H3_FRAME_UNEXPECTED),
        "MAX_PUSH_ID": (frame(0x0D, varint(0)), False, H3_FRAME_UNEXPECTED),
        "CANCEL_PUSH": (frame(0x03, varint(0)), False, H3_FRAME_UNEXPECTED),
        "PUSH_PROMISE": (frame(0x05, varint(0) + b"\x00\x00"), False, H3_FRAME_UNEXPECTED),
        "DATA after trailers": (
            headers + frame(0x00, b"a") + trailers + frame(0x00, b"b"),
            False,
            H3_FRAME_UNEXPECTED,
        ),
        "HEADERS after trailers": (headers + trailers + trailers, False, H3_FRAME_UNEXPECTED),
        "end inside a HEADERS frame": (b"\x01\x05ab", True, H3_FRAME_ERROR),
        "end inside a frame head": (b"\x01", True, H3_FRAME_ERROR),
        "end inside a DATA frame": (headers + b"\x00\x0aabc", True, H3_FRAME_ERROR),
    }

    async def main(port: int) -> dict[str, int]:
        codes = {}
        for name, (data, end, _) in cases.items():
            async with connect(port, certs) as client:
                client.raw_request(data, end)
                codes[name] = await client.closed_with()
        await served(port, certs)
        return codes

    with serve_h3(app) as srv:
        codes = run(main(srv.port))
    assert codes == {name: code for name, (_, _, code) in cases.items()}


def test_request_stream_tolerated(serve_h3: ServeH3, certs: Certs) -> None:
    """Unknown frame types (reserved for greasing, §7.2.8) are skipped wherever they are; a
    stream that ends before any HEADERS is reset with H3_REQUEST_INCOMPLETE alone. The
    connection serves on."""
    unknown = frame(0x21, b"grease") + frame(0x1F * 7 + 0x21, b"")

    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            first = client.raw_request(unknown + request_headers(b"/unknown") + unknown)
            around_data = client.raw_request(
                request_headers(b"/data")
                + unknown
                + frame(0x00, b"ab")
                + unknown
                + frame(0x00, b"c")
                + unknown
            )
            empty = client.raw_request(b"", end=True)
            only_unknown = client.raw_request(unknown, end=True)
            results = [
                await client.response(stream_id)
                for stream_id in (first, around_data, empty, only_unknown)
            ]
            results.append(await client.get(b"/after"))
            assert client.terminated is None
            return results

    with serve_h3(app) as srv:
        first, around_data, empty, only_unknown, after = run(main(srv.port))
    assert (first.status, bytes(first.body)) == (200, b"GET /unknown 0")
    assert (around_data.status, bytes(around_data.body)) == (200, b"GET /data 3")
    assert (empty.reset, empty.headers) == (H3_REQUEST_INCOMPLETE, None)
    assert (only_unknown.reset, only_unknown.headers) == (H3_REQUEST_INCOMPLETE, None)
    assert (after.status, bytes(after.body)) == (200, b"GET /after 0")


def test_data_after_the_stream_is_over(serve_h3: ServeH3, certs: Certs) -> None:
    """Request body data still arriving after the server ended the stream (a malformed request
    reset with H3_MESSAGE_ERROR, a response written before the body was read, 431, 413) is
    discarded: the connection goes on."""

    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            ignore_stop_sending(client)
            big = qpack_field(b"x-big", huffman_a(20 * 1024), huffman=True)
            ids = [
                client.request(pseudo=[(b":method", b"POST"), (b":scheme", b"https")], end=False),
                client.request(b"POST", b"/early", body=b"a", end=False),
                client.raw_request(request_headers(b"/big", big), end=False),
                client.request(b"POST", b"/large", body=b"x" * 200, end=False),
            ]
            responses = [await client.response(stream_id) for stream_id in ids]
            for stream_id in ids:  # more of each body, then its end
                for _ in range(3):
                    client.raw(stream_id, frame(0x00, b"y" * 3000))
                client.raw(stream_id, b"", end=True)
            responses.append(await client.get(b"/after"))
            assert client.terminated is None
            return responses

    with serve_h3(app, limit_request_body=100) as srv:
        malformed, early, too_large, body_too_large, after = run(main(srv.port))
    assert (malformed.reset, malformed.headers) == (H3_MESSAGE_ERROR, None)
    assert (early.status, bytes(early.body)) == (200, b"early")
    assert too_large.status == 431
    assert body_too_large.status == 413
    assert (after.status, bytes(after.body)) == (200, b"GET /after 0")


def test_slow_request_head(serve_h3: ServeH3, certs: Certs) -> None:
    """A request stream whose HEADERS frame stops half way: after --timeout-request-header (1
    s here) the stream or the connection is ended, as HTTP/1.1 answers 408 and closes."""

    async def main(srv: RunningServer) -> tuple[Any, Any]:
        async with connect(srv.port, certs) as client:
            stream_id = client.raw_request(request_headers(b"/slow")[:10], end=False)
            response = client.responses[stream_id]
            done = asyncio.ensure_future(response.done.wait())
            closed = asyncio.ensure_future(client.closed.wait())
            # Bounded: 1 s, then up to two ticks, are well within it.
            await asyncio.wait([done, closed], timeout=TIMEOUT / 2)
            done.cancel()
            closed.cancel()
            return response, client.terminated

    with serve_h3(app, timeout_request_header=1) as srv:
        response, terminated = run(main(srv))
    assert terminated is not None or response.reset is not None or response.headers is not None


# 6. The client's unidirectional streams


def test_unidirectional_streams(serve_h3: ServeH3, certs: Certs) -> None:
    """A stream of an unknown type is stopped (STOP_SENDING H3_STREAM_CREATION_ERROR) and the
    connection goes on; a push stream from a client, frames out of place on the control
    stream, or a critical stream closed or reset, close the connection."""

    def control(data: bytes, end: bool = False) -> Callable[[H3Client], None]:
        def send(client: H3Client) -> None:
            stream_id = client.h3._local_control_stream_id
            assert stream_id is not None
            client.raw(stream_id, data, end)

        return send

    def reset_control(client: H3Client) -> None:
        stream_id = client.h3._local_control_stream_id
        assert stream_id is not None
        client.reset(stream_id, 0x100)

    def push(client: H3Client) -> None:
        client.raw_unidirectional(b"\x01" + varint(0))

    cases: dict[str, tuple[Callable[[H3Client], None], int]] = {
        "push stream": (push, H3_STREAM_CREATION_ERROR),
        "second SETTINGS": (control(frame(0x04, b"")), H3_FRAME_UNEXPECTED),
        "DATA on control": (control(frame(0x00, b"x")), H3_FRAME_UNEXPECTED),
        "HEADERS on control": (control(request_headers()), H3_FRAME_UNEXPECTED),
        "PUSH_PROMISE on control": (control(frame(0x05, b"\x00")), H3_FRAME_UNEXPECTED),
        "HTTP/2 frame on control": (control(frame(0x06, b"")), H3_FRAME_UNEXPECTED),
        "control stream ended": (control(b"", end=True), H3_CLOSED_CRITICAL_STREAM),
        "control stream reset": (reset_control, H3_CLOSED_CRITICAL_STREAM),
    }

    async def main(port: int) -> tuple[dict[int, int], Any, dict[str, int]]:
        async with connect(port, certs) as client:
            stream_id = client.raw_unidirectional(b"\x21" + b"ignored" * 100)
            await asyncio.wait_for(client.stopped.wait(), TIMEOUT)
            stops = dict(client.stops)
            assert stream_id in stops
            after = await client.get(b"/after")
            assert client.terminated is None
        codes = {}
        for name, (attack, _) in cases.items():
            async with connect(port, certs) as client:
                attack(client)
                codes[name] = await client.closed_with()
        await served(port, certs)
        return {k - stream_id: v for k, v in stops.items()}, after, codes

    with serve_h3(app) as srv:
        stops, after, codes = run(main(srv.port))
    assert stops == {0: H3_STREAM_CREATION_ERROR}
    assert (after.status, bytes(after.body)) == (200, b"GET /after 0")
    assert codes == {name: code for name, (_, code) in cases.items()}


# 7. Version negotiation and datagrams that are not QUIC


def test_version_negotiation(serve_h3: ServeH3, certs: Certs) -> None:
    """An Initial-sized datagram of an unknown version: a Version Negotiation packet, with the
    client's CIDs swapped and the versions the server speaks. Too short a datagram: no
    answer."""
    with serve_h3(app) as srv, udp(srv.port) as sock:
        dcid, scid = os.urandom(8), os.urandom(8)
        sock.send(long_packet(UNKNOWN_VERSION, dcid, scid))
        reply = sock.recv(65536)
        sock.send(long_packet(UNKNOWN_VERSION, os.urandom(8), os.urandom(8), size=1199))
        sock.send(long_packet(QUIC_V1, os.urandom(8), os.urandom(8), size=1199))
        sock.send(long_packet(QUIC_V2, os.urandom(8), os.urandom(8), first=0xD0, size=1199))
        # A Version Negotiation packet is never answered (RFC 9000 §6.1).
        sock.send(long_packet(0, os.urandom(8), os.urandom(8), first=0x80))
        short = answers(sock)
        run(served(srv.port, certs))
    assert reply[0] & 0x80 and reply[1:5] == b"\x00\x00\x00\x00"
    assert negotiation(reply) == (scid, dcid, [QUIC_V1, QUIC_V2])
    assert parse(reply).packet_type is QuicPacketType.VERSION_NEGOTIATION
    assert short == []


def test_version_negotiation_any_layout(serve_h3: ServeH3, certs: Certs) -> None:
    """RFC 8999 §5.1, RFC 9000 §5.2.2, §6.1, §17.2: beyond the version and the CIDs (of up to
    255 bytes), a packet of an unknown version has no known layout; a large enough one gets
    Version Negotiation whatever its type bits or the bytes after the CIDs."""
    cases = [(first, os.urandom(8), os.urandom(8)) for first in (0xC0, 0xD0, 0xE0, 0xF0, 0x80)]
    cases += [(0xC0, os.urandom(255), os.urandom(255)), (0xC0, b"", b"")]
    with serve_h3(app) as srv, udp(srv.port) as sock:
        replies = []
        for first, dcid, scid in cases:
            head = bytes((first,)) + UNKNOWN_VERSION.to_bytes(4, "big")
            head += bytes((len(dcid),)) + dcid + bytes((len(scid),)) + scid
            sock.send(head + b"\xff" * (1200 - len(head)))  # no v1 token/length layout
            replies.append([negotiation(reply) for reply in answers(sock)])
        run(served(srv.port, certs))
    expected = [[(scid, dcid, [QUIC_V1, QUIC_V2])] for _, dcid, scid in cases]
    assert replies == expected


def test_garbage_datagrams(
    serve_h3: ServeH3, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """Datagrams that are not QUIC, or not for any connection and unable to open one: no
    answer, no error, and the server serves on."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    cid = os.urandom(8)
    garbage = [
        b"",
        b"\x00",
        b"\x80",
        b"\xc0",
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"\x00" * 1200,  # fixed bit unset
        b"\xff" * 1199,  # an unknown version, too short to be answered
        b"\x40" + cid + os.urandom(1200),  # short header, a CID nobody uses
        b"\xc0\x00\x00\x00\x01\xff" + b"\x00" * 1300,  # DCID length 255
        b"\xc0\x00\x00\x00\x01\x08" + cid + b"\x15" + b"\x00" * 1300,  # SCID length 21
        b"\xc0\x00\x00\x00\x01\x08" + cid,  # truncated after the DCID
        # An Initial whose length runs past the datagram, and one with a token length so.
        b"\xc0\x00\x00\x00\x01\x08" + cid + b"\x00\x00\x7f\xff" + b"\x00" * 1200,
        b"\xc0\x00\x00\x00\x01\x08" + cid + b"\x00\x7f\xff" + b"\x00" * 1200,
        long_packet(QUIC_V1, cid, cid, first=0xE0),  # Handshake for no connection
        long_packet(QUIC_V1, cid, cid, first=0xD0),  # 0-RTT for no connection
        long_packet(QUIC_V1, cid, cid, first=0xF0),  # a Retry, from a client
    ]
    with serve_h3(app) as srv, udp(srv.port) as sock:
        for datagram in garbage:
            sock.send(datagram)
        got = answers(sock)
        quic = listener(srv)
        state = (dict(quic.per_address), set(quic.connections), dict(quic.routes))
        run(served(srv.port, certs))
    assert got == []
    assert state == ({}, set(), {})
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    assert srv.messages(logging.ERROR) == []


def test_initial_with_short_dcid_dropped(serve_h3: ServeH3, certs: Certs) -> None:
    """RFC 9000 §7.2: a client's first Destination CID MUST be at least 8 bytes; such an
    Initial does not conform, and §5.2.2 has the server drop what does not."""
    with serve_h3(app) as srv, udp(srv.port) as sock:
        for dcid in (b"", b"\x01", os.urandom(7)):
            sock.send(long_packet(QUIC_V1, dcid, os.urandom(8)))
        got = answers(sock)
        run(served(srv.port, certs))
    assert got == []


# 8. Retry


def test_retry_handshake(serve_h3: ServeH3, certs: Certs) -> None:
    """By default the client's first Initial gets a Retry, and the connection opens with its
    token; with http3_retry=False the first Initial opens it."""

    async def main(port: int) -> tuple[int, bytes]:
        async with connect(port, certs) as client:
            response = await client.get(b"/retry")
            return client._quic._retry_count, bytes(response.body)

    with serve_h3(app) as srv:
        assert run(main(srv.port)) == (1, b"GET /retry 0")
    with serve_h3(app, http3_retry=False) as srv:
        assert run(main(srv.port)) == (0, b"GET /retry 0")


def test_retry_token_checked(serve_h3: ServeH3, certs: Certs) -> None:
    """A Retry token is good only from the address and port it was sent to, to the CID of the
    Retry, and unaltered: otherwise the Initial is dropped, nothing answered or kept."""
    with serve_h3(app) as srv, udp(srv.port) as sock, udp(srv.port) as other:
        dcid, scid = os.urandom(8), os.urandom(8)
        sock.send(long_packet(QUIC_V1, dcid, scid))
        retry = parse(sock.recv(65536))
        token = retry.token
        other.send(long_packet(QUIC_V1, retry.source_cid, scid, token=token))
        sock.send(long_packet(QUIC_V1, os.urandom(8), scid, token=token))
        sock.send(long_packet(QUIC_V1, retry.source_cid, scid, token=token[:-1]))
        forged = token[:-1] + bytes((token[-1] ^ 1,))
        sock.send(long_packet(QUIC_V1, retry.source_cid, scid, token=forged))
        sock.send(long_packet(QUIC_V1, retry.source_cid, scid, token=b"\x00" * 20))
        got = answers(sock), answers(other)
        quic = listener(srv)
        state = dict(quic.per_address), set(quic.connections)
        run(served(srv.port, certs))
    assert retry.packet_type is QuicPacketType.RETRY
    assert retry.version == QUIC_V1 and retry.destination_cid == scid
    assert len(retry.source_cid) == 8 and retry.source_cid != dcid
    assert got == ([], [])
    assert state == ({}, set())


def test_retry_tokens() -> None:
    tokens = RetryTokens()
    addr = (LOCALHOST, 4433)
    odcid, rscid = os.urandom(8), os.urandom(8)
    now = 1000.0
    token = tokens.create(addr, odcid, rscid, now)
    assert tokens.validate(addr, rscid, token, now) == odcid
    assert tokens.validate(addr, rscid, token, now + TOKEN_LIFETIME) == odcid
    assert tokens.validate(("127.0.0.2", 4433), rscid, token, now) is None
    assert tokens.validate((LOCALHOST, 4434), rscid, token, now) is None
    assert tokens.validate(addr, odcid, token, now) is None
    assert tokens.validate(addr, rscid, token, now + 11) is None
    assert tokens.validate(addr, rscid, token, now - 1) is None  # issued in the future
    tampered_mac = token[:-1] + bytes((token[-1] ^ 1,))
    assert tokens.validate(addr, rscid, tampered_mac, now) is None
    tampered_body = bytes((token[0] ^ 1,)) + token[1:]
    assert tokens.validate(addr, rscid, tampered_body, now) is None
    for short in (b"", b"\x00", token[:32], token[-33:]):
        assert tokens.validate(addr, rscid, short, now) is None
    assert RetryTokens().validate(addr, rscid, token, now) is None  # another process's key


# 9. Migration is off


def test_no_migration(serve_h3: ServeH3, certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Datagrams for a connection's CIDs from another address (port) never reach it; the
    connection goes on from its own."""
    seen: list[Any] = []
    datagram_received = H3Connection.datagram_received

    def recording(self: H3Connection, data: bytes, addr: Any) -> None:
        seen.append(addr)
        datagram_received(self, data, addr)

    monkeypatch.setattr(H3Connection, "datagram_received", recording)

    async def main(srv: RunningServer) -> tuple[Any, Any, Any, list[bytes], Any]:
        quic = listener(srv)
        async with connect(srv.port, certs) as client:
            before = await client.get(b"/before")
            (conn,) = quic.connections
            cids = [cid for cid, routed in quic.routes.items() if routed is conn]
            assert cids
            with udp(srv.port) as sock:
                for cid in cids:
                    sock.send(b"\x40" + cid + os.urandom(60))  # 1-RTT
                    sock.send(long_packet(QUIC_V1, cid, os.urandom(8), first=0xE0))  # Handshake
                    sock.send(long_packet(QUIC_V1, cid, os.urandom(8)))  # Initial
                got = await asyncio.to_thread(answers, sock)
                other = sock.getsockname()
            after = await client.get(b"/after")
            return before, after, conn.addr, got, other

    with serve_h3(app) as srv:
        before, after, addr, got, other = run(main(srv))
    assert (before.status, after.status) == (200, 200)
    assert got == []
    assert other not in seen and other[1] != addr[1]
    assert set(seen) == {addr}
