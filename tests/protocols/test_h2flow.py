"""HTTP/2 over real sockets with raw frames, past the frame rules: frames on closed streams,
SETTINGS, flow control of request and response bodies, and the client's GOAWAY."""

from __future__ import annotations

import struct
import time
from typing import Any

import hpack
import pytest
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
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
    CONTINUATION,
    CREDIT_STEP,
    DATA,
    ENABLE_PUSH,
    END_HEADERS,
    END_STREAM,
    FLOW_CONTROL_ERROR,
    GOAWAY,
    HEADER_TABLE_SIZE,
    HEADERS,
    HOLD,
    INITIAL_WINDOW_SIZE,
    LOOPS,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    healthy,
    open_peer,
    quiet,
    release,
    writing_paused,
)
from tests.protocols.test_http2_abuse import _still_serving

pytestmark = pytest.mark.timeout(60)


def test_frames_on_closed_streams_are_ignored(server) -> None:
    """§6.9, §6.4: WINDOW_UPDATE and RST_STREAM may come for a while after a stream closed."""
    srv, _ = server()
    peer = open_peer(srv)
    peer.send(peer.req(1))
    assert peer.response(1) == (200, b"")
    peer.send(WindowUpdateFrame(1, 100), RstStreamFrame(1, CANCEL), PriorityFrame(1, depends_on=0))
    peer.send(peer.req(3, "/next"))
    assert peer.response(3) == (200, b"")
    quiet(srv, peer)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [("/echo", 413, NO_ERROR), ("/noread", 200, NO_ERROR), ("/early", 200, CANCEL)],
    ids=["413", "answered-unread", "413-too-late"],
)
def test_data_on_a_stream_the_server_reset_is_ignored(
    server, path: str, status: int, code: int
) -> None:
    """A body over --limit-request-body gets 413 (RST_STREAM NO_ERROR after it, §8.1), or
    RST_STREAM CANCEL once the response has begun; a body the app does not wait for is cut short
    with RST_STREAM NO_ERROR once the response is whole. What the client had sent meanwhile is
    ignored (§5.1 closed): no second RST_STREAM, no GOAWAY."""
    srv, app = server(limit_request_body=1000)
    peer = open_peer(srv)
    peer.send(peer.req(1, path, b"POST", end=False))
    if path == "/early":  # too late for a 413
        assert peer.read_until(lambda frames: bool(peer.of(HEADERS, 1)))
    if path != "/noread":
        peer.send(DataFrame(1, b"x" * 2000))
    assert peer.read_until(lambda frames: bool(peer.resets()))
    assert peer.resets() == {1: code}
    assert peer.fields(1)[0][b":status"] == b"%d" % status
    assert path != "/early" or app.gone.wait(TIMEOUT)  # the app sees the disconnect
    late = peer.headers(1, [(b"x-t", b"1")], end=True)
    peer.send(DataFrame(1, b"late"), DataFrame(1, b"x" * 5000), late, WindowUpdateFrame(1, 10))
    peer.send(peer.req(3, "/next"))
    assert peer.response(3) == (200, b"")
    quiet(srv, peer, resets=1)
    _still_serving(srv)


def test_client_reset_of_a_response_waiting_for_window(server) -> None:
    """§6.4: the stream ends at once, the bytes it still held are dropped, not answered."""
    srv, _ = server()
    peer = open_peer(srv)
    peer.send(peer.req(1, "/big?100000"))
    assert peer.read_until(lambda frames: sum(map(len, peer.of(DATA, 1))) >= 65535)
    peer.send(
        RstStreamFrame(1, CANCEL), WindowUpdateFrame(0, 1 << 20), WindowUpdateFrame(1, 1 << 20)
    )
    peer.send(peer.req(3, "/next"))
    assert peer.response(3) == (200, b"")
    quiet(srv, peer)
    assert sum(map(len, peer.of(DATA, 1))) == 65535


