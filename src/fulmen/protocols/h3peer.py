"""What an HTTP/3 connection carries besides requests: QPACK (RFC 9204) and the client's
unidirectional streams (RFC 9114 §6.2).

`Qpack` holds the connection's decoder (request header blocks) and encoder (responses), and
the two streams that carry their instructions. The decoder's dynamic table is bounded by
`TABLE_CAPACITY` and its blocked streams by `BLOCKED_STREAMS`, both announced in SETTINGS,
so what one header block can expand to is bounded too (a HEADERS frame is at most 16 KiB, each
of its bytes naming at most one table entry), and a decoded section over 16 KiB (HTTP/1.1's
head limit, announced as SETTINGS_MAX_FIELD_SECTION_SIZE) is answered 431.

`PeerStreams` reads the client's control stream (SETTINGS first, then nothing but the frames
a control stream may carry), feeds its QPACK streams to `Qpack`, and stops the streams of
types it does not know. Closing or resetting a critical stream closes the connection.
"""

from __future__ import annotations

from typing import Protocol

from pylsqpack import (
    Decoder,
    DecoderStreamError,
    DecompressionFailed,
    Encoder,
    EncoderStreamError,
    StreamBlocked,
)

from fulmen.protocols.h3fields import Pairs
from fulmen.protocols.h3frames import (
    CANCEL_PUSH,
    CONTROL_STREAM,
    DATA,
    DECODER_STREAM,
    ENABLE_CONNECT_PROTOCOL,
    ENCODER_STREAM,
    GOAWAY,
    HEADERS,
    MAX_FIELD_SECTION_SIZE,
    MAX_PUSH_ID,
    PUSH_PROMISE,
    PUSH_STREAM,
    QPACK_BLOCKED_STREAMS,
    QPACK_MAX_TABLE_CAPACITY,
    RESERVED_H2_FRAMES,
    SETTINGS,
    ConnectionFailure,
    ErrorCode,
    FrameReader,
    encode_settings,
    parse_settings,
    uint_var,
    varint,
)
from fulmen.protocols.quicconn import Quic
from fulmen.state import ServerState

TABLE_CAPACITY = 4096  # the QPACK dynamic table we let the client's encoder use
BLOCKED_STREAMS = 16  # request streams that may wait for the encoder stream at once
CONTROL_FRAME_LIMIT = 16384  # the largest frame on the client's control stream
# Frames that belong on the control stream only, or nowhere from a client (§7.2).
_CONTROL_ONLY = frozenset((SETTINGS, GOAWAY, MAX_PUSH_ID, CANCEL_PUSH))
_NOT_FROM_CLIENTS = frozenset((PUSH_PROMISE,)) | RESERVED_H2_FRAMES
_CRITICAL = frozenset((CONTROL_STREAM, ENCODER_STREAM, DECODER_STREAM))


class Connection(Protocol):
    """What QPACK and the client's streams need of their connection (`H3Connection`)."""

    quic: Quic
    qpack: Qpack

    def resume(self, stream_id: int, pairs: Pairs) -> None:
        """A header block that waited for the encoder stream is decoded."""

    def count_reset(self) -> None:
        """One more stream the client made the server refuse (bounded per second)."""


class Qpack:
    """The connection's QPACK encoder and decoder, and our encoder and decoder streams."""

    __slots__ = ("conn", "decoder", "decoder_stream", "encoder", "encoder_stream")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decoder = Decoder(TABLE_CAPACITY, BLOCKED_STREAMS)
        self.encoder = Encoder()
        self.encoder_stream = self.decoder_stream = -1

    def open_streams(self, state: ServerState) -> int:
        """Open our control stream (with SETTINGS) and QPACK streams; the control stream's id."""
        quic = self.conn.quic
        settings = [
            (QPACK_MAX_TABLE_CAPACITY, TABLE_CAPACITY),
            (QPACK_BLOCKED_STREAMS, BLOCKED_STREAMS),
            (MAX_FIELD_SECTION_SIZE, state.limits.head),
        ]
        if state.ws_factory is not None:  # WebSockets over HTTP/3 (RFC 9220 §3)
            settings.append((ENABLE_CONNECT_PROTOCOL, 1))
        opened = []
        for kind, first in (
            (CONTROL_STREAM, encode_settings(settings)),
            (ENCODER_STREAM, b""),
            (DECODER_STREAM, b""),
        ):
            stream_id = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(stream_id, uint_var(kind) + first)
            opened.append(stream_id)
        control, self.encoder_stream, self.decoder_stream = opened
        return control

    def decode(self, stream_id: int, block: bytes) -> Pairs | None:
        """A request's header block; None while it waits for the encoder stream."""
        try:
            control, pairs = self.decoder.feed_header(stream_id, block)
        except StreamBlocked:
            return None
        except DecompressionFailed as exc:
            raise ConnectionFailure(ErrorCode.QPACK_DECOMPRESSION_FAILED, str(exc)) from None
        self._instruct(control)
        return pairs

    def encode(self, stream_id: int, pairs: Pairs) -> bytes:
        data, block = self.encoder.encode(stream_id, pairs)
        if data:
            self.conn.quic.send_stream_data(self.encoder_stream, data)
        return block

    def cancel(self, stream_id: int) -> None:
        """A request stream is gone: its header block, if blocked, is not awaited any more
        (Stream Cancellation, RFC 9204 §4.4.2; pylsqpack before 1.0 cannot say it)."""
        cancel = getattr(self.decoder, "cancel_stream", None)
        if cancel is not None:
            self._instruct(cancel(stream_id))

    def _instruct(self, control: bytes) -> None:
        if control:
            self.conn.quic.send_stream_data(self.decoder_stream, control)

    def encoder_data(self, data: bytes) -> None:
        """The client's encoder stream: table updates, which may unblock header blocks."""
        try:
            unblocked = self.decoder.feed_encoder(data)
        except EncoderStreamError as exc:
            raise ConnectionFailure(ErrorCode.QPACK_ENCODER_STREAM_ERROR, str(exc)) from None
        for stream_id in unblocked:
            try:
                control, pairs = self.decoder.resume_header(stream_id)
            except DecompressionFailed as exc:
                raise ConnectionFailure(ErrorCode.QPACK_DECOMPRESSION_FAILED, str(exc)) from None
            self._instruct(control)
            self.conn.resume(stream_id, pairs)

    def decoder_data(self, data: bytes) -> None:
        try:
            self.encoder.feed_decoder(data)
        except DecoderStreamError as exc:
            raise ConnectionFailure(ErrorCode.QPACK_DECODER_STREAM_ERROR, str(exc)) from None

    def apply_settings(self, settings: dict[int, int]) -> None:
        data = self.encoder.apply_settings(
            max_table_capacity=settings.get(QPACK_MAX_TABLE_CAPACITY, 0),
            blocked_streams=settings.get(QPACK_BLOCKED_STREAMS, 0),
        )
        if data:
            self.conn.quic.send_stream_data(self.encoder_stream, data)


