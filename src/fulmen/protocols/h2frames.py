"""HTTP/2 frames (RFC 9113 §4, §6): reading them off the connection's bytes, and writing them.

`FrameReader` turns received bytes into direct calls on its `Receiver` (the connection), one
per frame, with the frame-level rules already enforced: the client preface, SETTINGS first,
frame sizes, the fixed lengths of control frames, padding, and header blocks split over
CONTINUATION frames (nothing may come between them, and their total size is bounded). What
depends on stream state (which streams exist, flow-control windows) is the receiver's.

A rule broken at connection level raises `ConnectionFailure` with its error code; the
connection then sends GOAWAY and closes. The frame writers return the bytes of one frame;
the connection joins what it writes in one `transport.write`.
"""

from __future__ import annotations

import enum
import struct
from typing import Protocol

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
# Flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS parameters (RFC 9113 §6.5.2, RFC 8441 §3)
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
ENABLE_CONNECT_PROTOCOL = 0x8

MAX_WINDOW = 2**31 - 1  # §6.9.1
DEFAULT_FRAME_SIZE = 16384  # §6.5.2: what we accept, and what we send until told more
DEFAULT_WINDOW = 65535

_HEAD = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_U32 = struct.Struct(">L")
_U32X2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


class ErrorCode(enum.IntEnum):
    """RFC 9113 §7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class ConnectionFailure(Exception):
    """A connection error (RFC 9113 §5.4.1): GOAWAY with `code`, then the connection closes."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class Receiver(Protocol):
    """What the reader calls, once per frame (the stream id is never 0 where one is named,
    and 0 where none is)."""

    def on_headers(
        self, stream_id: int, block: bytes, end_stream: bool, refuse: ErrorCode | None = None
    ) -> None:
        """A whole header block (HEADERS and its CONTINUATION frames), padding removed;
        `refuse`: the HEADERS frame broke a rule of its stream, to be reset with this code."""

    def on_data(self, stream_id: int, data: bytes, length: int, end_stream: bool) -> None:
        """DATA: `length` is what counts against flow control (the padding included)."""

    def on_priority(self, stream_id: int, depends_on: int) -> None: ...

    def on_rst_stream(self, stream_id: int, code: int) -> None: ...

    def on_settings(self, settings: list[tuple[int, int]]) -> None:
        """The peer's SETTINGS (not an ACK): the connection must acknowledge them."""

    def on_ping(self, payload: bytes) -> None:
        """A PING to answer."""

    def on_ping_ack(self, payload: bytes) -> None:
        """The answer to a PING the connection sent."""

    def on_goaway(self, last_stream_id: int, code: int) -> None: ...

    def on_window_update(self, stream_id: int, increment: int) -> None:
        """`stream_id` 0 is the connection's window; `increment` may be 0 (an error)."""

    def on_stream_error(self, stream_id: int, code: ErrorCode, reason: str) -> None:
        """A PRIORITY frame that breaks a rule of its own stream only (RFC 9113 §5.4.2)."""


class FrameReader:
    """Frames out of received bytes, for one connection's `Receiver`."""

    __slots__ = (
        "block",
        "block_end",
        "block_limit",
        "block_refuse",
        "block_stream",
        "buffer",
        "preface",
        "target",
    )

    def __init__(self, target: Receiver, block_limit: int, preface: bool = True) -> None:
        """`block_limit`: the largest header block accepted (its encoded size);
        `preface`: the client preface is still to come."""
        self.target = target
        self.buffer = b""
        self.preface = preface
        self.block_limit = block_limit
        self.block: bytes | None = None  # a header block waiting for its CONTINUATION frames
        self.block_stream = 0
        self.block_end = False  # the HEADERS frame of `block` had END_STREAM
        self.block_refuse: ErrorCode | None = None  # and broke a rule of its stream

    def feed(self, data: bytes) -> None:
        """Read every whole frame in the bytes received so far; keep the rest for later."""
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        pos = 0
        if self.preface:
            pos = self._preface(data)
            if pos < 0:
                return
        end = len(data)
        unpack = _HEAD.unpack_from
        while end - pos >= 9:
            high, low, kind, flags, stream_id = unpack(data, pos)
            length = high << 8 | low
            if length > DEFAULT_FRAME_SIZE:  # we never raise SETTINGS_MAX_FRAME_SIZE
                raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "frame larger than allowed")
            stop = pos + 9 + length
            if stop > end:
                break
            payload = data[pos + 9 : stop]
            pos = stop
            stream_id &= 0x7FFFFFFF
            if self.block is not None and kind != CONTINUATION:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
            if kind == HEADERS:
                self._headers(flags, stream_id, payload)
            elif kind == DATA:
                self._data(flags, stream_id, payload)
            elif kind < len(_READERS):
                _READERS[kind](self, flags, stream_id, payload)
            # Unknown frame types are ignored (RFC 9113 §5.5).
        if pos < end:
            self.buffer = data[pos:]

    def _preface(self, data: bytes) -> int:
        """Where the frames begin, past the client preface (-1: not all of it yet). The first
        frame after it must be SETTINGS (RFC 9113 §3.4)."""
        size = len(PREFACE)
        if len(data) < size + 9:
            if not PREFACE.startswith(data[:size]):
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
            self.buffer = data
            return -1
        if data[:size] != PREFACE or data[size + 3] != SETTINGS:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "invalid connection preface")
        self.preface = False
        return size

    # Frames whose payload is checked here

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "HEADERS on stream 0")
        priority = 5 if flags & PRIORITY_FLAG else 0  # the priority fields' octets
        if flags & PADDED:
            payload = _unpad(payload, priority)
        refuse = None
        if priority:
            if len(payload) < 5:
                raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "HEADERS too short")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:  # §5.3.1
                refuse = ErrorCode.PROTOCOL_ERROR
            payload = payload[5:]
        end_stream = bool(flags & END_STREAM)
        if flags & END_HEADERS:
            self.target.on_headers(stream_id, payload, end_stream, refuse)
            return
        self._limit(len(payload))
        self.block = payload
        self.block_stream = stream_id
        self.block_end = end_stream
        self.block_refuse = refuse

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        block = self.block
        if block is None or stream_id != self.block_stream:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._limit(len(block) + len(payload))
        block += payload
        if flags & END_HEADERS:
            self.block = None
            self.target.on_headers(stream_id, block, self.block_end, self.block_refuse)
        else:
            self.block = block

    def _limit(self, size: int) -> None:
        """A header block that keeps growing (CONTINUATION flood, CVE-2024-27316 class)."""
        if size > self.block_limit:
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if flags & PADDED:
            payload = _unpad(payload)
        self.target.on_data(stream_id, payload, length, bool(flags & END_STREAM))

    def _priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self.target.on_stream_error(stream_id, ErrorCode.FRAME_SIZE_ERROR, "PRIORITY size")
            return
        depends_on = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if depends_on == stream_id:
            self.target.on_stream_error(stream_id, ErrorCode.PROTOCOL_ERROR, "self-dependency")
            return
        self.target.on_priority(stream_id, depends_on)

    def _rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "RST_STREAM size")
        self.target.on_rst_stream(stream_id, _U32.unpack(payload)[0])

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            return
        self.target.on_settings(parse_settings(payload))

    def _push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "PING size")
        if flags & ACK:
            self.target.on_ping_ack(payload)
        else:
            self.target.on_ping(payload)

    def _goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "GOAWAY size")
        last, code = _U32X2.unpack_from(payload)
        self.target.on_goaway(last & 0x7FFFFFFF, code)

    def _window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE size")
        self.target.on_window_update(stream_id, _U32.unpack(payload)[0] & 0x7FFFFFFF)


