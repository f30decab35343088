"""aioquic's QUIC connection, with the two things HTTP/3 serving needs that it does not offer.

- `held`: streams whose receive window must not grow. aioquic doubles a stream's window as
  data arrives, whether or not the application takes it; a request body the app does not read
  would then be buffered without bound. A held stream keeps the window it has: the client
  stops at its edge (RFC 9000 §4.1) until the app catches up.
- `max_streams`: the request streams a client may have open at once (also with aioquic 1.3,
  the last release for Python 3.10, which would double the limit as streams are used).
- `held_bytes`: how much a stream's sender holds (written, not yet acknowledged), so that a
  response waits for the client instead of filling memory; `delivered`: whether any does, so
  that a graceful close waits for the last responses to arrive.

Both reach into aioquic's stream objects (`QuicStream.sender`, `_write_stream_limits`), the
same in every aioquic release fulmen supports (1.2 and later); the tests exercise both.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.connection import QuicConnection


class Quic(QuicConnection):
    def __init__(self, max_streams: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.held: set[int] = set()
        self.max_streams = max_streams
        # The request streams a client may open at once (aioquic's default is 128, and it
        # has no setting for it): --h2-max-concurrent-streams, as for HTTP/2.
        limit = self._local_max_streams_bidi
        limit.value = limit.sent = max_streams  # announced as such in the handshake

    def held_bytes(self, stream_id: int) -> int:
        """Bytes written to the stream that the client has not acknowledged yet."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return len(stream.sender._buffer)

    def delivered(self) -> bool:
        """Whether the client has acknowledged everything written to every stream."""
        return not any(stream.sender._buffer for stream in self._streams.values())

    def hold(self, stream_id: int) -> None:
        """Keep the stream's receive window where it is."""
        self.held.add(stream_id)
        # aioquic asks `_write_stream_limits` of every stream in every packet it builds: only
        # while a stream is held does that call go through `_held_limits` (an instance
        # attribute over the method), so a connection holding none pays nothing.
        vars(self)["_write_stream_limits"] = self._held_limits

    def release(self, stream_id: int) -> None:
        """Let the stream's receive window grow again."""
        held = self.held
        held.discard(stream_id)
        if not held:
            vars(self).pop("_write_stream_limits", None)

    def _held_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if stream.stream_id not in self.held:
            QuicConnection._write_stream_limits(self, builder=builder, space=space, stream=stream)

    if not hasattr(QuicConnection, "_stream_limit"):  # pragma: no cover - aioquic < 1.4

        def _write_connection_limits(self, builder: Any, space: Any) -> None:
            """aioquic before 1.4 doubles MAX_STREAMS once half the streams ever opened are
            used, which makes it no bound on streams open at once: here, as later releases
            do, the client may open one new request stream for each that closed."""
            limit = self._local_max_streams_bidi
            open_now = sum(1 for stream_id in self._streams if not stream_id & 3)
            limit.value = max(limit.value, limit.used - open_now + self.max_streams)
            used, limit.used = limit.used, 0
            try:
                super()._write_connection_limits(builder=builder, space=space)
            finally:
                limit.used = used