class PeerStreams:
    """The client's unidirectional streams, by id: their type, once its bytes are in."""

    __slots__ = ("conn", "control", "critical", "partial", "settings", "types")

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.types: dict[int, int] = {}
        self.partial: dict[int, bytes] = {}  # a stream type not whole yet
        self.critical: dict[int, int] = {}  # type -> stream id, for the three that count
        self.control = FrameReader(CONTROL_FRAME_LIMIT)
        self.settings = False  # the client's SETTINGS came

    def data(self, stream_id: int, data: bytes, end: bool) -> None:
        kind = self.types.get(stream_id)
        if kind is None:
            data = self.partial.pop(stream_id, b"") + data
            kind, pos = varint(data, 0)
            if kind < 0:
                if not end:
                    self.partial[stream_id] = data
                return
            self._new(stream_id, kind)
            data = data[pos:]
        if kind == CONTROL_STREAM:
            self._control(data)
        elif kind == ENCODER_STREAM:
            self.conn.qpack.encoder_data(data)
        elif kind == DECODER_STREAM:
            self.conn.qpack.decoder_data(data)
        if end and kind in _CRITICAL:
            raise ConnectionFailure(ErrorCode.CLOSED_CRITICAL_STREAM, "critical stream ended")

    def _new(self, stream_id: int, kind: int) -> None:
        self.types[stream_id] = kind
        if kind in _CRITICAL:
            if kind in self.critical:
                raise ConnectionFailure(ErrorCode.STREAM_CREATION_ERROR, "second critical stream")
            self.critical[kind] = stream_id
        elif kind == PUSH_STREAM:  # §6.2.2: only servers push
            raise ConnectionFailure(ErrorCode.STREAM_CREATION_ERROR, "push stream from a client")
        else:  # §6.2.3: a type we do not know is read no further
            self.conn.quic.stop_stream(stream_id, ErrorCode.STREAM_CREATION_ERROR)
            self.conn.count_reset()

    def _control(self, data: bytes) -> None:
        for frame_type, payload in self.control.feed(data):
            if not self.settings:
                if frame_type != SETTINGS:  # §6.2.1
                    raise ConnectionFailure(ErrorCode.MISSING_SETTINGS, "no SETTINGS first")
                self.settings = True
                self.conn.qpack.apply_settings(parse_settings(payload))
            elif frame_type in (SETTINGS, DATA, HEADERS) or frame_type in _NOT_FROM_CLIENTS:
                raise ConnectionFailure(ErrorCode.FRAME_UNEXPECTED, f"frame {frame_type:#x}")
            # GOAWAY, MAX_PUSH_ID, CANCEL_PUSH concern server push, which fulmen never uses.

    def reset(self, stream_id: int) -> None:
        """The client reset one of its unidirectional streams."""
        self.partial.pop(stream_id, None)
        if stream_id in self.critical.values():
            raise ConnectionFailure(ErrorCode.CLOSED_CRITICAL_STREAM, "critical stream reset")

    @staticmethod
    def check_request_frame(frame_type: int) -> None:
        """A frame other than DATA and HEADERS on a request stream: unknown types are ignored
        (§9), those of the control stream or of push are an error (§7.2)."""
        if frame_type in _CONTROL_ONLY or frame_type in _NOT_FROM_CLIENTS:
            raise ConnectionFailure(ErrorCode.FRAME_UNEXPECTED, f"frame {frame_type:#x}")