_READERS = (
    FrameReader._data,
    FrameReader._headers,
    FrameReader._priority,
    FrameReader._rst_stream,
    FrameReader._settings,
    FrameReader._push_promise,
    FrameReader._ping,
    FrameReader._goaway,
    FrameReader._window_update,
    FrameReader._continuation,
)


def _unpad(payload: bytes, reserved: int = 0) -> bytes:
    """A padded frame's content (RFC 9113 §6.1, §6.2): the pad length octet and the padding
    removed. The padding may not reach into the frame's `reserved` leading octets."""
    if not payload or payload[0] >= len(payload) - reserved:
        raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """The (parameter, value) pairs of a SETTINGS payload (RFC 9113 §6.5.1), each value in
    its range (`ConnectionFailure` otherwise): a SETTINGS frame's, or an HTTP2-Settings
    field's (`fulmen.protocols.h2c`)."""
    if len(payload) % 6:
        raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS size")
    settings = [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]
    for code, value in settings:
        _check_setting(code, value)
    return settings


def _check_setting(code: int, value: int) -> None:
    """RFC 9113 §6.5.2 and RFC 8441 §3: values a known parameter may not take."""
    if code == INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
        raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE")
    if code in (ENABLE_PUSH, ENABLE_CONNECT_PROTOCOL) and value > 1:
        raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "SETTINGS flag out of range")
    if code == MAX_FRAME_SIZE and not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
        raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE")


# Writing


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte header, then `payload`."""
    length = len(payload)
    return _HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


SETTINGS_ACK = frame(SETTINGS, ACK, 0)


def server_preface(
    max_streams: int, max_list_size: int, stream_window: int, window: int, connect: bool
) -> bytes:
    """The server's connection preface (RFC 9113 §3.4): its SETTINGS, then a WINDOW_UPDATE
    that takes the connection's receive window from the default to `window`."""
    settings = settings_frame(
        {
            MAX_CONCURRENT_STREAMS: max_streams,
            MAX_HEADER_LIST_SIZE: max_list_size,
            INITIAL_WINDOW_SIZE: stream_window,
            ENABLE_PUSH: 0,
            ENABLE_CONNECT_PROTOCOL: int(connect),
        }
    )
    if window > DEFAULT_WINDOW:
        return settings + window_update(0, window - DEFAULT_WINDOW)
    return settings


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int) -> bytes:
    return frame(GOAWAY, 0, 0, _U32X2.pack(last_stream_id, code))


def ping(payload: bytes) -> bytes:
    return frame(PING, 0, 0, payload)


def ping_ack(payload: bytes) -> bytes:
    return frame(PING, ACK, 0, payload)


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_size: int) -> bytes:
    """A header block as HEADERS, then CONTINUATION frames if it does not fit in one."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_size:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    chunks = [block[i : i + max_size] for i in range(0, len(block), max_size)]
    last = len(chunks) - 1
    return b"".join(
        frame(
            CONTINUATION if n else HEADERS,
            (0 if n else flags) | (END_HEADERS if n == last else 0),
            stream_id,
            chunk,
        )
        for n, chunk in enumerate(chunks)
    )
