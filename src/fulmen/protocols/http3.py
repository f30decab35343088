"""HTTP/3 (RFC 9114) on one QUIC connection: its control and QPACK streams, its request
streams, GOAWAY and timeouts.

QUIC itself is aioquic's (`fulmen.protocols.quicconn.Quic`); the HTTP/3 layer is fulmen's
own, so that each request stream drives the same `RequestCycle` as HTTP/1.1 and HTTP/2, with
direct calls. Errors follow RFC 9114 §8: a malformed request resets its stream alone
(H3_MESSAGE_ERROR); broken framing, a QPACK failure or a misused critical stream closes the
connection. A client that resets too many streams per second, or opens unknown streams,
is closed with H3_EXCESSIVE_LOAD.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from aioquic.quic import events

from fulmen.middleware.proxy_headers import ProxyHeaders
from fulmen.protocols.cycle import RequestCycle, client_text
from fulmen.protocols.h2fields import Malformed, Request, parse_request, trailers_valid
from fulmen.protocols.h3fields import Pairs
from fulmen.protocols.h3frames import (
    DATA,
    GOAWAY,
    HEADERS,
    MAX_STREAM_ID,
    ConnectionFailure,
    ErrorCode,
    FrameReader,
    frame,
    uint_var,
)
from fulmen.protocols.h3peer import PeerStreams, Qpack
from fulmen.protocols.h3stream import LOW_WATER, H3Stream
from fulmen.protocols.linger import SHUTDOWN_GRACE
from fulmen.protocols.quicconn import Quic
from fulmen.protocols.scope import EXTENSIONS, http_scope, socket_address
from fulmen.protocols.streams import sessions, start, tick
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

# Streams a client may reset (or have refused) per second before it is closed with
# H3_EXCESSIVE_LOAD: each costs the server a request start (rapid reset, CVE-2023-44487).
RESETS_PER_TICK = 200
# Requests kept by their header block's octets, for blocks that do not use the QPACK dynamic
# table: a client sends the same few over and over (as `h2fields.HeaderBlocks` for HTTP/2).
KEPT_BLOCKS = 64
KEPT_BLOCK_SIZE = 1024


class Listener(Protocol):
    """What a connection needs of its UDP listener (`fulmen.protocols.quic.QuicListener`)."""

    state: ServerState
    address: tuple[str, int] | None  # the server's, for the scope
    proxy: ProxyHeaders | None
    max_streams: int
    idle_timeout: float
    tls: dict[str, Any]  # the ASGI `tls` extension of its requests

    def sendto(self, data: bytes, addr: Any) -> None: ...

    def route(self, cid: bytes, conn: H3Connection) -> None: ...

    def unroute(self, cid: bytes, conn: H3Connection) -> None: ...

    def forget(self, conn: H3Connection) -> None: ...


class Incoming:
    """A request stream as its bytes arrive: the frames, and the request once decoded."""

    __slots__ = ("blocked", "discard", "ended", "opened", "reader", "stream", "trailers")

    def __init__(self, limit: int, opened: float) -> None:
        self.opened = opened  # (the coarse clock) its HEADERS must be whole in time
        self.reader = FrameReader(limit)
        self.stream: H3Stream | None = None
        # Frames waiting behind a header block QPACK cannot decode yet (RFC 9204 §2.1.2),
        # and whether the stream ended after them; None when not blocked.
        self.blocked: tuple[list[tuple[int, bytes]], bool] | None = None
        self.trailers = False  # the trailer section came: nothing but the end may follow
        self.ended = False  # the client's FIN came
        self.discard = False  # read no further: the stream was answered, reset or refused


class H3Connection:
    """One QUIC connection carrying HTTP/3."""

    def __init__(self, listener: Listener, quic: Quic, addr: Any) -> None:
        self.listener = listener
        self.state = state = listener.state
        self.quic = quic
        self.addr = addr
        self.transport = self  # what the server aborts at the end of a shutdown
        self.cids: set[bytes] = set()  # the connection IDs the listener routes here
        self.streams: dict[int, H3Stream] = {}  # the requests being served
        self.incoming: dict[int, Incoming] = {}  # every open request stream
        self.blocked: set[H3Stream] = set()
        self.highest = -1  # the highest request stream id the client opened
        self.goaway: int | None = None  # the stream id our GOAWAY named: none from there on
        self.closed = False
        self.draining = False  # after GOAWAY: closing once the last responses are delivered
        self.due = False  # a transmit is scheduled for the end of this loop iteration
        self.processing = False  # handling received datagrams: transmit once done
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.deadline = state.clock + state.timeout_request_header
        self.seen = state.clock  # the last tick a datagram came
        self.resets = 0  # streams reset by the client this tick
        self.kept: dict[bytes, Request] = {}
        self.orphans = 0  # apps still running for streams the client reset
        self.endpoints = (socket_address(addr), listener.address, "https")
        self.extensions = {**EXTENSIONS, "tls": listener.tls}
        self.qpack = Qpack(self)
        self.peers = PeerStreams(self)
        self.control = self.qpack.open_streams(state)
        state.connections.add(self)

    # Datagrams, timers, sending

    def datagram_received(self, data: bytes, addr: Any) -> None:
        loop = self.state.loop
        self.quic.receive_datagram(data, addr, loop.time())
        self.seen = self.state.clock
        self._process()

    def _process(self) -> None:
        self.processing = True
        try:
            self._events()
            if self.blocked:
                self._unblock()
            if self.draining and not self.streams:
                self._close_when_delivered()
        except ConnectionFailure as exc:
            self._failure(exc)
        except Exception:  # a bug must cost this connection only, never the server
            logger.exception("HTTP/3 connection failed")
            self.close(ErrorCode.INTERNAL_ERROR, "internal error")
        finally:
            self.processing = False
        # Not at once: the apps of the requests just read run first (their Tasks were
        # scheduled before this), so their responses share packets with the ACKs.
        self.transmit_soon()

    def _events(self) -> None:
        quic = self.quic
        event = quic.next_event()
        while event is not None:
            if isinstance(event, events.StreamDataReceived):
                self._stream_data(event.stream_id, event.data, event.end_stream)
            elif isinstance(event, events.StreamReset):
                self._stream_reset(event.stream_id, True)
            elif isinstance(event, events.StopSendingReceived):
                self._stream_reset(event.stream_id, False)
            elif isinstance(event, events.ConnectionIdIssued):
                self.listener.route(event.connection_id, self)
            elif isinstance(event, events.ConnectionIdRetired):
                self.listener.unroute(event.connection_id, self)
            elif isinstance(event, events.ConnectionTerminated):
                self.terminate()
            event = quic.next_event()

    def _timer_fired(self) -> None:
        self.timer = None
        now = self.state.loop.time()
        when = self.quic.get_timer()
        if when is not None and when > now:  # QUIC's timer moved later meanwhile
            self.timer_at = when
            self.timer = self.state.loop.call_at(when, self._timer_fired)
            return
        self.timer_at = None
        self.quic.handle_timer(now)
        self._process()

    def transmit_soon(self) -> None:
        if not self.due and not self.processing:
            self.due = True
            self.state.loop.call_soon(self.transmit)

    def transmit(self) -> None:
        self.due = False
        loop = self.state.loop
        quic = self.quic
        sendto = self.listener.sendto
        for data, addr in quic.datagrams_to_send(loop.time()):
            sendto(data, addr)
        # One timer handle per connection, moved only when QUIC's timer comes sooner: when it
        # moved later, the handle fires early and is set again (`_timer_fired`).
        when = quic.get_timer()
        if when is None:
            if self.closed:
                self.terminate()
        elif self.timer_at is None or when < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = when
            self.timer = loop.call_at(when, self._timer_fired)

    def _unblock(self) -> None:
        """Acknowledgements came: sends that waited for QUIC to send what it held go on."""
        held_bytes = self.quic.held_bytes
        for stream in list(self.blocked):
            if stream.reset or held_bytes(stream.stream_id) <= LOW_WATER:
                self.blocked.discard(stream)
                stream.wake()

    # Request streams

    def _stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id & 2:
            self.peers.data(stream_id, data, end)
            return
        incoming = self.incoming.get(stream_id) or self._open(stream_id)
        if end:
            incoming.ended = True
        if incoming.discard:
            if end:
                del self.incoming[stream_id]
            return
        if incoming.blocked is not None:
            frames, _ = incoming.blocked
            incoming.blocked = frames + incoming.reader.feed(data), end
            return
        self._frames(stream_id, incoming, incoming.reader.feed(data), end)

    def _open(self, stream_id: int) -> Incoming:
        """A new request stream; refused after our GOAWAY, or while as many requests are
        served (their apps still running) as a connection may have (the client may retry it).
        A refused stream is remembered until its FIN or reset, its late data discarded."""
        if stream_id > self.highest:
            self.highest = stream_id
        state = self.state
        incoming = self.incoming[stream_id] = Incoming(state.limits.head, state.clock)
        limit = self.listener.max_streams
        busy = len(self.streams) + self.orphans >= limit or len(self.incoming) > 2 * limit
        if busy or (self.goaway is not None and stream_id >= self.goaway):
            self._refuse(stream_id, ErrorCode.REQUEST_REJECTED)
            self.count_reset()
        else:
            self.deadline = 0.0
        return incoming

    def _frames(
        self, stream_id: int, incoming: Incoming, frames: list[tuple[int, bytes]], end: bool
    ) -> None:
        for index, (frame_type, payload) in enumerate(frames):
            stream = incoming.stream
            if frame_type == DATA:
                if stream is None or incoming.trailers:
                    raise ConnectionFailure(ErrorCode.FRAME_UNEXPECTED, "DATA out of place")
                stream.on_data(payload)
            elif frame_type == HEADERS:
                if incoming.trailers:
                    raise ConnectionFailure(ErrorCode.FRAME_UNEXPECTED, "HEADERS after trailers")
                last = end and index == len(frames) - 1
                request = self.kept.get(payload) if stream is None else None
                if request is not None:
                    self._serve(stream_id, incoming, request, last, False)
                    continue
                pairs = self.qpack.decode(stream_id, payload)
                if pairs is None:  # blocked: the frames after it wait too
                    incoming.blocked = frames[index + 1 :], end
                    return
                self._headers(stream_id, incoming, pairs, last, payload)
            else:
                self.peers.check_request_frame(frame_type)
            if incoming.discard:  # answered, reset or refused meanwhile
                return
        if end:
            self._ended(stream_id, incoming)

    def resume(self, stream_id: int, pairs: Pairs) -> None:
        """QPACK decoded a header block that was blocked: go on with the stream's frames."""
        incoming = self.incoming.get(stream_id)
        if incoming is None or incoming.blocked is None:
            return
        frames, end = incoming.blocked
        incoming.blocked = None
        self._headers(stream_id, incoming, pairs, end and not frames, b"")
        if not incoming.discard:
            self._frames(stream_id, incoming, frames, end)

    def _ended(self, stream_id: int, incoming: Incoming) -> None:
        """FIN: the request is whole; a stream that ends inside a frame is malformed."""
        if incoming.reader.mid_frame:
            raise ConnectionFailure(ErrorCode.FRAME_ERROR, "stream ended inside a frame")
        self.incoming.pop(stream_id, None)
        stream = incoming.stream
        if stream is None:  # ended before its HEADERS (§4.1.2)
            self._refuse(stream_id, ErrorCode.REQUEST_INCOMPLETE)
            return
        if not stream.remote_ended:
            stream.on_end()

    def _headers(
        self, stream_id: int, incoming: Incoming, pairs: Pairs, end: bool, block: bytes
    ) -> None:
        if incoming.stream is not None:  # the trailer section (§4.1): ASGI has no place for it
            incoming.trailers = True
            if not trailers_valid(pairs) or any(name[:1] == b":" for name, _ in pairs):
                self._stream_error(stream_id, "malformed trailers")
            return
        try:
            request = parse_request(pairs, self.state.ws_factory is not None)
        except Malformed as exc:
            self._stream_error(stream_id, str(exc))
            return
        # Past our SETTINGS_MAX_FIELD_SECTION_SIZE (RFC 9114 §4.2.2): as HTTP/1.1's 431.
        oversize = (
            sum(len(name) + len(value) + 32 for name, value in pairs) > self.state.limits.head
        )
        if block[:1] == b"\x00" and not oversize and len(block) <= KEPT_BLOCK_SIZE:
            # No reference to the dynamic table (Required Insert Count 0, RFC 9204 §4.5.1):
            # these octets always mean this request.
            if len(self.kept) >= KEPT_BLOCKS:
                self.kept.clear()
            self.kept[block] = request
        self._serve(stream_id, incoming, request, end, oversize)

    def _serve(
        self, stream_id: int, incoming: Incoming, request: Request, end: bool, oversize: bool
    ) -> None:
        state = self.state
        raw_path, _, query = request.path.partition(b"?")
        extensions = self.extensions.copy()
        if request.te_trailers:  # the client reads trailers (RFC 9110 §10.1.4)
            extensions["http.response.trailers"] = {}
        proxy = self.listener.proxy if request.forwarded else None
        headers = list(request.headers)  # the request may be kept: the app may change its copy
        scope = http_scope(
            state, request.method, raw_path, query, "3", headers, self.endpoints, proxy, extensions
        )
        stream = incoming.stream = H3Stream(self, stream_id, scope, end)
        self.streams[stream_id] = stream
        if end:
            del self.incoming[stream_id]
        if oversize:
            stream.cycle = RequestCycle(state, stream, scope)
            stream.cycle.reject(431, b"Request Header Fields Too Large")
            return
        body = (not end, request.expect and not end, b"")
        start(state, stream, scope, request.protocol, body)

    def _drop(self, stream_id: int) -> None:
        """Read no more of a request stream; it is forgotten once the client's FIN or reset
        comes (until then, what arrives is discarded)."""
        incoming = self.incoming.get(stream_id)
        if incoming is not None:
            if incoming.ended:
                del self.incoming[stream_id]
            else:
                incoming.discard = True

    def _refuse(self, stream_id: int, code: ErrorCode) -> None:
        """End a request stream both ways, unserved."""
        self._drop(stream_id)
        self.qpack.cancel(stream_id)
        quic = self.quic
        quic.reset_stream(stream_id, code)
        quic.stop_stream(stream_id, code)

    def _stream_error(self, stream_id: int, reason: str) -> None:
        """A malformed request (RFC 9114 §4.1.2): H3_MESSAGE_ERROR ends its stream alone."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Malformed HTTP/3 request on stream %d: %s", stream_id, reason)
        stream = self.streams.get(stream_id)
        if stream is not None:
            self.reset_stream(stream, ErrorCode.MESSAGE_ERROR)
        else:
            self._refuse(stream_id, ErrorCode.MESSAGE_ERROR)

    def _stream_reset(self, stream_id: int, received: bool) -> None:
        """RESET_STREAM (`received`: the client sends no more) or STOP_SENDING from the
        client: the request is abandoned, and so is its response (a reset of a control or
        QPACK stream closes the connection)."""
        if stream_id & 2:
            self.peers.reset(stream_id)
            return
        incoming = self.incoming.get(stream_id)
        if received and incoming is not None:
            incoming.ended = True
        stream = self.streams.get(stream_id)
        if stream is None:
            if incoming is None:
                return
            if incoming.discard:  # answered or refused already: its end, nothing to send
                if incoming.ended:
                    del self.incoming[stream_id]
                return
            self.count_reset()
            self._refuse(stream_id, ErrorCode.REQUEST_CANCELLED)
            return
        if not stream.done:
            self.count_reset()
        task = stream.cycle.task if stream.cycle is not None else None
        self.reset_stream(stream, ErrorCode.REQUEST_CANCELLED)
        if task is not None and not task.done():
            # Its app still runs: it counts against the stream limit until it returns.
            self.orphans += 1
            task.add_done_callback(self._orphan_done)

    def _orphan_done(self, task: asyncio.Task[None]) -> None:
        self.orphans -= 1

    def count_reset(self) -> None:
        self.resets += 1
        if self.resets > RESETS_PER_TICK:
            logger.warning(
                "HTTP/3 client %s reset or opened too many streams: connection closed",
                client_text(self.endpoints[0]),
            )
            raise ConnectionFailure(ErrorCode.EXCESSIVE_LOAD, "too many streams reset")

    # From the streams (`fulmen.protocols.h3stream.Connection`)

    def send_fields(self, stream_id: int, pairs: Pairs, tail: bytes, end: bool) -> None:
        block = self.qpack.encode(stream_id, pairs)
        self.quic.send_stream_data(stream_id, frame(HEADERS, block) + tail, end)

    def reset_stream(self, stream: H3Stream, code: ErrorCode) -> None:
        """End one stream both ways with `code`; the others go on."""
        stream_id = stream.stream_id
        self._forget(stream)
        if not self.closed:
            self._refuse(stream_id, code)
            self.transmit_soon()
        stream.on_reset()

    def stream_done(self, stream: H3Stream) -> None:
        """The response on `stream` is written whole. A request body still arriving is not
        wanted: STOP_SENDING H3_NO_ERROR tells the client to stop (RFC 9114 §4.1)."""
        if not self._forget(stream):
            return
        if not stream.remote_ended and not self.closed:
            self._drop(stream.stream_id)
            self.quic.stop_stream(stream.stream_id, ErrorCode.NO_ERROR)
            stream.on_reset()
        if not self.streams:
            self._idle()

    def _forget(self, stream: H3Stream) -> bool:
        if self.streams.pop(stream.stream_id, None) is None:
            return False
        self.blocked.discard(stream)
        return True

    def _idle(self) -> None:
        if self.goaway is not None:
            self._close_when_delivered()
        else:
            self.deadline = self.state.clock + self.state.timeout_keep_alive

    def _close_when_delivered(self) -> None:
        """After GOAWAY, with no request left: close once the client has every response
        (CONNECTION_CLOSE would drop what it has not acknowledged yet), or after
        `SHUTDOWN_GRACE`."""
        if self.quic.delivered():
            self.close(ErrorCode.NO_ERROR, "shutdown")
        elif not self.draining:  # checked again as acknowledgements come, for a while
            self.draining = True
            self.state.loop.call_later(SHUTDOWN_GRACE, self._drained)

    def _drained(self) -> None:
        """A client that acknowledges nothing more (it is gone) does not hold the shutdown."""
        if not self.streams:
            self.close(ErrorCode.NO_ERROR, "shutdown")

    # Errors, timeouts, shutdown

    def _failure(self, exc: ConnectionFailure) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("HTTP/3 connection error: %s", exc)
        self.close(exc.code, str(exc))

    def abort(self) -> None:
        """The end of a shutdown: the connection closes at once."""
        self.close(ErrorCode.NO_ERROR, "server stopped")

    def close(self, code: ErrorCode, reason: str) -> None:
        """Close the QUIC connection (CONNECTION_CLOSE); its streams are gone."""
        if self.closed:
            return
        self.closed = True
        self.quic.close(error_code=code, reason_phrase=reason)
        self._drop_streams()
        self.transmit_soon()

    def _drop_streams(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self.incoming.clear()
        self.blocked.clear()
        for stream in streams:
            stream.on_reset()

    def terminate(self) -> None:
        """QUIC is done with the connection (closed by either side, or idle)."""
        self.closed = True
        self._drop_streams()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state.connections.discard(self)
        self.listener.forget(self)

    def check_timeout(self, now: float) -> None:
        """Server tick: close an idle connection; each stream checks its own timeouts; a PING
        keeps QUIC's idle timeout from closing a connection whose app is still busy."""
        self.resets = 0
        if self.closed:
            return
        tick(self.streams.values(), now)
        self._slow_heads(now)
        if self.deadline and now >= self.deadline and not self.streams and not self.incoming:
            self.close(ErrorCode.NO_ERROR, "idle")
        elif self.streams and self.state.clock - self.seen >= self.listener.idle_timeout / 2:
            self.quic.send_ping(0)
            self.transmit_soon()

    def _slow_heads(self, now: float) -> None:
        """Request streams whose HEADERS are not whole after --timeout-request-header are
        reset (H3_REQUEST_INCOMPLETE): a slow head holds no stream for long (slowloris)."""
        limit = now - self.state.timeout_request_header
        slow = [
            stream_id
            for stream_id, incoming in self.incoming.items()
            if incoming.stream is None and not incoming.discard and incoming.opened < limit
        ]
        for stream_id in slow:
            self._refuse(stream_id, ErrorCode.REQUEST_INCOMPLETE)
        if slow:
            self.transmit_soon()

    def shutdown(self) -> None:
        """Graceful shutdown (RFC 9114 §5.2): GOAWAY naming the first request stream not
        opened yet; the requests already open are served, later ones refused; the connection
        closes once they are done and their responses delivered."""
        for session in sessions(self.streams.values()):
            session.shutdown()
        if self.goaway is not None or self.closed:
            return
        self.goaway = min(self.highest + 4, MAX_STREAM_ID)
        goaway = frame(GOAWAY, uint_var(self.goaway))
        self.quic.send_stream_data(self.control, goaway, False)
        self.transmit_soon()
        if not self.streams:
            self._close_when_delivered()
