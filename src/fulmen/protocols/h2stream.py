"""One HTTP/2 stream (RFC 9113 §5): the `Framer` and the `Flow` of the request it carries.

The request cycle calls the framer as for any protocol; here each call becomes HEADERS and DATA
frames on this stream, queued on its connection, which writes them. Flow control both ways:

- Sending: DATA goes out as far as the stream's and the connection's send windows allow, in
  frames no larger than the peer's SETTINGS_MAX_FRAME_SIZE. The rest waits here, `write_paused`
  is set, and the cycle's next `send` waits in `drain()` until WINDOW_UPDATE frames (or the
  socket's write buffer) let it all out. A stream waiting for window holds up no other stream.
- Receiving: the body is credited back (WINDOW_UPDATE) as the application takes it
  (`consumed`), not as it arrives, so a slow reader only ever holds its own stream's window.

A failure resets this stream alone (RST_STREAM); the connection goes on.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from fulmen.protocols.cycle import START, Headers, RequestCycle
from fulmen.protocols.flow import Stall, wake
from fulmen.protocols.h2fields import interim_fields, response_fields, trailer_fields
from fulmen.protocols.h2frames import DATA, DEFAULT_WINDOW, END_STREAM, ErrorCode, frame
from fulmen.protocols.hpack import encode_field
from fulmen.protocols.streams import Tunnel, count_body, drain, head_rules
from fulmen.state import ServerState

FLUSH_SIZE = 65536  # DATA octets queued on a connection that are written without waiting


class Connection(Protocol):
    """What a stream needs of its HTTP/2 connection (`fulmen.protocols.http2.H2Connection`)."""

    state: ServerState
    streams: dict[int, H2Stream]  # the open streams
    out: list[bytes]  # frames to write
    write_paused: bool  # the socket's write buffer is full
    blocked: set[H2Stream]  # streams whose body waits for send window
    send_window: int  # the connection's
    initial_window: int  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
    frame_size: int  # the peer's SETTINGS_MAX_FRAME_SIZE
    queued: int  # DATA octets in `out`

    def flush(self, now: bool = False) -> None:
        """Write the queued frames (unless handling received frames: then after)."""

    def send_headers(self, stream_id: int, fields: list[bytes], end: bool) -> None:
        """Queue a header block of encoded fields."""

    def give_credit(self, stream: H2Stream | None, size: int) -> None:
        """Received bytes taken: window credit for the connection and `stream`."""

    def reset_stream(self, stream: H2Stream, code: ErrorCode) -> None: ...

    def stream_done(self, stream: H2Stream) -> None: ...


class H2Stream:
    """The framer of stream `stream_id`, created when its request's HEADERS arrive."""

    __slots__ = (
        "conn",
        "credit",
        "cycle",
        "done",
        "no_body",
        "pending",
        "pending_end",
        "read_paused",
        "recv_window",
        "remaining",
        "remote_ended",
        "reset",
        "scope",
        "send_window",
        "stall",
        "stream_id",
        "trailers",
        "tunnel",
        "unacked",
        "waiter",
        "write_paused",
    )

    def __init__(self, conn: Connection, stream_id: int, scope: dict[str, Any], ended: bool):
        self.conn = conn
        self.stream_id = stream_id
        self.scope = scope
        self.cycle: RequestCycle | None = None
        self.remote_ended = ended  # the request is whole (END_STREAM received)
        self.done = False  # the response is complete: its last frame is sent, or queued here
        self.reset = False  # the stream is gone (reset by either side, or the connection lost)
        self.no_body = False  # HEAD, 204, 304: the response has no DATA frames
        self.remaining: int | None = None  # of the application's Content-Length
        self.pending: bytes | None = None  # body bytes waiting for send window
        self.pending_end = False  # the stream ends after `pending`
        self.trailers: list[bytes] | None = None  # encoded, to send after `pending`
        self.send_window = conn.initial_window
        self.recv_window = DEFAULT_WINDOW  # what the client may still send: our initial window
        self.credit = 0  # request body bytes taken and not yet credited back
        self.unacked = 0  # request body bytes received and not yet taken by the app
        self.tunnel: Tunnel | None = None  # a WebSocket, which takes the DATA frames
        self.read_paused = False
        self.write_paused = conn.write_paused
        self.waiter: asyncio.Future[None] | None = None
        # `stall` (Stall) is set by the first tick that finds response bytes waiting for
        # window: left unset until then, it costs a stream nothing.

    # Framer

    def send_head(self, status: int, headers: Headers, body: bytes, more_body: bool) -> None:
        block, length = response_fields(status, headers, self.conn.state.default_fields)
        rules = head_rules(self.scope["method"], status, length, body, more_body)
        self.no_body, self.remaining, add_length = rules
        no_body = rules[0]
        if add_length:
            block.append(encode_field(b"content-length", b"%d" % len(body)))
        if self.reset:
            return
        end = no_body or (not more_body and not body)
        self.conn.send_headers(self.stream_id, block, end)
        if end:
            self._ended()
        else:
            self._data(body, not more_body)
        self.conn.flush()

    def send_body(self, body: bytes, more_body: bool) -> None:
        if self.no_body or self.reset:
            return
        if self.remaining is not None:
            self.remaining = count_body(self.remaining, body, more_body)
        self._data(body, not more_body)
        self.conn.flush()

    def file_socket(self, count: int) -> None:
        """A file body is read and sent in DATA frames, within the flow-control windows."""
        return None

    def send_interim(self, status: int, headers: Headers = ()) -> None:
        if not self.reset:
            self.conn.send_headers(self.stream_id, interim_fields(status, headers), False)
            self.conn.flush()

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        block = trailer_fields(headers)
        if self.remaining:
            raise RuntimeError("Response content shorter than Content-Length")
        if self.reset:
            return
        if self.pending is not None:
            self.trailers = block  # after the body still waiting for window
            return
        self.conn.send_headers(self.stream_id, block, True)
        self._ended()
        self.conn.flush()

    def send_plain(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.send_head(status, headers, body, False)

    def consumed(self, size: int) -> None:
        """Credit `size` body bytes back to the peer (WINDOW_UPDATE, in steps)."""
        self.unacked -= size
        if size and not self.reset:
            self.conn.give_credit(self, size)

    @property
    def flow(self) -> H2Stream:
        return self

    def abort(self) -> None:
        """RST_STREAM INTERNAL_ERROR: the peer sees this response broken, the others go on."""
        if not self.reset:
            self.conn.reset_stream(self, ErrorCode.INTERNAL_ERROR)

    def complete(self) -> None:
        """The cycle is done with the response (its last frame may still wait for window)."""
        self.cycle = None
        if self.pending is None and not self.reset:
            self.conn.stream_done(self)

    # Flow

    def pause_reading(self) -> None:
        self.read_paused = True  # credit is only given back by `consumed`, nothing to do

    def resume_reading(self) -> None:
        """A tunnel's reader has room again: credit back what it held."""
        self.read_paused = False
        if self.tunnel is not None and self.unacked and not self.reset:
            unacked, self.unacked = self.unacked, 0
            self.conn.give_credit(self, unacked)

    drain = drain

    def wake(self) -> None:
        """Let a `send` waiting in `drain()` go on, unless writing is still paused."""
        if (self.pending is None and not self.conn.write_paused) or self.reset:
            self.write_paused = False
            waiter = self.waiter
            self.waiter = None
            wake(waiter)

    # Sending DATA within the flow-control windows

    def _data(self, data: bytes, end: bool) -> None:
        if self.pending is not None:  # the cycle skipped its drain: the client has left
            self.pending += data
            self.pending_end = end
            return
        self.pending = data
        self.pending_end = end
        self.push()

    def push(self) -> None:
        """Send what the windows allow of `pending`: called on each new body and on each
        WINDOW_UPDATE or SETTINGS change while bytes wait."""
        data = self.pending
        if data is None or self.reset:
            return
        conn = self.conn
        stream_id = self.stream_id
        size = len(data)
        end = self.pending_end
        window = min(self.send_window, conn.send_window)
        if not size or (size <= window and size <= conn.frame_size):  # one frame, or none
            if size or end:  # (an empty frame needs no window)
                conn.out.append(frame(DATA, END_STREAM if end else 0, stream_id, data))
            sent = size
        else:
            sent = self._frames(data, window, end)
        self.send_window -= sent
        conn.send_window -= sent
        conn.queued += sent
        if conn.queued >= FLUSH_SIZE:
            # An app that sends without waiting on anything else must still meet the socket's
            # back-pressure (`pause_writing`), not queue all its window's worth here.
            conn.flush(True)
        if sent < size:
            self.pending = data[sent:]
            self.write_paused = True
            conn.blocked.add(self)
            return
        self.pending = None
        if end:
            self._ended()
        elif self.trailers is not None:
            conn.send_headers(stream_id, self.trailers, True)
            self._ended()
        conn.blocked.discard(self)
        self.wake()

    def _frames(self, data: bytes, window: int, end: bool) -> int:
        """Queue DATA frames of `data` up to `window` bytes; how many bytes went."""
        out = self.conn.out
        max_size = self.conn.frame_size
        size = len(data)
        sent = 0
        while sent < size and window > 0:
            chunk = min(size - sent, window, max_size)
            last = end and sent + chunk == size
            out.append(
                frame(DATA, END_STREAM if last else 0, self.stream_id, data[sent : sent + chunk])
            )
            sent += chunk
            window -= chunk
        return sent

    def _ended(self) -> None:
        """The last frame of the response is out: once the cycle is done too, so is the
        stream."""
        self.done = True
        if self.cycle is None:
            self.conn.stream_done(self)

    # Events from the connection

    def receive(self, data: bytes, length: int, end_stream: bool) -> None:
        """DATA for this stream: `length` counts against its window (the padding included).
        Beyond the window: RST_STREAM FLOW_CONTROL_ERROR; beyond --limit-request-body: 413
        if the app has not answered yet (the stream is then done, and RST_STREAM NO_ERROR
        stops the client), else RST_STREAM CANCEL. The app sees `http.disconnect`."""
        conn = self.conn
        if length > self.recv_window:
            conn.give_credit(None, length)
            conn.reset_stream(self, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self.recv_window -= length
        limit = conn.state.limit_request_body
        cycle = self.cycle
        if (
            limit is not None
            and self.tunnel is None  # a WebSocket's frames are no request body
            and cycle is not None
            and cycle.body_received + len(data) > limit
        ):
            conn.give_credit(None, length)
            if cycle.phase is START:
                cycle.reject(413, b"Request Entity Too Large")
            cycle.on_disconnect()
            if self.stream_id in conn.streams:  # not ended by the 413
                conn.reset_stream(self, ErrorCode.CANCEL)
            return
        if length:
            self.on_data(data, length)
        if end_stream:
            self.on_end()

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        padding = flow_controlled - len(data)
        if padding:  # never reaches the app: credit it back now
            self.conn.give_credit(self, padding)
        tunnel = self.tunnel
        if tunnel is not None:  # credited as it arrives, unless the reader is paused
            if self.read_paused:
                self.unacked += len(data)
            elif data:
                self.conn.give_credit(self, len(data))
            tunnel.on_data(data)
            return
        cycle = self.cycle
        if cycle is None or self.reset:  # the response is complete: the body is not wanted
            if data:
                self.conn.give_credit(self, len(data))
            return
        self.unacked += len(data)
        cycle.on_body(data)

    def on_end(self) -> None:
        """END_STREAM: the request is whole. Its last window credit is not needed any more."""
        self.remote_ended = True
        self.release_credit()
        if self.tunnel is not None:
            self.tunnel.on_end()
        elif self.cycle is not None:
            self.cycle.on_message_complete()

    def release_credit(self) -> None:
        """Credit back the connection window for body bytes the app will never take."""
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.give_credit(None, unacked)

    def on_reset(self) -> None:
        """The stream is gone: the app sees `http.disconnect`, waiting sends go on."""
        self.reset = True
        self.pending = None
        self.trailers = None
        self.release_credit()
        self.wake()
        if self.cycle is not None:
            self.cycle.on_disconnect()
        if self.tunnel is not None:
            self.tunnel.on_reset()

    # Server tick

    def check_timeout(self, now: float) -> None:
        """A request body coming too slowly (`--timeout-request-body`), or a response the
        client gives no window for (`--timeout-send`): this stream alone ends."""
        cycle = self.cycle
        if cycle is not None and self.tunnel is None and cycle.body_timed_out(now):
            cycle.refuse_body(408, b"Request Timeout")
            return
        pending = self.pending
        stall: Stall | None = getattr(self, "stall", None)
        if stall is None:
            if pending is None:
                return
            stall = self.stall = Stall()
        size = 0 if pending is None else len(pending)
        timeout = self.conn.state.timeout_send
        if stall.check(now, pending is not None, size, timeout) and not self.reset:
            self.conn.reset_stream(self, ErrorCode.CANCEL)
