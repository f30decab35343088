"""One HTTP/3 request stream (RFC 9114 §4.1): the `Framer` and the `Flow` of its request.

The request cycle calls the framer as for any protocol; each call becomes HEADERS and DATA
frames written to the QUIC stream, which QUIC sends as its flow control allows. Flow control
both ways:

- Sending: QUIC holds what the windows do not let out yet. Past `HIGH_WATER` bytes held for
  this stream, `write_paused` is set and the cycle's next `send` waits in `drain()` until the
  client's acknowledgements bring it under `LOW_WATER` (the connection checks as they come).
- Receiving: body bytes the app has not taken yet are counted; past `READ_BUFFER` of them the
  stream's receive window is held where it is (`Quic.hold`), so the client stops, and it grows
  again once the app has taken half. A WebSocket's reader pauses the same way.

A failure resets this stream alone (RESET_STREAM and STOP_SENDING); the connection goes on.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from fulmen.protocols.cycle import START, Headers, RequestCycle
from fulmen.protocols.flow import Stall, wake
from fulmen.protocols.h2fields import trailer_pairs
from fulmen.protocols.h3fields import Pairs, interim_pairs, response_pairs
from fulmen.protocols.h3frames import ErrorCode, data_head
from fulmen.protocols.quicconn import Quic
from fulmen.protocols.streams import Tunnel, count_body, drain, head_rules
from fulmen.state import ServerState

HIGH_WATER = 256 * 1024  # response bytes QUIC holds for a stream before `send` waits
LOW_WATER = HIGH_WATER // 4
# Request body bytes not taken by the app before the window holds: half of QUIC's initial
# stream window (1 MiB), so that the window has doubled once at most (aioquic doubles it as
# the data passes half of it) and a body the app does not read holds 2 MiB at most.
READ_BUFFER = 512 * 1024


class Connection(Protocol):
    """What a stream needs of its HTTP/3 connection (`fulmen.protocols.http3.H3Connection`)."""

    state: ServerState
    quic: Quic
    blocked: set[H3Stream]  # streams whose `send` waits for QUIC to send what it holds

    def send_fields(self, stream_id: int, pairs: Pairs, tail: bytes, end: bool) -> None:
        """Write a HEADERS frame of `pairs` (QPACK), then `tail`, then FIN if `end`."""

    def transmit_soon(self) -> None:
        """Send what QUIC has to send, once this loop iteration is done."""

    def reset_stream(self, stream: H3Stream, code: ErrorCode) -> None: ...

    def stream_done(self, stream: H3Stream) -> None: ...


class H3Stream:
    """The framer of request stream `stream_id`, created when its HEADERS are decoded."""

    __slots__ = (
        "conn",
        "cycle",
        "done",
        "no_body",
        "read_paused",
        "remaining",
        "remote_ended",
        "reset",
        "scope",
        "stall",
        "stream_id",
        "tunnel",
        "unread",
        "waiter",
        "write_paused",
    )

    def __init__(self, conn: Connection, stream_id: int, scope: dict[str, Any], ended: bool):
        self.conn = conn
        self.stream_id = stream_id
        self.scope = scope
        self.cycle: RequestCycle | None = None
        self.tunnel: Tunnel | None = None  # a WebSocket, which takes the DATA frames
        self.remote_ended = ended  # the request is whole (FIN received)
        self.done = False  # the response is whole (its FIN is written)
        self.reset = False  # the stream is gone (reset by either side, or the connection lost)
        self.no_body = False  # HEAD, 204, 304: the response has no DATA frames
        self.remaining: int | None = None  # of the application's Content-Length
        self.unread = 0  # request body bytes received and not yet taken by the app
        self.read_paused = False
        self.write_paused = False
        self.waiter: asyncio.Future[None] | None = None
        # `stall` (Stall) is set by the first tick that finds `send` waiting: left unset until
        # then, it costs a stream nothing.

    # Framer

    def send_head(self, status: int, headers: Headers, body: bytes, more_body: bool) -> None:
        pairs, length = response_pairs(status, headers, self.conn.state.default_fields)
        rules = head_rules(self.scope["method"], status, length, body, more_body)
        self.no_body, self.remaining, add_length = rules
        no_body = rules[0]
        if add_length:
            pairs.append((b"content-length", b"%d" % len(body)))
        if self.reset:
            return
        end = no_body or not more_body
        tail = data_head(len(body)) + body if body and not no_body else b""
        self.conn.send_fields(self.stream_id, pairs, tail, end)
        self._sent(end)

    def send_body(self, body: bytes, more_body: bool) -> None:
        if self.no_body or self.reset:
            return
        if self.remaining is not None:
            self.remaining = count_body(self.remaining, body, more_body)
        quic = self.conn.quic
        if body:
            quic.send_stream_data(self.stream_id, data_head(len(body)) + body, not more_body)
        elif not more_body:
            quic.send_stream_data(self.stream_id, b"", True)
        else:
            return
        self._sent(not more_body)

    def _sent(self, end: bool) -> None:
        conn = self.conn
        if end:
            self.done = True
        elif conn.quic.held_bytes(self.stream_id) > HIGH_WATER:
            self.write_paused = True
            conn.blocked.add(self)
        conn.transmit_soon()

    def file_socket(self, count: int) -> None:
        """A file body is read and sent in DATA frames, within QUIC's flow control."""
        return None

    def send_interim(self, status: int, headers: Headers = ()) -> None:
        if not self.reset:
            self.conn.send_fields(self.stream_id, interim_pairs(status, headers), b"", False)
            self.conn.transmit_soon()

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        pairs = trailer_pairs(headers)
        if self.remaining:
            raise RuntimeError("Response content shorter than Content-Length")
        if not self.reset:
            self.conn.send_fields(self.stream_id, pairs, b"", True)
            self._sent(True)

    def send_plain(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.send_head(status, headers, body, False)

    def consumed(self, size: int) -> None:
        """The app took `size` body bytes: past half of `READ_BUFFER`, the window grows again."""
        self.unread -= size
        if self.unread <= READ_BUFFER // 2:
            self._release()

    def _release(self) -> None:
        quic = self.conn.quic
        if self.stream_id in quic.held:
            quic.release(self.stream_id)
            if not self.reset:
                self.conn.transmit_soon()  # the MAX_STREAM_DATA that lets the client go on

    @property
    def flow(self) -> H3Stream:
        return self

    def abort(self) -> None:
        """RESET_STREAM H3_INTERNAL_ERROR: the client sees this response broken, the others
        go on."""
        if not self.reset:
            self.conn.reset_stream(self, ErrorCode.INTERNAL_ERROR)

    def complete(self) -> None:
        """The cycle is done with the response."""
        self.cycle = None
        if not self.reset:
            self.conn.stream_done(self)

    # Flow

    def pause_reading(self) -> None:
        """A WebSocket's reader is full: the stream's window stops growing."""
        self.read_paused = True
        self.conn.quic.hold(self.stream_id)

    def resume_reading(self) -> None:
        self.read_paused = False
        self._release()

    drain = drain

    def wake(self) -> None:
        """Let a `send` waiting in `drain()` go on."""
        self.write_paused = False
        waiter = self.waiter
        self.waiter = None
        wake(waiter)

    # Events from the connection

    def on_data(self, data: bytes) -> None:
        """A piece of a DATA frame's payload. Beyond --limit-request-body: 413 if the app has
        not answered yet, else the stream is reset; the app sees `http.disconnect`."""
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.on_data(data)
            return
        cycle = self.cycle
        if cycle is None or self.reset:  # the response is complete: the body is not wanted
            return
        limit = self.conn.state.limit_request_body
        if limit is not None and cycle.body_received + len(data) > limit:
            if cycle.phase is START:
                cycle.reject(413, b"Request Entity Too Large")
            cycle.on_disconnect()
            if not self.reset:
                self.conn.reset_stream(self, ErrorCode.REQUEST_CANCELLED)
            return
        self.unread += len(data)
        if self.unread > READ_BUFFER:
            self.conn.quic.hold(self.stream_id)
        cycle.on_body(data)

    def on_end(self) -> None:
        """FIN: the request is whole."""
        self.remote_ended = True
        if self.tunnel is not None:
            self.tunnel.on_end()
        elif self.cycle is not None:
            self.cycle.on_message_complete()

    def on_reset(self) -> None:
        """The stream is gone: the app sees `http.disconnect`, waiting sends go on."""
        self.reset = True
        self.conn.quic.release(self.stream_id)
        self.wake()
        if self.cycle is not None:
            self.cycle.on_disconnect()
        if self.tunnel is not None:
            self.tunnel.on_reset()

    # Server tick

    def check_timeout(self, now: float) -> None:
        """A request body coming too slowly (`--timeout-request-body`), or a response the
        client acknowledges nothing of (`--timeout-send`): this stream alone ends."""
        cycle = self.cycle
        if cycle is not None and self.tunnel is None and cycle.body_timed_out(now):
            cycle.refuse_body(408, b"Request Timeout")
            return
        stall: Stall | None = getattr(self, "stall", None)
        if stall is None:
            if not self.write_paused:
                return
            stall = self.stall = Stall()
        size = self.conn.quic.held_bytes(self.stream_id)
        timeout = self.conn.state.timeout_send
        if stall.check(now, self.write_paused, size, timeout) and not self.reset:
            self.conn.reset_stream(self, ErrorCode.REQUEST_CANCELLED)