def test_large_response_through_a_full_socket_buffer(server) -> None:
    """Windows wide open, a client that does not read: the socket's buffers fill, then the
    transport's (pause_writing), the app's sends wait; then every byte arrives, in order."""
    srv, _ = server()
    peer = open_peer(srv, rcvbuf=1 << 16)
    size = 16 << 20  # more than the kernel buffers both ends (4 MiB sending)
    window = SettingsFrame(0, {INITIAL_WINDOW_SIZE: MAX_WINDOW})
    peer.send(window, WindowUpdateFrame(0, MAX_WINDOW - 65535), peer.req(1, f"/big?{size}"))
    assert writing_paused(srv)
    assert peer.response(1) == (200, b"b" * size)
    quiet(srv, peer)


def test_large_response_header_block_in_continuation_frames(server) -> None:
    """§4.3: a header block larger than SETTINGS_MAX_FRAME_SIZE, in HEADERS then CONTINUATION
    frames, nothing between them."""
    srv, _ = server()
    peer = open_peer(srv)
    peer.send(peer.req(1, "/head?40000"))
    last = (CONTINUATION, END_HEADERS)
    assert peer.read_until(lambda frames: any(f[:2] == last for f in frames))
    frames = [f for f in peer.frames if f[2] == 1]
    assert [(f[0], len(f[3])) for f in frames[:2]] == [(HEADERS, 16384), (CONTINUATION, 16384)]
    assert [f[1] for f in frames] == [END_STREAM, 0, END_HEADERS]  # END_STREAM on HEADERS
    fields = dict(hpack.Decoder().decode(b"".join(f[3] for f in frames), raw=True))
    assert fields[b"x-big"] == b"h" * 40000
    quiet(srv, peer)


# SETTINGS


def test_settings_are_acknowledged(server) -> None:
    """§6.5.3: every SETTINGS frame but an ACK is acknowledged (unknown parameters ignored)."""
    srv, _ = server()
    peer = open_peer(srv)
    mark = peer.sync()
    peer.send(SettingsFrame(0, {MAX_CONCURRENT_STREAMS: 10, ENABLE_PUSH: 0, 0x99: 5}))
    peer.send(SettingsFrame(0, {}), SettingsFrame(0, flags=["ACK"]))  # an ACK needs none
    peer.send(PingFrame(0, b"unasked!", flags=["ACK"]))  # neither does a PING ACK
    quiet(srv, peer)
    assert [f[1:] for f in peer.frames[mark:] if f[0] == SETTINGS] == [(ACK, 0, b"")] * 2


def test_max_frame_size_raised_makes_larger_data_frames(server) -> None:
    srv, _ = server()
    peer = open_peer(srv)
    settings = SettingsFrame(0, {MAX_FRAME_SIZE: 32768, INITIAL_WINDOW_SIZE: 1 << 20})
    peer.send(settings, WindowUpdateFrame(0, 1 << 20), peer.req(1, "/big?100000"))
    assert peer.response(1) == (200, b"b" * 100000)
    assert [len(data) for data in peer.of(DATA, 1)] == [32768, 32768, 32768, 1696]
    quiet(srv, peer)


@LOOPS
def test_initial_window_size_changes_apply_to_open_streams(server, loop: str) -> None:
    """§6.9.2: a response blocked on a spent window; lowering the initial window takes it below
    zero (credit does not unblock it), raising it lets exactly the rest out."""
    srv, _ = server(loop=loop)
    peer = open_peer(srv)
    peer.send(peer.req(1, "/big?100000"))
    assert peer.read_until(lambda frames: sum(map(len, peer.of(DATA, 1))) >= 65535)
    mark = peer.sync()
    assert sum(map(len, peer.of(DATA, 1))) == 65535  # both windows spent
    # The stream window: 0 - 65525 (lowered to 10) + 40000 = -25525; the connection's is open.
    lower = SettingsFrame(0, {INITIAL_WINDOW_SIZE: 10})
    peer.send(lower, WindowUpdateFrame(0, 1 << 20), WindowUpdateFrame(1, 40000))
    peer.sync()
    assert not peer.of(DATA, since=mark)
    peer.send(SettingsFrame(0, {INITIAL_WINDOW_SIZE: 60000}))  # +59990: 34465, the rest
    assert peer.response(1) == (200, b"b" * 100000)
    assert sum(map(len, peer.of(DATA, 1, since=mark))) == 34465
    quiet(srv, peer)


