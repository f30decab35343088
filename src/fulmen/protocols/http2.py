"""The HTTP/2 connection (RFC 9113) over h2's state machine: frames in, one request cycle per
stream out, each stream its own `Framer` (`fulmen.protocols.h2stream`).

`data_received -> h2.receive_data -> events -> streams -> RequestCycle.run (app) -> frames`.
Frames written while events are being handled go out in one `transport.write`.

What is decided here, once per connection: the SETTINGS we offer, which streams are served,
connection errors (GOAWAY, then close), the connection's receive window, graceful shutdown
(GOAWAY with the last stream id, in-flight streams finish), the keep-alive and preface
timeouts, and the bounds that keep a hostile client's cost bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import ConnectionState
from h2.connection import H2Connection as H2State
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from fulmen.protocols.cycle import START, RequestCycle, client_text
from fulmen.protocols.h2c import Upgrade
from fulmen.protocols.h2fields import Malformed, Request, from_http1, parse_request
from fulmen.protocols.h2stream import H2Stream
from fulmen.protocols.scope import endpoints, http_scope
from fulmen.protocols.tasks import start_task
from fulmen.protocols.websocket import WebSocketRequest, WebSocketSession
from fulmen.protocols.websocket_h2 import H2WebSocket
from fulmen.state import ServerState

logger = logging.getLogger("fulmen.error")

_CONFIG = H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_inbound_headers=False,  # `h2fields` does it, as stream errors
    validate_outbound_headers=False,  # `h2fields` checks and lower-cases what the app sends
    normalize_outbound_headers=False,
)
STREAM_WINDOW = 65535  # the initial receive window of each stream (SETTINGS_INITIAL_WINDOW_SIZE)
# Each stream's window fits in the connection's, so a stream whose app reads slowly holds back
# only its own body.
_EARLY_HINT: dict[str, object] = {}
_NO_ERROR = ErrorCodes.NO_ERROR
_CALM = ErrorCodes.ENHANCE_YOUR_CALM
# Bounds on what a client may make the server do per second (per server tick), beyond which the
# connection ends with GOAWAY ENHANCE_YOUR_CALM: streams it resets before their response is
# complete (rapid reset, CVE-2023-44487), PING and SETTINGS frames (each needs an answer:
# CVE-2019-9512, -9515), and empty DATA frames that end nothing (CVE-2019-9518).
RESETS_PER_TICK = 200
CONTROL_PER_TICK = 1000
EMPTY_DATA_PER_TICK = 1000
# DATA on closed streams, which h2 answers with RST_STREAM each: checked inside h2's reading, so
# that one large read cannot queue an answer per frame.
CLOSED_DATA_PER_TICK = 100


class _State(H2State):
    """h2's connection, counting DATA frames on closed streams (h2 reports no event for them)."""

    closed_data = 0

    def _handle_data_on_closed_stream(self, *args: Any) -> Any:
        self.closed_data += 1
        if self.closed_data > CLOSED_DATA_PER_TICK:
            raise DenialOfServiceError("too many DATA frames on closed streams")
        return super()._handle_data_on_closed_stream(*args)


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection: its streams, its SETTINGS, GOAWAY and timeouts."""

    def __init__(self, state: ServerState, upgrade: Upgrade | None = None) -> None:
        self.state = state
        self.upgrade = upgrade
        self.streams: dict[int, H2Stream] = {}
        self.blocked: set[H2Stream] = set()  # streams with body bytes waiting for window
        self.write_paused = False
        self.batching = False  # handling received frames: write once, at the end
        self.closing = False  # GOAWAY sent: no new streams
        self.failed = False  # a connection error: nothing more is read or sent
        self.deadline = 0.0
        self.h2 = _State(_CONFIG)
        # Apps still running for streams the client reset: they count against the stream limit.
        self.orphans = 0
        self.resets = self.control = self.empty = 0  # per tick, see the bounds above

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.state
        self.transport = transport = cast(asyncio.Transport, transport)
        self.endpoints = client, _, _ = endpoints(transport)
        proxy = state.proxy_headers
        self.proxy = proxy if proxy is not None and proxy.trusts(client) else None
        h2 = self.h2
        # Set before the preface (h2 sends these in its SETTINGS, and enforces them).
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: state.h2_max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: state.limits.head,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                SettingCodes.ENABLE_PUSH: 0,
                # RFC 8441: extended CONNECT, for WebSockets over HTTP/2.
                SettingCodes.ENABLE_CONNECT_PROTOCOL: int(state.ws_factory is not None),
            },
        )
        upgrade = self.upgrade
        if upgrade is None:
            h2.initiate_connection()
        else:
            try:  # `h2c.upgrade_settings` has checked them: this is a safety net
                h2.initiate_upgrade_connection(upgrade.settings)
            except ProtocolError as exc:  # pragma: no cover
                self._connection_error(exc)
                return
        extra = state.h2_max_streams * STREAM_WINDOW - 65535
        if extra > 0:
            h2.increment_flow_control_window(extra)
        # The preface (or the request on stream 1) must come within the header timeout.
        self.deadline = state.clock + state.timeout_request_header
        state.connections.add(self)
        self.flush()
        if upgrade is not None:
            self.upgrade = None
            self._upgraded(upgrade)
        if state.shutting_down:
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        self.batching = True
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:  # h2 has queued GOAWAY with the error code
            self._connection_error(exc)
            return
        try:
            for event in events:
                handler = _HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
                    if self.failed:
                        break
        except ProtocolError as exc:  # h2 refused what a handler sent: end the connection
            self._connection_error(exc)
        finally:
            self.batching = False
            self._write()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
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

    def flush(self, now: bool = False) -> None:
        """Write the frames h2 has queued: `now`, or once per loop iteration, so that the
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

    def _close(self) -> None:
        """Close the connection after the frames queued so far."""
        self._write()
        self.transport.close()

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    # Frames

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.closing or len(self.streams) + self.orphans >= self.state.h2_max_streams:
            # After our GOAWAY, or while apps of reset streams still run: not processed, so
            # the client may retry it (RFC 9113 §8.7).
            self._rst(stream_id, ErrorCodes.REFUSED_STREAM)
            self._count_reset()
            return
        try:
            request = parse_request(event.headers or (), self.state.ws_factory is not None)
        except Malformed as exc:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("Malformed HTTP/2 request on stream %d: %s", stream_id, exc)
            self._rst(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        self._serve(stream_id, request, event.stream_ended is not None)

    def _serve(self, stream_id: int, request: Request, ended: bool, body: bytes = b"") -> H2Stream:
        """Start the app for a request; `body`: all of it, read already (h2c upgrade)."""
        state = self.state
        raw_path, _, query = request.path.partition(b"?")
        extensions: dict[str, Any] = {"http.response.early_hint": _EARLY_HINT}
        if request.te_trailers:  # the client reads trailers (RFC 9110 §10.1.4)
            extensions["http.response.trailers"] = {}
        proxy = self.proxy if request.forwarded else None
        scope = http_scope(
            state,
            request.method,
            raw_path,
            query,
            "2",
            request.headers,
            self.endpoints,
            proxy,
            extensions,
        )
        stream = H2Stream(self, stream_id, scope, ended)
        self.streams[stream_id] = stream
        self.deadline = 0.0
        if request.protocol:
            cycle: RequestCycle = WebSocketRequest(state, stream, scope)
            stream.cycle = cycle
            if request.protocol != b"websocket":  # RFC 8441 §4: a protocol we do not speak
                cycle.reject(501, b"Unsupported :protocol")
                return stream
            driver = stream.tunnel = H2WebSocket(stream)
            driver.session = session = WebSocketSession(cast(WebSocketRequest, cycle), driver)
            coro = session.run(state.app)
        else:
            cycle = RequestCycle(state, stream, scope, not ended, request.expect and not ended)
            stream.cycle = cycle
            if body:  # before the app's first step, which may run at once (eager tasks)
                cycle.on_body(body)
            coro = cycle.run(state.app)
        limit = state.limit_concurrency
        if limit and len(state.tasks) >= limit:
            coro.close()
            cycle.reject(503, b"Service Unavailable")
            return stream
        task = start_task(state.loop, coro, state.context, True)
        if not task.done():
            cycle.task = task
            state.tasks.add(task)
        return stream

    def _upgraded(self, upgrade: Upgrade) -> None:
        """Answer the HTTP/1.1 request that asked for h2c on stream 1, its body already read."""
        request = from_http1(upgrade.method, upgrade.target, upgrade.headers)
        self._serve(1, request, True, upgrade.body)
        self.flush()

    def _data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        data = event.data or b""
        length = event.flow_controlled_length or 0
        if stream is None:  # a stream we reset, or answered already: credit the connection
            if length:
                self.h2.acknowledge_received_data(length, event.stream_id)
            return
        if not length and not event.stream_ended:
            self.empty += 1
            if self.empty > EMPTY_DATA_PER_TICK:
                self._calm("empty DATA frames")
                return
        limit = self.state.limit_request_body
        cycle = stream.cycle
        if (
            limit is not None
            and stream.tunnel is None  # a WebSocket's frames are no request body
            and cycle is not None
            and cycle.body_received + len(data) > limit
        ):
            self._too_large(stream, cycle, length)
            return
        stream.on_data(data, length)

    def _too_large(self, stream: H2Stream, cycle: RequestCycle, length: int) -> None:
        """A body over --limit-request-body: 413 if the app has not answered yet (the stream is
        then done: RST_STREAM NO_ERROR stops the client), else RST_STREAM CANCEL. The app
        sees `http.disconnect` either way."""
        self.h2.acknowledge_received_data(length, stream.stream_id)
        if cycle.phase is START:
            cycle.reject(413, b"Request Entity Too Large")
        cycle.on_disconnect()
        if stream.stream_id in self.streams:
            self.reset_stream(stream, ErrorCodes.CANCEL)

    def _ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_end()

    def _reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or not self._forget(stream):
            return
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
        if self.resets > RESETS_PER_TICK and not self.failed:
            self._calm("streams reset or refused")

    def _orphan_done(self, task: asyncio.Task[None]) -> None:
        self.orphans -= 1

    def _control(self, event: object) -> None:
        """PING or SETTINGS (h2 has answered it)."""
        self.control += 1
        if self.control > CONTROL_PER_TICK:
            self._calm("PING/SETTINGS frames")

    def _window(self, event: WindowUpdated) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.pending is not None:
                stream.push()
        else:
            self._push_blocked()

    def _settings(self, event: RemoteSettingsChanged) -> None:
        self._control(event)
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._push_blocked()

    def _terminated(self, event: ConnectionTerminated) -> None:
        """The client's GOAWAY: it is leaving. h2 sends nothing more after it, so the streams in
        flight end here too (their apps see `http.disconnect`)."""
        self.closing = True
        self._drop_streams()
        self._close()

    def _push_blocked(self) -> None:
        for stream in list(self.blocked):
            stream.push()

    # Streams

    def reset_stream(self, stream: H2Stream, code: ErrorCodes) -> None:
        """End one stream with RST_STREAM `code`; the others go on."""
        self._forget(stream)
        self._rst(stream.stream_id, code)
        stream.on_reset()
        self.flush()
        self._after_stream()

    def stream_done(self, stream: H2Stream) -> None:
        """The response on `stream` is sent whole. A request body still arriving is not
        wanted: RST_STREAM NO_ERROR tells the client to stop (RFC 9113 §8.1)."""
        if not self._forget(stream):
            return
        if not stream.remote_ended:
            self._rst(stream.stream_id, _NO_ERROR)
            stream.on_reset()
            self.flush()
        self._after_stream()

    def _forget(self, stream: H2Stream) -> bool:
        """Drop `stream` from the connection's books; whether it was there."""
        if self.streams.pop(stream.stream_id, None) is None:
            return False
        self.blocked.discard(stream)
        return True

    def _rst(self, stream_id: int, code: ErrorCodes) -> None:
        with contextlib.suppress(StreamClosedError):  # closed by the client meanwhile
            self.h2.reset_stream(stream_id, code)

    def _after_stream(self) -> None:
        if not self.streams:
            if self.closing:
                self._close()
            else:
                self.deadline = self.state.clock + self.state.timeout_keep_alive

    # Errors, timeouts, shutdown

    def _connection_error(self, exc: ProtocolError, code: ErrorCodes | None = None) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("HTTP/2 connection error: %s", exc)
        if self.failed:
            return
        self.failed = self.closing = True
        if self.h2.state_machine.state is not ConnectionState.CLOSED:
            # h2 checks the preface before its state machine, and queues no GOAWAY for it.
            self.h2.close_connection(exc.error_code if code is None else code)
        self.flush(True)
        self._drop_streams()
        self._close()

    def _calm(self, what: str) -> None:
        """The client asks too much of the server: GOAWAY ENHANCE_YOUR_CALM, then close."""
        logger.warning(
            "HTTP/2 client %s sent too many %s: connection closed",
            client_text(self.endpoints[0]),
            what,
        )
        self._connection_error(ProtocolError(what), _CALM)

    def check_timeout(self, now: float) -> None:
        """Server tick: close an idle connection, or one whose preface never came."""
        self.resets = self.control = self.empty = self.h2.closed_data = 0
        for session in self._sessions():
            session.check_timeout(now)
        if self.deadline and now >= self.deadline and not self.streams:
            self.shutdown()

    def _sessions(self) -> list[WebSocketSession]:
        """The WebSockets open on this connection."""
        return [
            stream.tunnel.session
            for stream in self.streams.values()
            if isinstance(stream.tunnel, H2WebSocket) and stream.tunnel.session is not None
        ]

    def shutdown(self) -> None:
        """GOAWAY with the last stream we will serve; close once those streams are done.

        The GOAWAY frame is written here rather than by h2, whose state machine would refuse
        to send anything after it: the streams in flight must still finish (RFC 9113 §6.8)."""
        if not self.closing:
            self.closing = True
            goaway = GoAwayFrame(0)
            goaway.last_stream_id = self.h2.highest_inbound_stream_id
            goaway.error_code = _NO_ERROR
            self.flush(True)
            self.transport.write(goaway.serialize())
        for session in self._sessions():
            session.shutdown()
        if not self.streams:
            self._close()


_HANDLERS: dict[type, Any] = {
    RequestReceived: H2Connection._request,
    DataReceived: H2Connection._data,
    StreamEnded: H2Connection._ended,
    StreamReset: H2Connection._reset,
    WindowUpdated: H2Connection._window,
    RemoteSettingsChanged: H2Connection._settings,
    PingReceived: H2Connection._control,
    ConnectionTerminated: H2Connection._terminated,
}


def take_over(
    state: ServerState, transport: asyncio.Transport, data: bytes, upgrade: Upgrade | None = None
) -> None:
    """Serve HTTP/2 on a cleartext connection that began as HTTP/1.1: `data` are the bytes
    received and not handled yet (the connection preface, or what followed `upgrade`)."""
    protocol = H2Connection(state, upgrade)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if data and not transport.is_closing():
        protocol.data_received(data)
