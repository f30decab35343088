"""HTTP/2 conformance of fulmen's own frame layer (`h2frames`) and connection (`http2`), over
real sockets with raw frames: each rule of RFC 9113 they enforce gets its exact answer (GOAWAY
with its code and last stream id, RST_STREAM with its code, or a response), the server goes on
serving other connections, and a client's mistake logs no traceback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.conftest import TIMEOUT
from tests.protocols.h2peer import (
    ACK,
    CANCEL,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    ENABLE_CONNECT_PROTOCOL,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    HOLD,
    INITIAL_WINDOW_SIZE,
    LOOPS,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    Peer,
    Raw,
    healthy,
    open_peer,
    quiet,
    release,
    request,
)
from tests.protocols.test_http2_abuse import _still_serving

pytestmark = pytest.mark.timeout(60)

# Connection errors: GOAWAY (last stream id, code), then the close.

EH_ES = END_HEADERS | END_STREAM
PADPRIO = EH_ES | PADDED | PRIORITY_FLAG
Frames = Callable[[Peer], list[Any]]


def _split(second: int, *between: Any) -> Frames:
    """HEADERS without END_HEADERS on stream 1, `between`, a CONTINUATION on `second`."""

    def frames(p: Peer) -> list[Any]:
        block = p.encoder.encode(request())
        end = Raw(CONTINUATION, END_HEADERS, second, block[2:])
        return [Raw(HEADERS, END_STREAM, 1, block[:2]), *between, end]

    return frames


def _open(*frames: Any) -> Frames:
    """Stream 1 open (its app held, the request whole), then `frames`."""
    return lambda p: [p.req(1, HOLD), *frames]


def _body(*frames: Any) -> Frames:
    """Stream 1 open with a request body to come (its app held), then `frames`."""
    return lambda p: [p.req(1, HOLD, b"POST", end=False), *frames]


def _trailers(fields: list[tuple[bytes, bytes]], end: bool) -> Frames:
    """Stream 1 open with a body, then these trailers."""
    return lambda p: [*_body(DataFrame(1, b"a"))(p), p.headers(1, fields, end)]


def _headers(**options: Any) -> Frames:
    """A request in one HEADERS frame built with these hyperframe options (padding, priority)."""
    flags = ["END_HEADERS", "END_STREAM", *options.pop("flags")]
    return lambda p: [HeadersFrame(1, p.encoder.encode(request()), flags=flags, **options)]


def _cases(table: dict[Any, dict[str, Any]]) -> list[Any]:
    """The parameters of a table {expected: {id: frames}}: (frames, *expected)."""
    params = []
    for key, cases in table.items():
        for name, frames in cases.items():
            marks, frames = frames if isinstance(frames, tuple) else ((), frames)
            expected = key if isinstance(key, tuple) else (key,)
            params.append(pytest.param(frames, *expected, id=name, marks=marks))
    return params


CONNECTION_ERRORS: dict[tuple[int, int], dict[str, Any]] = {
    (0, FRAME_SIZE_ERROR): {
        "oversized-unknown": [Raw(0x20, 0, 0, b"x" * 16385)],  # §4.2: ours stays 16384
        "PING-7": [Raw(PING, 0, 0, b"1234567")],  # §6.7
        "PING-9": [Raw(PING, 0, 0, b"123456789")],
        "WINDOW_UPDATE-3": [Raw(WINDOW_UPDATE, 0, 0, b"\0\0\1")],  # §6.9
        "GOAWAY-7": [Raw(GOAWAY, 0, 0, b"\0" * 7)],  # §6.8
        "SETTINGS-5": [Raw(SETTINGS, 0, 0, b"\0\4\0\0\0")],  # §6.5
        "SETTINGS-7": [Raw(SETTINGS, 0, 0, b"\0\4\0\0\0\0\0")],
        "SETTINGS-ACK-6": [Raw(SETTINGS, ACK, 0, b"\0\4\0\0\0\0")],
        "HEADERS-PRIORITY-4": [Raw(HEADERS, END_HEADERS | PRIORITY_FLAG, 1, b"\0\0\0\3")],
    },
    (1, FRAME_SIZE_ERROR): {
        "oversized-DATA": _body(Raw(DATA, 0, 1, b"x" * 16385)),
        "RST_STREAM-3": _open(Raw(RST_STREAM, 0, 1, b"\0\0\0")),  # §6.4
        "WINDOW_UPDATE-5": _open(Raw(WINDOW_UPDATE, 0, 1, b"\0\0\0\0\1")),  # even on a stream
    },
    (0, PROTOCOL_ERROR): {
        # §3.4: the client preface (the bytes themselves here), then SETTINGS.
        "preface-wrong-24-bytes": b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        "preface-wrong-start": b"PRI * HTTP/3.0\r\n",
        "preface-then-PING": PREFACE + PingFrame(0, b"12345678").serialize(),
        "preface-then-HEADERS": PREFACE + Raw(HEADERS, EH_ES, 1, b"\x82\x86\x84").serialize(),
        # §6.1-6.4, §6.10: frames that need a stream, on stream 0.
        "DATA-on-0": [Raw(DATA, 0, 0, b"x")],
        "HEADERS-on-0": [Raw(HEADERS, EH_ES, 0, b"\x82\x86\x84")],
        "PRIORITY-on-0": [Raw(PRIORITY, 0, 0, b"\0\0\0\1\x10")],
        "RST_STREAM-on-0": [Raw(RST_STREAM, 0, 0, b"\0\0\0\0")],
        "CONTINUATION-on-0": [Raw(CONTINUATION, END_HEADERS, 0, b"\x82")],
        # §6.5, §6.7, §6.8: frames of the connection, on a stream.
        "SETTINGS-on-1": [Raw(SETTINGS, 0, 1)],
        "PING-on-1": [Raw(PING, 0, 1, b"\0" * 8)],
        "GOAWAY-on-1": [Raw(GOAWAY, 0, 1, b"\0" * 8)],
        # §6.5.2 (RFC 8441 §3 for ENABLE_CONNECT_PROTOCOL): SETTINGS values out of range.
        "ENABLE_PUSH-2": [SettingsFrame(0, {ENABLE_PUSH: 2})],
        "CONNECT_PROTOCOL-2": [SettingsFrame(0, {ENABLE_CONNECT_PROTOCOL: 2})],
        "MAX_FRAME-100": [SettingsFrame(0, {MAX_FRAME_SIZE: 100})],
        "MAX_FRAME-16383": [SettingsFrame(0, {MAX_FRAME_SIZE: 16383})],
        "MAX_FRAME-2**24": [SettingsFrame(0, {MAX_FRAME_SIZE: 2**24})],
        # §6.10, §5.5: only CONTINUATION of the same stream may follow HEADERS without
        # END_HEADERS, and only such a HEADERS (or CONTINUATION) may come before it.
        "CONTINUATION-other-stream": _split(3),
        "PING-inside-block": _split(1, PingFrame(0, b"12345678")),
        "unknown-inside-block": _split(1, Raw(0x20, 0, 0, b"x")),
        "CONTINUATION-alone": [Raw(CONTINUATION, END_HEADERS, 1, b"\x82")],
        # §6.2: padding as long as the payload, or longer.
        "HEADERS-pad-4-of-4": [Raw(HEADERS, END_HEADERS | PADDED, 1, b"\4\x82\x86\x84")],
        "HEADERS-padded-empty": [Raw(HEADERS, END_HEADERS | PADDED, 1)],
        "even-stream": lambda p: [p.req(2)],  # §5.1.1
        # §6.2: padding that leaves no room for the priority fields.
        "HEADERS-pad-over-priority": [Raw(HEADERS, PADPRIO, 1, b"\3\0\0\0\0\x10")],
        "WINDOW_UPDATE-0-on-0": [Raw(WINDOW_UPDATE, 0, 0, b"\0\0\0\0")],  # §6.9
    },
    (1, PROTOCOL_ERROR): {
        "PUSH_PROMISE": _open(Raw(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2\x82")),  # §8.4
        "CONTINUATION-after-end": _open(Raw(CONTINUATION, END_HEADERS, 1, b"\x82")),
        "DATA-pad-10-of-4": _body(Raw(DATA, PADDED, 1, b"\x0aabc")),  # §6.1
        # §5.1: on an idle stream (above any opened), only HEADERS and PRIORITY.
        "DATA-on-idle": _open(DataFrame(3, b"x")),
        "RST_STREAM-on-idle": _open(RstStreamFrame(3, CANCEL)),
        "WINDOW_UPDATE-on-idle": _open(WindowUpdateFrame(3, 1)),
    },
    # §5.1.1 asks PROTOCOL_ERROR for a new stream id below one used; fulmen answers as for
    # HEADERS on a closed stream (§5.1), STREAM_CLOSED.
    (5, STREAM_CLOSED): {"stream-5-then-3": lambda p: [p.req(5, HOLD), p.req(3)]},
    # §5.1.1: an even id is a PROTOCOL_ERROR, below the highest id too.
    (3, PROTOCOL_ERROR): {"even-below": lambda p: [p.req(3, HOLD), p.req(2)]},
    (0, FLOW_CONTROL_ERROR): {
        "INITIAL_WINDOW-2**31": [SettingsFrame(0, {INITIAL_WINDOW_SIZE: 2**31})]
    },
    # §6.9.2: a new INITIAL_WINDOW_SIZE that takes an open stream's window past 2**31-1.
    (1, FLOW_CONTROL_ERROR): {
        "INITIAL_WINDOW-overflows-stream": _open(
            WindowUpdateFrame(1, MAX_WINDOW - 65535), SettingsFrame(0, {INITIAL_WINDOW_SIZE: 65536})
        )
    },
    # §4.3: a header block that cannot be decoded.
    (0, COMPRESSION_ERROR): {
        "HPACK-index-0": [Raw(HEADERS, EH_ES, 1, b"\x80")],
        "HPACK-index-62": [Raw(HEADERS, EH_ES, 1, b"\x82\xbe")],
        "HPACK-truncated": [Raw(HEADERS, END_HEADERS, 1, b"\x00\x05ab")],
    },
    (1, COMPRESSION_ERROR): {
        "HPACK-after-1": lambda p: [p.req(1), Raw(HEADERS, EH_ES, 3, b"\x80")]
    },
}


@pytest.mark.parametrize(("frames", "last", "code"), _cases(CONNECTION_ERRORS))
def test_connection_error(server, frames: Any, last: int, code: int) -> None:
    srv, _ = server()
    peer = open_peer(srv, preface=not isinstance(frames, bytes))
    if isinstance(frames, bytes):  # a preface of its own
        peer.sock.sendall(frames)
    else:
        peer.send(*(frames(peer) if callable(frames) else frames))
    assert peer.connection_error() == (last, code)
    assert peer.closed
    assert not peer.resets()
    healthy(srv)


@LOOPS
def test_preface_byte_by_byte(server, loop: str) -> None:
    srv, _ = server(loop=loop)
    peer = open_peer(srv, preface=False)
    peer.sock.sendall(b"PRI ")  # enough to be HTTP/2: the server's SETTINGS come
    assert peer.read_until(lambda frames: any(f[0] == SETTINGS for f in frames))
    rest = PREFACE[4:] + SettingsFrame(0).serialize() + peer.req(1, "/p").serialize()
    for n in range(len(rest)):
        peer.sock.sendall(rest[n : n + 1])
    assert peer.response(1) == (200, b"")
    quiet(srv, peer)


# Stream errors: RST_STREAM on that stream, the connection goes on.

STREAM_ERRORS: dict[int, dict[str, Frames]] = {
    FRAME_SIZE_ERROR: {  # §6.3: PRIORITY of another length than 5
        "PRIORITY-4": _open(Raw(PRIORITY, 0, 1, b"\0\0\0\0")),
        "PRIORITY-6": _open(Raw(PRIORITY, 0, 1, b"\0" * 6)),
    },
    PROTOCOL_ERROR: {
        "PRIORITY-on-itself": _open(PriorityFrame(1, depends_on=1)),  # §5.3.1
        "WINDOW_UPDATE-0": _open(Raw(WINDOW_UPDATE, 0, 1, b"\0\0\0\0")),  # §6.9
    },
    FLOW_CONTROL_ERROR: {
        "WINDOW_UPDATE-overflow": _open(WindowUpdateFrame(1, MAX_WINDOW)),  # §6.9.1
        # More DATA than the stream's window (65535), sent without waiting.
        "DATA-beyond-window": _body(*[DataFrame(1, b"x" * 16384) for _ in range(4)]),
    },
    STREAM_CLOSED: {  # §5.1 half-closed (remote): after END_STREAM, the app still running
        "HEADERS-after-END_STREAM": lambda p: [p.req(1, HOLD), p.req(1, HOLD)],
        "DATA-after-END_STREAM": _open(DataFrame(1, b"late")),
    },
}
STREAM_ERRORS[PROTOCOL_ERROR] |= {
    # §8.1: trailers without END_STREAM make the request malformed, §8.1.1: PROTOCOL_ERROR.
    "trailers-without-END_STREAM": _trailers([(b"x-t", b"1")], False),
    # §8.1: no pseudo-header field in trailers (malformed).
    "trailers-with-pseudo-header": _trailers([(b":path", b"/x")], True),
    # §5.3.1 on HEADERS with the PRIORITY flag: the stream is reset, never served.
    "HEADERS-on-itself": _headers(depends_on=1, flags=["PRIORITY"]),
}


@pytest.mark.parametrize(("frames", "code"), _cases(STREAM_ERRORS))
def test_stream_error(server, frames: Frames, code: int) -> None:
    srv, app = server()
    peer = open_peer(srv)
    peer.send(*frames(peer))
    peer.sync()  # a stream error is answered as the frame is read
    assert peer.resets() == {1: code}
    peer.send(peer.req(3, "/next"))
    assert peer.response(3) == (200, b"")
    if app.held:  # the reset stream's app sees the disconnect once it reads
        release(srv, app)
        assert app.gone.wait(TIMEOUT)
    quiet(srv, peer, resets=1)
    assert not peer.of(HEADERS, 1) and not peer.of(DATA, 1)  # nothing after RST_STREAM
    _still_serving(srv)


# Frames the server takes, or ignores.


def _continued(end_on_headers: bool) -> Frames:
    """A header block in HEADERS (without END_HEADERS) and two CONTINUATION frames; END_STREAM
    on the HEADERS frame, or on DATA after the block (§8.1)."""

    def frames(p: Peer) -> list[Any]:
        block = p.encoder.encode([*request(b"/echo", b"POST"), (b"x-long", b"v" * 300)])
        n = len(block) // 3
        first = Raw(HEADERS, END_STREAM if end_on_headers else 0, 1, block[:n])
        end = Raw(CONTINUATION, END_HEADERS, 1, block[2 * n :])
        more = [] if end_on_headers else [DataFrame(1, b"body", flags=["END_STREAM"])]
        return [first, Raw(CONTINUATION, 0, 1, block[n : 2 * n]), end, *more]

    return frames


ANSWERED: dict[bytes, dict[str, Frames]] = {
    b"": {
        # §5.5: unknown frame types are ignored, whatever their flags or stream.
        "unknown-types": lambda p: [
            *[Raw(0x20, 0xFF, 0, b"ext"), Raw(0xFA, 0, 1, b"x" * 100)],
            *[p.req(1), Raw(0x0A, END_HEADERS, 1)],
        ],
        # §6.2: padding and priority fields on HEADERS.
        "padded": _headers(pad_length=20, flags=["PADDED"]),
        "padded-0": _headers(pad_length=0, flags=["PADDED"]),
        "priority": _headers(depends_on=0, stream_weight=200, exclusive=True, flags=["PRIORITY"]),
        "padded-priority": _headers(
            pad_length=255, depends_on=3, stream_weight=1, flags=["PADDED", "PRIORITY"]
        ),
        "CONTINUATION-END_STREAM-on-HEADERS": _continued(True),  # §6.10
        # A PRIORITY breaking §6.3 or §5.3.1 on an idle stream is dropped: RST_STREAM may not
        # be sent on an idle stream (§6.4). The stream's request is then served.
        "PRIORITY-4-idle-then-HEADERS": lambda p: [Raw(PRIORITY, 0, 1, b"\0\0\0\0"), p.req(1)],
        "PRIORITY-on-itself-idle-then-HEADERS": lambda p: [
            PriorityFrame(1, depends_on=1),
            p.req(1),
        ],
    },
    b"body": {"CONTINUATION-then-DATA": _continued(False)},
    # Trailers: the app gets the whole body (ASGI has no place for request trailers).
    b"abcdef": {
        "trailers": lambda p: [
            *[p.req(1, "/echo", b"POST", end=False), DataFrame(1, b"abc"), DataFrame(1, b"def")],
            p.headers(1, [(b"x-checksum", b"abc")]),
        ]
    },
}


@pytest.mark.parametrize(("frames", "body"), _cases(ANSWERED))
def test_answered(server, frames: Frames, body: bytes) -> None:
    srv, _ = server()
    peer = open_peer(srv)
    peer.send(*frames(peer))
    assert peer.response(1) == (200, body)
    quiet(srv, peer)