def test_header_table_size_change_gets_a_size_update(server) -> None:
    """RFC 7541 §4.2: the first header block after SETTINGS_HEADER_TABLE_SIZE changes opens
    with a dynamic table size update (0x20: size 0), and only that one."""
    srv, _ = server()
    peer = open_peer(srv)
    peer.send(SettingsFrame(0, {HEADER_TABLE_SIZE: 256}), peer.req(1))
    assert peer.response(1) == (200, b"")
    peer.send(peer.req(3))
    assert peer.response(3) == (200, b"")
    first, second = peer.of(HEADERS, 1)[0], peer.of(HEADERS, 3)[0]
    assert first[0] == 0x20 and second[0] != 0x20
    decoded = dict(hpack.Decoder().decode(first, raw=True))  # a fresh decoder takes it alone
    assert decoded[b":status"] == b"200"
    quiet(srv, peer)


# Flow control of request bodies


@pytest.mark.parametrize("streams", [1, 4])
def test_data_beyond_the_connection_window(server, streams: int) -> None:
    """§6.9.1: the connection window is 65535 per allowed stream. Every stream fills its own
    window with an app that does not read; one byte more on a refused stream (whose DATA still
    counts, §6.9) overflows the connection's."""
    srv, _ = server(h2_max_concurrent_streams=streams)
    peer = open_peer(srv)
    frames: list[Any] = []
    for stream_id in range(1, 2 * streams, 2):
        frames.append(peer.req(stream_id, HOLD, b"POST", end=False))
        frames += [DataFrame(stream_id, b"x" * 16383) for _ in range(4)]
        frames.append(DataFrame(stream_id, b"xxx"))  # 65535 in all
    refused = 2 * streams + 1
    peer.send(*frames, peer.req(refused, "/", b"POST", end=False), DataFrame(refused, b"x"))
    # The GOAWAY names the last stream served, not the refused one (§6.8).
    assert peer.connection_error() == (refused - 2, FLOW_CONTROL_ERROR)
    assert peer.resets() == {refused: REFUSED_STREAM}
    healthy(srv)


def test_request_body_read_by_the_app_is_credited(server) -> None:
    """WINDOW_UPDATE on the stream and on the connection as the app reads, in steps of at least
    half a window, never more than was read."""
    srv, _ = server()
    peer = open_peer(srv)
    mark = peer.sync()
    body = bytes(range(256)) * 192  # 48 KiB: three full frames
    chunks = [DataFrame(1, body[n : n + 16384]) for n in range(0, len(body), 16384)]
    peer.send(peer.req(1, "/echo", b"POST", end=False), *chunks)
    updated = lambda frames: bool(peer.of(WINDOW_UPDATE, 0, mark) and peer.of(WINDOW_UPDATE, 1))  # noqa: E731
    assert peer.read_until(updated)
    for stream_id in (0, 1):
        increments = [struct.unpack(">I", p)[0] for p in peer.of(WINDOW_UPDATE, stream_id, mark)]
        assert all(n >= CREDIT_STEP for n in increments) and sum(increments) <= len(body)
    peer.send(DataFrame(1, b"", flags=["END_STREAM"]))
    assert peer.response(1) == (200, body)
    quiet(srv, peer)


# The client's GOAWAY


