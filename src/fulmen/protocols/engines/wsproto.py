"""wsproto's frame layer (`wsproto.connection.Connection`) as a fulmen engine.

The opening handshake is fulmen's, so wsproto's own (which would parse the request again) is
not used. wsproto bounds neither messages nor inflated data: the message size is counted by
fulmen for every engine, and inflating is bounded here, so that a small compressed frame cannot
expand past `--ws-max-size` in memory (a "compression bomb" is refused with 1009).
"""

from __future__ import annotations

import zlib

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol

from fulmen.protocols.engines.base import CLOSE, DATA, NO_STATUS, PONG, Event, plain_frame


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate that inflates at most `max_size` bytes per message."""

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self._max_size = max_size
        self._inflated = 0  # bytes inflated so far in the current message

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        decompressor = self._decompressor
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert decompressor is not None
        room = self._max_size - self._inflated
        try:
            inflated = decompressor.decompress(data, room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(inflated)
        if self._inflated > self._max_size or decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return inflated

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        result = super().frame_inbound_complete(proto, fin)
        if isinstance(result, bytes) and self._inflated + len(result) > self._max_size:
            return CloseReason.MESSAGE_TOO_BIG
        if fin:
            self._inflated = 0
        return result


class WsprotoEngine:
    __slots__ = ("_conn", "_in_message", "_output", "_plain")

    def __init__(self, conn: Connection, plain: bool) -> None:
        self._conn = conn
        self._plain = plain  # no extension agreed: messages are written as plain frames
        self._in_message = False
        self._output: list[bytes] = []

    def receive(self, data: bytes) -> list[Event]:
        conn = self._conn
        if conn.state is ConnectionState.CLOSED:
            return []  # after the close handshake, nothing more is read (RFC 6455 §1.4)
        conn.receive_data(data)
        events: list[Event] = []
        for event in conn.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                first = None if self._in_message else isinstance(event, TextMessage)
                self._in_message = not event.message_finished
                payload = event.data if isinstance(event.data, str) else bytes(event.data)
                events.append((DATA, payload, first, event.message_finished))
            elif isinstance(event, Ping):
                self._output.append(conn.send(event.response()))
            elif isinstance(event, Pong):
                events.append((PONG, bytes(event.payload)))
            elif isinstance(event, CloseConnection):
                events.append(self._closed(event))
                break
        return events

    def _closed(self, event: CloseConnection) -> Event:
        conn = self._conn
        code = int(event.code) if event.code is not None else NO_STATUS
        reason = event.reason or ""
        if conn.state is ConnectionState.REMOTE_CLOSING:  # the peer closed first: echo it
            self._output.append(conn.send(event.response()))
        elif conn.state is ConnectionState.OPEN:  # wsproto failed the connection (bad frame)
            self._output.append(conn.send(CloseConnection(code, reason)))
            conn.receive_data(None)  # and reads no more
        return (CLOSE, code, reason)

    def output(self) -> bytes:
        data = b"".join(self._output)
        self._output.clear()
        return data

    def message(self, data: bytes | str) -> bytes:
        if self._plain:
            return plain_frame(data)
        if isinstance(data, str):
            return self._conn.send(TextMessage(data))
        return self._conn.send(BytesMessage(data))

    def close(self, code: int, reason: str) -> bytes:
        return self._conn.send(CloseConnection(code, reason))

    def ping(self, payload: bytes) -> bytes:
        return self._conn.send(Ping(payload))


class WsprotoFactory:
    __slots__ = ("_deflate", "_max_size")

    def __init__(self, max_size: int, deflate: bool) -> None:
        self._max_size = max_size
        self._deflate = deflate

    def __call__(self, offer: bytes | None) -> tuple[WsprotoEngine, bytes | None]:
        extension = answer = None
        if offer and self._deflate:
            extension, answer = self._negotiate(offer.decode("latin-1"))
        conn = Connection(ConnectionType.SERVER, [extension] if extension else None)
        return WsprotoEngine(conn, extension is None), answer

    def _negotiate(self, offer: str) -> tuple[BoundedDeflate | None, bytes | None]:
        """RFC 7692 §5: accept the first permessage-deflate offer we can."""
        for item in offer.split(","):
            if item.split(";", 1)[0].strip() != PerMessageDeflate.name:
                continue
            extension = BoundedDeflate(self._max_size)
            params = extension.accept(item)
            if params is None or params is False:
                continue
            answer = extension.name + ("; " + params if isinstance(params, str) and params else "")
            return extension, answer.encode("latin-1")
        return None, None
