"""The HTTP/2 connection (RFC 9113): frames in, one request cycle per stream out, each stream
its own `Framer` (`fulmen.protocols.h2stream`).

`data_received -> FrameReader (h2frames) -> on_headers/on_data/... -> streams ->
RequestCycle.run (app) -> frames`. Frames written while received frames are handled go out in
one `transport.write`, and so do those of every stream that sends in one loop iteration.

What is decided here, once per connection: the SETTINGS we offer, which streams are served
and the stream states of RFC 9113 §5.1 (a client's stream ids only ever grow; a stream not
open below the highest is closed), connection errors (GOAWAY, then close), the connection's
windows, graceful shutdown (GOAWAY with the last stream id, in-flight streams finish), the
keep-alive and preface timeouts, and the bounds that keep a hostile client's cost bounded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from fulmen.protocols.cycle import client_text
from fulmen.protocols.flow import Stall
from fulmen.protocols.h2c import Upgrade
from fulmen.protocols.h2fields import (
    HeaderBlocks,
    Malformed,
    Request,
    from_http1,
    trailers_valid,
)
from fulmen.protocols.h2frames import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_WINDOW,
    HEADER_TABLE_SIZE,
    INITIAL_WINDOW_SIZE,
    MAX_FRAME_SIZE,
    MAX_WINDOW,
    SETTINGS_ACK,
    ConnectionFailure,
    ErrorCode,
    FrameReader,
    goaway,
    header_frames,
    ping,
    ping_ack,
    rst_stream,
    server_preface,
    window_update,
)
from fulmen.protocols.h2stream import H2Stream
from fulmen.protocols.hpack import Encoder
from fulmen.protocols.linger import SHUTDOWN_GRACE, linger
from fulmen.protocols.scope import EXTENSIONS, endpoints, http_scope, tls_of
from fulmen.protocols.streams import sessions, start, tick
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

STREAM_WINDOW = DEFAULT_WINDOW  # each stream's receive window (SETTINGS_INITIAL_WINDOW_SIZE)
# Each stream's window fits in the connection's, so a stream whose app reads slowly holds back
# only its own body. Credit goes back in WINDOW_UPDATE frames of at least half a stream window.
CREDIT_STEP = STREAM_WINDOW // 2
# Bounds on what a client may make the server do per second (per server tick), beyond which the
# connection ends with GOAWAY ENHANCE_YOUR_CALM: streams it resets before their response is
# complete (rapid reset, CVE-2023-44487), PING and SETTINGS frames (each needs an answer:
# CVE-2019-9512, -9515), empty DATA frames that end nothing (CVE-2019-9518), and DATA on closed
# streams (each answered with RST_STREAM).
RESETS_PER_TICK = 200
CONTROL_PER_TICK = 1000
EMPTY_DATA_PER_TICK = 1000
CLOSED_DATA_PER_TICK = 100
_REMEMBERED_RESETS = 1024  # streams we reset, whose late frames are ignored (RFC 9113 §5.1)
_LAST_STREAM = 2**31 - 1  # the first GOAWAY of a graceful shutdown names no stream yet (§6.8)
_SHUTDOWN_PING = b"shutdown"  # its PING: once answered, no stream opened before it is on the way


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection: its streams, its SETTINGS, GOAWAY and timeouts."""

    def __init__(self, state: ServerState, upgrade: Upgrade | None = None) -> None:
        self.state = state
        self.upgrade = upgrade
        self.streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()  # streams with body bytes waiting for window
        self.out: list[bytes] = []  # frames to write
        self.write_paused = False
        self.batching = False  # a write is due at the end of this loop iteration
        self.draining = False  # shutting down: GOAWAY and PING sent, streams still served
        self.closing = False  # GOAWAY sent: no new streams
        self.failed = False  # a connection error: nothing more is read or sent
        self.deadline = 0.0
        self.highest = 0  # the highest stream id the client opened
        self.last_served = 0  # the highest stream id whose request was served (GOAWAY, §6.8)
        self.queued = 0  # DATA octets in `out`: written at once past FLUSH_SIZE
        self.reset_ids: dict[int, None] = {}  # streams we reset lately
        self.reader = FrameReader(self, state.limits.head + DEFAULT_FRAME_SIZE)
        self.blocks = HeaderBlocks(state.limits.head, state.ws_factory is not None)
        self.encoder = Encoder()
        # Sending: the peer's settings and the connection's send window.
        self.send_window = DEFAULT_WINDOW
        self.initial_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.frame_size = DEFAULT_FRAME_SIZE  # the peer's SETTINGS_MAX_FRAME_SIZE
        # Receiving: the connection's window, and the credit not yet given back.
        self.recv_window = max(state.h2_max_streams * STREAM_WINDOW, DEFAULT_WINDOW)
        self.credit = 0
        # Apps still running for streams the client reset: they count against the stream limit.
        self.orphans = 0
        self.stall = Stall()  # the socket's: a client that reads nothing at all
        self.resets = self.control = self.empty = self.closed_data = 0  # per tick

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.state
        self.transport = transport = cast(asyncio.Transport, transport)
        self.endpoints = client, _, _ = endpoints(transport)
        self.tls = tls_of(transport, state)
        proxy = state.proxy_headers
        self.proxy = proxy if proxy is not None and proxy.trusts(client) else None
        self.out.append(
            server_preface(
                state.h2_max_streams,
                state.limits.head,
                STREAM_WINDOW,
                self.recv_window,
                state.ws_factory is not None,  # extended CONNECT for WebSockets (RFC 8441)
            )
        )
        # The preface (or the request on stream 1) must come within the header timeout.
        self.deadline = state.clock + state.timeout_request_header
        state.connections.add(self)
        upgrade = self.upgrade
        if upgrade is not None:
            self.upgrade = None
            self._upgraded(upgrade)
        self._write()
        if state.shutting_down:
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        batching, self.batching = self.batching, True
        try:
            self.reader.feed(data)
        except ConnectionFailure as exc:
            self._connection_error(exc.code, str(exc))
        finally:
            self.batching = batching
            if not batching:
                self._write()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.failed = True
        self.out.clear()
        # Python 3.10's TLS transport warns when it is collected unclosed, even after the peer
        # closed it; closing a lost transport does nothing else.
        self.transport.close()
        self._drop_streams()

    def _drop_streams(self) -> None:
        """The connection is over: every stream's app sees `http.disconnect`."""
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for stream in streams:
            stream.on_reset()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            stream.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.wake()

    # Writing

    def flush(self, now: bool = False) -> None:
        """Write the frames queued in `out`: `now`, or once per loop iteration, so that the
        frames of every stream that sent meanwhile go out in one `transport.write` (while
        received frames are handled, at their end)."""
        if now:
            self._write()
        elif not self.batching:
            self.batching = True
            self.state.loop.call_soon(self._write_batch)

    def _write_batch(self) -> None:
        self.batching = False
        self._write()

    def _write(self) -> None:
        out = self.out
        self.queued = 0
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            if not self.transport.is_closing():
                self.transport.write(data)

    def _close(self) -> None:
        """Close the connection after the frames queued so far; frames the client still sends
        meanwhile are read and dropped, so that they do not turn into a reset under the GOAWAY
        (`fulmen.protocols.linger`)."""
        self._write()
        if linger(self.transport, self.state):
            self.state.connections.discard(self)  # the lingering transport is no longer ours

    def send_headers(self, stream_id: int, fields: list[bytes], end: bool) -> None:
        """Queue a header block on `stream_id` (HEADERS, and CONTINUATION if it is large):
        `fields` encoded each by `hpack.encode_field`."""
        self.out.append(header_frames(stream_id, self.encoder.block(fields), end, self.frame_size))

    def give_credit(self, stream: H2Stream | None, size: int) -> None:
        """`size` received bytes are taken (or will never be): WINDOW_UPDATE once enough has
        gathered, on the connection and, if given and still open, on `stream`."""
        out = self.out
        queued = len(out)
        credit = self.credit + size
        if credit >= CREDIT_STEP:
            out.append(window_update(0, credit))
            self.recv_window += credit
            credit = 0
        self.credit = credit
        if stream is not None and not stream.remote_ended and not stream.reset:
            stream.credit += size
            if stream.credit >= CREDIT_STEP:
                out.append(window_update(stream.stream_id, stream.credit))
                stream.recv_window += stream.credit
                stream.credit = 0
        if len(out) > queued:
            self.flush()

    # Frames (`fulmen.protocols.h2frames.Receiver`)

    def on_headers(
        self, stream_id: int, block: bytes, end_stream: bool, refuse: ErrorCode | None = None
    ) -> None:
        """A header block: a request opening a stream, or its trailers. `refuse`: the frame
        broke a rule of its stream (§5.3.1), which is reset with this code, not served."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._trailers(stream, block, end_stream, refuse)
            return
        if not stream_id & 1:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "even stream id from a client")
        if stream_id <= self.highest:
            self.blocks.fields(block)  # the HPACK table follows every block (RFC 9113 §4.3)
            if stream_id not in self.reset_ids:
                raise ConnectionFailure(ErrorCode.STREAM_CLOSED, "HEADERS on a closed stream")
            return  # sent before the client saw our reset: ignored (RFC 9113 §5.1)
        self.highest = stream_id
        request = self.blocks.requests.get(block)  # kept from an earlier request
        if request is None:
            request = self._decode(block, stream_id)
        if refuse is not None:
            self._rst(stream_id, refuse)
        elif self.closing or len(self.streams) + self.orphans >= self.state.h2_max_streams:
            # After our GOAWAY, or while apps of reset streams still run: not processed, so
            # the client may retry it (RFC 9113 §8.7).
            self._rst(stream_id, ErrorCode.REFUSED_STREAM)
            self._count_reset()
        elif request is None:
            self._rst(stream_id, ErrorCode.PROTOCOL_ERROR)
        else:
            self._serve(stream_id, request, end_stream)

    def _trailers(
        self, stream: H2Stream, block: bytes, end_stream: bool, refuse: ErrorCode | None
    ) -> None:
        """A request's trailer section, which ASGI has no place for: the request is whole.
        It must end the stream and hold no pseudo-header (RFC 9113 §8.1)."""
        fields = self.blocks.fields(block)
        if stream.remote_ended:
            self._stream_error(stream.stream_id, ErrorCode.STREAM_CLOSED, "HEADERS after the end")
        elif refuse is not None or not end_stream or not trailers_valid(fields):
            self._stream_error(stream.stream_id, refuse or ErrorCode.PROTOCOL_ERROR, "trailers")
        else:
            stream.on_end()

    def _decode(self, block: bytes, stream_id: int) -> Request | None:
        """The request of a header block, None if it is malformed (RFC 9113 §8.1.1)."""
        try:
            return self.blocks.request(block)
        except Malformed as exc:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("Malformed HTTP/2 request on stream %d: %s", stream_id, exc)
            return None

    def _serve(self, stream_id: int, request: Request, ended: bool, body: bytes = b"") -> None:
        """Start the app for a request; `body`: all of it, read already (h2c upgrade)."""
        state = self.state
        raw_path, _, query = request.path.partition(b"?")
        extensions = EXTENSIONS.copy()
        if request.te_trailers:  # the client reads trailers (RFC 9110 §10.1.4)
            extensions["http.response.trailers"] = {}
        if self.tls is not None:
            extensions["tls"] = self.tls
        proxy = self.proxy if request.forwarded else None
        scope = http_scope(
            state,
            request.method,
            raw_path,
            query,
            "2",
            list(request.headers),  # the request may be cached: the app may change its copy
            self.endpoints,
            proxy,
            extensions,
        )
        stream = H2Stream(self, stream_id, scope, ended)
        self.streams[stream_id] = stream
        self.last_served = stream_id
        self.deadline = 0.0
        start(
            state, stream, scope, request.protocol, (not ended, request.expect and not ended, body)
        )

    def _upgraded(self, upgrade: Upgrade) -> None:
        """Answer the HTTP/1.1 request that asked for h2c on stream 1, its body already read.
        Its HTTP2-Settings are the client's first SETTINGS (RFC 7540 §3.2.1), not acknowledged."""
        self._apply_settings(upgrade.settings)  # checked by `h2c.upgrade_settings`
        self.highest = 1
        request = from_http1(upgrade.method, upgrade.target, upgrade.headers)
        self._serve(1, request, True, upgrade.body)

    def on_data(self, stream_id: int, data: bytes, length: int, end_stream: bool) -> None:
        if length > self.recv_window:
            raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the window")
        self.recv_window -= length
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_ended:
            self._closed_data(stream_id, stream, length)
            return
        if not length and not end_stream:
            self.empty += 1
            if self.empty > EMPTY_DATA_PER_TICK:
                self._calm("empty DATA frames")
        stream.receive(data, length, end_stream)

    def _closed_data(self, stream_id: int, stream: H2Stream | None, length: int) -> None:
        """DATA on a stream that is closed, or whose request has ended: credit the connection;
        an idle stream's is a connection error, the others' RST_STREAM STREAM_CLOSED, up to a
        bound per tick (beyond it the client is flooding)."""
        if stream is None and stream_id > self.highest:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
        self.give_credit(None, length)
        self.closed_data += 1
        if self.closed_data > CLOSED_DATA_PER_TICK:
            self._calm("DATA frames on closed streams")
        if stream is None and stream_id in self.reset_ids:
            return  # sent before the client saw our reset: ignored (RFC 9113 §5.1)
        self._stream_error(stream_id, ErrorCode.STREAM_CLOSED, "DATA after the end")

    def on_rst_stream(self, stream_id: int, code: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
            return
        self._forget(stream)
        task = stream.cycle.task if stream.cycle is not None else None
        stream.on_reset()
        if task is not None and not task.done():
            self.orphans += 1
            task.add_done_callback(self._orphan_done)
        self._count_reset()

    def _count_reset(self) -> None:
        """A stream reset by the client before its response, or refused: both cost the server
        and serve nothing."""
        self.resets += 1
        if self.resets > RESETS_PER_TICK:
            self._calm("streams reset or refused")

    def _orphan_done(self, task: asyncio.Task[None]) -> None:
        self.orphans -= 1

    def on_priority(self, stream_id: int, depends_on: int) -> None:
        """RFC 9113 §5.3.2: priority signals are accepted and ignored."""

    def on_ping(self, payload: bytes) -> None:
        self._control()
        self.out.append(ping_ack(payload))

    def on_ping_ack(self, payload: bytes) -> None:
        self._control()
        if payload == _SHUTDOWN_PING:
            self._last_goaway()

    def _control(self) -> None:
        self.control += 1
        if self.control > CONTROL_PER_TICK:
            self._calm("PING/SETTINGS frames")

    def on_settings(self, settings: list[tuple[int, int]]) -> None:
        self._control()
        self._apply_settings(settings)
        self.out.append(SETTINGS_ACK)

    def _apply_settings(self, settings: list[tuple[int, int]]) -> None:
        for code, value in settings:
            if code == INITIAL_WINDOW_SIZE:
                delta = value - self.initial_window
                self.initial_window = value
                for stream in self.streams.values():  # RFC 9113 §6.9.2
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
                if delta > 0:
                    self._push_blocked()
            elif code == MAX_FRAME_SIZE:
                self.frame_size = value
            elif code == HEADER_TABLE_SIZE:
                self.encoder.table_size_changed()

    def on_window_update(self, stream_id: int, increment: int) -> None:
        if not stream_id:
            if not increment:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
            self._push_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
            return  # closed: it may still come for a while (RFC 9113 §6.9)
        if not increment:
            self._stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._stream_error(stream_id, ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
        elif stream.pending is not None:
            stream.push()

    def on_goaway(self, last_stream_id: int, code: int) -> None:
        """The client's GOAWAY: it opens no more streams (RFC 9113 §6.8). With NO_ERROR, the
        streams in flight are still answered, then the connection closes; with an error, it
        ends now (the apps see `http.disconnect`)."""
        self.closing = True
        if code != ErrorCode.NO_ERROR:
            self._drop_streams()
        if not self.streams:
            self._close()

    def on_stream_error(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        """A PRIORITY frame breaking its rules: an open stream is reset; for an idle or closed
        one it is dropped (RST_STREAM may not be sent on an idle stream, §6.4, and priority
        signals are only advice, §5.3.2)."""
        if stream_id in self.streams:
            self._stream_error(stream_id, code, reason)

    def _push_blocked(self) -> None:
        for stream in list(self.blocked):
            stream.push()

    # Streams

    def _stream_error(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        """RFC 9113 §5.4.2: RST_STREAM `code`; the stream's app sees `http.disconnect`."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("HTTP/2 stream %d error: %s", stream_id, reason)
        stream = self.streams.get(stream_id)
        if stream is not None:
            self.reset_stream(stream, code)
        else:
            self._rst(stream_id, code)

    def reset_stream(self, stream: H2Stream, code: ErrorCode) -> None:
        """End one stream with RST_STREAM `code`; the others go on."""
        self._forget(stream)
        self._rst(stream.stream_id, code)
        stream.on_reset()
        self._after_stream()

    def stream_done(self, stream: H2Stream) -> None:
        """The response on `stream` is sent whole. A request body still arriving is not
        wanted: RST_STREAM NO_ERROR tells the client to stop (RFC 9113 §8.1)."""
        if not self._forget(stream):
            return
        if not stream.remote_ended:
            self._rst(stream.stream_id, ErrorCode.NO_ERROR)
            stream.on_reset()
        self._after_stream()

    def _forget(self, stream: H2Stream) -> bool:
        """Drop `stream` from the connection's books; whether it was there."""
        if self.streams.pop(stream.stream_id, None) is None:
            return False
        self.blocked.discard(stream)
        return True

    def _rst(self, stream_id: int, code: ErrorCode) -> None:
        self.out.append(rst_stream(stream_id, code))
        resets = self.reset_ids
        resets[stream_id] = None
        if len(resets) > _REMEMBERED_RESETS:
            del resets[next(iter(resets))]
        self.flush()

    def _after_stream(self) -> None:
        if not self.streams:
            if self.closing:
                self._close()
            else:
                self.deadline = self.state.clock + self.state.timeout_keep_alive

    # Errors, timeouts, shutdown

    def _connection_error(self, code: ErrorCode, reason: str) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("HTTP/2 connection error: %s", reason)
        if self.failed:
            return
        self.failed = self.closing = True
        self.out.append(goaway(self.last_served, code))
        self._drop_streams()
        self._close()

    def _calm(self, what: str) -> None:
        """The client asks too much of the server: GOAWAY ENHANCE_YOUR_CALM, then close."""
        logger.warning(
            "HTTP/2 client %s sent too many %s: connection closed",
            client_text(self.endpoints[0]),
            what,
        )
        raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, what)

    def check_timeout(self, now: float) -> None:
        """Server tick: close an idle connection, or one whose preface never came, or whose
        client reads nothing (`--timeout-send`); each stream checks its own timeouts."""
        self.resets = self.control = self.empty = self.closed_data = 0
        size = self.transport.get_write_buffer_size()
        if self.stall.check(now, self.write_paused, size, self.state.timeout_send):
            self.transport.abort()
            return
        tick(self.streams.values(), now)
        if self.deadline and now >= self.deadline and not self.streams:
            self.shutdown()

    def shutdown(self) -> None:
        """Graceful shutdown in two steps (RFC 9113 §6.8), for requests may be on their way:
        GOAWAY naming no stream yet, and a PING. Streams the client opens meanwhile are served.
        Once the PING comes back (every frame sent before it is in), or after `SHUTDOWN_GRACE`,
        the final GOAWAY names the last stream served; the connection closes once those
        streams are done."""
        for session in sessions(self.streams.values()):
            session.shutdown()
        if self.draining or self.closing:
            return
        self.draining = True
        self.out += goaway(_LAST_STREAM, ErrorCode.NO_ERROR), ping(_SHUTDOWN_PING)
        self._write()
        self.state.loop.call_later(SHUTDOWN_GRACE, self._last_goaway)

    def _last_goaway(self) -> None:
        if not self.closing:
            self.closing = True
            self.out.append(goaway(self.last_served, ErrorCode.NO_ERROR))
            if self.streams:
                self._write()
            else:
                self._close()