@LOOPS
def test_client_goaway_no_error_lets_the_stream_finish(server, loop: str) -> None:
    """§6.8: streams in flight are still answered, new ones refused; then the server closes."""
    srv, app = server(loop=loop)
    peer = open_peer(srv)
    peer.send(peer.req(1, HOLD), GoAwayFrame(0, 0, NO_ERROR), peer.req(3))
    assert peer.read_until(lambda frames: bool(peer.resets()))
    assert peer.resets() == {3: REFUSED_STREAM}
    peer.sync()
    assert not peer.of(HEADERS, 1) and not peer.closed
    release(srv, app)
    assert peer.response(1) == (200, b"")
    assert peer.wait_closed() and not peer.of(GOAWAY)
    healthy(srv)


@LOOPS
def test_client_goaway_with_an_error_closes_at_once(server, loop: str) -> None:
    srv, app = server(loop=loop)
    peer = open_peer(srv)
    peer.send(peer.req(1, "/echo", b"POST", end=False), DataFrame(1, b"abc"))
    peer.sync()
    peer.send(GoAwayFrame(0, 0, PROTOCOL_ERROR))
    assert peer.wait_closed()
    assert app.gone.wait(TIMEOUT)
    assert app.received[-1] == {"type": "http.disconnect"}
    assert b"".join(m.get("body", b"") for m in app.received) == b"abc"
    assert not peer.of(HEADERS, 1) and not peer.of(GOAWAY)
    healthy(srv)


# Graceful shutdown (RFC 9113 §6.8)

SHUTDOWN_PING = (6, 0, 0, b"shutdown")  # (PING, no flags, stream 0, its opaque data)


def goaways(peer: Any) -> list[tuple[int, int]]:
    """(last stream id, error code) of each GOAWAY received."""
    fields = (struct.unpack_from(">II", payload) for payload in peer.of(GOAWAY))
    return [(last & 0x7FFFFFFF, code) for last, code in fields]


def shutting_down(srv: Any) -> Any:
    """A peer served stream 1, then the server's shutdown: its GOAWAY and PING have come."""
    peer = open_peer(srv)
    peer.send(peer.req(1))
    assert peer.response(1) == (200, b"")
    srv.server.should_exit = True
    assert peer.read_until(lambda frames: SHUTDOWN_PING in frames)
    return peer


@LOOPS
def test_shutdown_serves_the_streams_sent_before_the_client_saw_it(server, loop: str) -> None:
    """First a GOAWAY naming stream 2^31-1 and a PING: a request the client sent before it read
    them is served. Once the PING is answered, the final GOAWAY names that stream; streams
    opened after it are refused, and the connection closes once the served one is done."""
    srv, app = server(loop=loop)
    peer = shutting_down(srv)
    assert goaways(peer) == [(2**31 - 1, NO_ERROR)]
    peer.send(peer.req(3, HOLD))  # on its way as the GOAWAY arrived
    peer.sync()  # stream 3 is open before the PING is answered
    peer.send(PingFrame(0, b"shutdown", flags=["ACK"]))
    assert peer.read_until(lambda frames: len(goaways(peer)) == 2)
    assert goaways(peer)[1] == (3, NO_ERROR)
    peer.send(peer.req(5))
    assert peer.read_until(lambda frames: bool(peer.resets()))
    assert peer.resets() == {5: REFUSED_STREAM}
    assert not peer.closed and app.held == 1
    release(srv, app)
    assert peer.response(3) == (200, b"")
    assert peer.wait_closed()


@LOOPS
def test_shutdown_closes_an_idle_connection_after_the_grace(server, loop: str) -> None:
    """A client that does not answer the PING gets the final GOAWAY after the 1 s grace."""
    srv, _ = server(loop=loop)
    peer = shutting_down(srv)
    began = time.monotonic()
    assert peer.read_until(lambda frames: len(goaways(peer)) == 2)
    assert time.monotonic() - began > 0.8
    assert goaways(peer) == [(2**31 - 1, NO_ERROR), (1, NO_ERROR)]
    assert peer.wait_closed()
