"""The HTTP/2 stream framer under the cycle contract tests (`tests.protocols.harness`).

`h2_cycle(state, scope)` gives what `make_cycle` gives when the harness's `FRAMER` is "h2":

- `H2RecordingFramer`: a `RecordingFramer` (its `calls`, `blocked`, `drains`, `flow` and
  `kinds()` are what the tests assert on) that also makes every Framer call on a real `H2Stream`,
  stream 1 of a real `H2Connection` over a `FakeTransport`. Both must refuse the same calls
  (RuntimeError); where they disagree, `mismatches` says so.
- `H2Cycle`: a `RequestCycle` whose request events, when a test calls them, arrive as the
  client's frames through that connection (DATA, END_STREAM, RST_STREAM), so that the stream's
  receive window and its view of the request stay true.
- `H2RecordingFramer.check()`, after the test: the frames the server wrote, read by h2's client
  state machine, match the calls the cycle made.

Stream 1 is opened when the test first touches the framer or the request events, so that
`cycle.more_body = True`, set after `make_cycle`, decides whether the request has a body.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError
from hyperframe.frame import Frame

from fulmen.protocols.cycle import RequestCycle
from fulmen.protocols.h2stream import H2Stream
from fulmen.protocols.http2 import H2Connection
from fulmen.state import ServerState
from tests.protocols.harness import FakeTransport, RecordingFramer

STREAM = 1
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"test"), (b":path", b"/")]
# Fields HTTP/2 forbids (RFC 9113 §8.2.2): the stream drops them from a response head.
CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
NO_BODY = frozenset((204, 304))
Fields = list[tuple[bytes, bytes]]


class Link:
    """A real `H2Connection` and h2's client state machine, joined by a `FakeTransport`: the
    client reads what the server wrote (`sync`) and sends it frames (`send`)."""

    def __init__(self, state: ServerState) -> None:
        self.conn = H2Connection(state)
        self.transport = FakeTransport(state.loop, self.conn)
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(config)
        self.client.initiate_connection()
        self.read = 0  # how much of `transport.written` the client has read
        self.events: list[h2.events.Event] = []
        self.error: ProtocolError | None = None  # what the server got wrong, as the client saw
        self.request_ended = False  # the client sent END_STREAM on stream 1

    def open(self, scope: dict[str, Any], cycle: RequestCycle, ended: bool) -> H2Stream:
        """The client's request on stream 1, with END_STREAM if `ended`, taken in by the server's
        connection with no app started; then its stream, wired as `H2Connection._serve` does."""
        self.client.send_headers(STREAM, REQUEST, end_stream=ended)
        self.request_ended = ended
        served: list[int] = []
        self.conn._serve = lambda stream_id, *_: served.append(stream_id)  # type: ignore[method-assign]
        try:
            self.conn.data_received(self.client.data_to_send())
        finally:
            del self.conn._serve
        assert served == [STREAM]
        self.conn.flush(True)
        stream = H2Stream(self.conn, STREAM, scope, ended)
        stream.cycle = cycle
        self.conn.streams[STREAM] = stream
        self.conn.deadline = 0.0
        return stream

    def sync(self) -> None:
        """The client reads what the server wrote since the last time."""
        written = self.transport.written
        data, self.read = written[self.read :], len(written)
        if data and self.error is None:
            try:
                self.events += self.client.receive_data(data)
            except ProtocolError as exc:
                self.error = exc

    def send(self, frames: Callable[[h2.connection.H2Connection], None]) -> bool:
        """The client queues `frames` (having read the server's) and the server receives them,
        as from its socket; False if the client cannot send them: its stream 1 is closed."""
        self.sync()
        try:
            frames(self.client)
        except StreamClosedError:
            return False
        self.conn.data_received(self.client.data_to_send())
        return True


class H2RecordingFramer(RecordingFramer):
    """A `RecordingFramer` whose every Framer call is also made on the real `H2Stream` of
    stream 1. Both refuse a call (RuntimeError) or neither; a disagreement, or any other error
    of the stream, goes into `mismatches` and the call behaves as the RecordingFramer's."""

    def __init__(self, state: ServerState, scope: dict[str, Any]) -> None:
        super().__init__()
        self.link = Link(state)
        self.scope = scope
        self.cycle: RequestCycle | None = None  # set by `h2_cycle`
        self.stream: H2Stream | None = None  # opened on first use
        self.mismatches: list[str] = []
        self.inside = False  # the server side is running: the cycle's events come from it
        self.reset_at: int | None = None  # len(calls) when the client reset stream 1
        self.reset_offset = 0  # len(transport.written) then
        self.body_expected = False  # the request was still open when the response completed

    def opened(self) -> H2Stream:
        """Stream 1, opened now if it is not yet: with a request body if the cycle expects one."""
        if self.stream is None:
            assert self.cycle is not None
            self.stream = self.link.open(self.scope, self.cycle, not self.cycle.more_body)
        return self.stream

    # Framer

    def send_head(self, status: int, headers: Iterable[Any], body: bytes, more_body: bool) -> None:
        self._both("send_head", status, list(headers), body, more_body)

    def send_body(self, body: bytes, more_body: bool) -> None:
        self._both("send_body", body, more_body)

    def send_interim(self, status: int, headers: Iterable[Any] = ()) -> None:
        self._both("send_interim", status, list(headers))

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._both("send_trailers", headers)

    def send_plain(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self._both("send_plain", status, body, headers)

    def consumed(self, size: int) -> None:
        self._both("consumed", size)

    def abort(self) -> None:
        self._both("abort")

    def complete(self) -> None:
        self.body_expected = not self.link.request_ended
        self._both("complete")

    def _both(self, name: str, *args: Any) -> None:
        """`name(*args)` on the H2Stream, then on the RecordingFramer, whose outcome stands."""
        h2_error = self._on_stream(name, args)
        try:
            getattr(RecordingFramer, name)(self, *args)
        except RuntimeError:
            if not isinstance(h2_error, RuntimeError):
                self.mismatches.append(
                    f"{name}{args!r}: RecordingFramer raised, H2Stream {h2_error!r}"
                )
            raise
        if h2_error is not None:
            self.mismatches.append(f"{name}{args!r}: only H2Stream raised {h2_error!r}")

    def _on_stream(self, name: str, args: tuple[Any, ...]) -> Exception | None:
        """The call on the H2Stream: the error it raised, if any."""
        stream = self.opened()
        self.inside = True
        try:
            getattr(stream, name)(*args)
        except Exception as exc:
            return exc
        finally:
            self.inside = False
        return None

    # Request events, as the client's frames

    def client_sends(self, frames: Callable[[h2.connection.H2Connection], None]) -> bool:
        """The client sends `frames` on stream 1; the connection hands the event to the cycle.
        False if the event is to go to the cycle directly: it comes from the server side (the
        stream or the connection calling the cycle), or stream 1 is closed for the client."""
        if self.inside:
            return False
        self.opened()
        # What the server wrote before this (it writes once per loop iteration) is on the
        # wire before the client's frames, as over a socket.
        self.link.conn.flush(True)
        self.inside = True
        try:
            return self.link.send(frames)
        finally:
            self.inside = False

    def client_ends_request(self) -> bool:
        """The client's request is whole: END_STREAM (an empty DATA frame)."""
        sent = self.client_sends(lambda client: client.end_stream(STREAM))
        self.link.request_ended |= sent
        return sent

    def client_resets(self) -> bool:
        """The client leaves: RST_STREAM CANCEL. The server must send nothing more on stream 1."""
        self.link.conn.flush(True)  # what the server wrote before (see `client_sends`)
        offset, at = len(self.link.transport.written), len(self.calls)
        sent = self.client_sends(lambda client: client.reset_stream(STREAM, ErrorCodes.CANCEL))
        if sent and self.reset_at is None:
            self.reset_at, self.reset_offset = at, offset
        return sent

    # After the test

    def check(self) -> None:
        """The frames the server wrote, as the client read them, match the calls."""
        assert not self.mismatches, f"H2Stream and the contract disagree: {self.mismatches}"
        stream = self.opened()
        link = self.link
        link.sync()
        assert link.error is None, f"the client refused the server's frames: {link.error!r}"
        assert not link.conn.failed and not link.transport.closing, "the connection must go on"
        assert stream.pending is None, "body bytes still wait for flow-control window"
        calls = self.calls if self.reset_at is None else self.calls[: self.reset_at]
        expected = predicted(calls, self.body_expected)
        assert observed(link.events, expected) == expected
        late = frames_on(link.transport.written[self.reset_offset :], STREAM)
        assert self.reset_at is None or not late, f"sent on stream 1 after the client left: {late}"


class H2Cycle(RequestCycle):
    """A `RequestCycle` whose request events, called by a test, arrive as the client's frames
    through the real connection: `on_body` as DATA, `on_message_complete` as END_STREAM,
    `on_disconnect` as RST_STREAM. The connection calls them back, and then they take effect.
    Where the client cannot send them (stream 1 is closed), they take effect directly."""

    __slots__ = ()

    def on_body(self, data: bytes) -> None:
        if not _framer(self).client_sends(lambda client: client.send_data(STREAM, data)):
            super().on_body(data)

    def on_message_complete(self) -> None:
        if not _framer(self).client_ends_request():
            super().on_message_complete()

    def on_disconnect(self) -> None:
        if not _framer(self).client_resets():
            super().on_disconnect()


def _framer(cycle: RequestCycle) -> H2RecordingFramer:
    framer = cycle.framer
    assert isinstance(framer, H2RecordingFramer)
    return framer


def h2_cycle(state: ServerState, scope: dict[str, Any]) -> tuple[H2Cycle, H2RecordingFramer]:
    """A cycle for `scope` over an `H2RecordingFramer`, on a fresh connection of `state`."""
    framer = H2RecordingFramer(state, scope)
    cycle = framer.cycle = H2Cycle(state, framer, scope)
    return cycle, framer


# What stream 1 carried


@dataclass
class StreamView:
    """Stream 1's response: as the cycle's calls predict it, or as the client saw it."""

    responses: list[tuple[int, Fields]] = field(default_factory=list)  # interim ones first
    data: bytes = b""
    trailers: Fields | None = None
    ended: bool = False  # END_STREAM
    reset: ErrorCodes | None = None  # the RST_STREAM code the server sent


def predicted(calls: list[tuple[Any, ...]], body_expected: bool) -> StreamView:
    """What the client must see for `calls`. A completed response ends the stream; with the
    request body still expected, RST_STREAM NO_ERROR follows (`H2Connection.stream_done`)."""
    view = StreamView()
    for call in calls:
        kind = call[0]
        if kind == "interim":
            view.responses.append((call[1], _fields(call[2] if len(call) > 2 else [])))
        elif kind in ("head", "plain"):
            status, headers, body = (
                (call[1], call[2], call[3]) if kind == "head" else (call[1], call[3], call[2])
            )
            view.responses.append((status, _fields(headers)))
            view.data += b"" if status in NO_BODY else body
        elif kind == "body":
            view.data += b"" if view.responses[-1][0] in NO_BODY else call[1]
        elif kind == "trailers":
            view.trailers = _fields(call[1])
        elif kind == "complete":
            view.ended = True
            view.reset = ErrorCodes.NO_ERROR if body_expected else None
        elif kind == "abort":
            view.reset = ErrorCodes.INTERNAL_ERROR
    return view


def observed(events: list[h2.events.Event], expected: StreamView) -> StreamView:
    """What the client saw on stream 1. Of each response head, only the fields named in the
    expected one count (the server adds server, date, content-length)."""
    view = StreamView()
    names = [{name for name, _ in fields} for _, fields in expected.responses]
    for event in events:
        if getattr(event, "stream_id", None) != STREAM:
            continue
        if isinstance(event, (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)):
            wanted = names[len(view.responses)] if len(view.responses) < len(names) else set()
            view.responses.append(_response(event.headers or [], wanted))
        elif isinstance(event, h2.events.DataReceived):
            view.data += event.data or b""
        elif isinstance(event, h2.events.TrailersReceived):
            view.trailers = [(name, value) for name, value in event.headers or []]
        elif isinstance(event, h2.events.StreamEnded):
            view.ended = True
        elif isinstance(event, h2.events.StreamReset):
            view.reset = ErrorCodes(event.error_code)
    return view


def _fields(headers: Iterable[tuple[bytes, bytes]]) -> Fields:
    """Header fields as HTTP/2 carries them: lower-cased, none connection-specific."""
    lowered = [(name.lower(), value) for name, value in headers]
    return [(name, value) for name, value in lowered if name not in CONNECTION_SPECIFIC]


def _response(block: Iterable[tuple[bytes, bytes]], wanted: set[bytes]) -> tuple[int, Fields]:
    block = list(block)
    status = int(dict(block)[b":status"])
    return status, [(name, value) for name, value in block if name in wanted]


def frames_on(data: bytes, stream_id: int) -> list[str]:
    """The types of the frames on `stream_id` in `data`, whole frames as the server wrote."""
    found = []
    offset = 0
    while offset + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[offset : offset + 9]))
        if frame.stream_id == stream_id:
            found.append(type(frame).__name__)
        offset += 9 + length
    return found
