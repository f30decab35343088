"""aioquic's QUIC connection, with the two things HTTP/3 serving needs that it does not offer.

- `held`: streams whose receive window must not grow. aioquic doubles a stream's window as
  data arrives, whether or not the application takes it; a request body the app does not read
  would then be buffered without bound. A held stream keeps the window it has: the client
  stops at its edge (RFC 9000 §4.1) until the app catches up.
- `max_streams`: the request streams a client may have open at once.
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

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        if stream.stream_id not in self.held:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
