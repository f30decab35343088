"""HTTP/3 framing (RFC 9114 §7) and the constants of its streams, settings and errors.

A frame is a type, a length and a payload, the first two as QUIC variable-length integers
(RFC 9000 §16). `FrameReader` cuts one stream's bytes into frames as they arrive; a DATA
frame's payload is handed on in the pieces that come, never held whole, and every other frame
is bounded by a size limit, past which the stream's sender has broken the connection's rules.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

# Frame types (§7.2); the HTTP/2 types that HTTP/3 reserves must never be received (§7.2.8).
DATA = 0x0
HEADERS = 0x1
CANCEL_PUSH = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
GOAWAY = 0x7
MAX_PUSH_ID = 0xD
RESERVED_H2_FRAMES = frozenset((0x2, 0x6, 0x8, 0x9))

# Unidirectional stream types (§6.2, RFC 9204 §4.2).
CONTROL_STREAM = 0x0
PUSH_STREAM = 0x1
ENCODER_STREAM = 0x2
DECODER_STREAM = 0x3

# Settings (§7.2.4.1, RFC 9204 §5, RFC 9220 §3); 0x2-0x5 are HTTP/2's and an error here.
QPACK_MAX_TABLE_CAPACITY = 0x1
MAX_FIELD_SECTION_SIZE = 0x6
QPACK_BLOCKED_STREAMS = 0x7
ENABLE_CONNECT_PROTOCOL = 0x8
RESERVED_H2_SETTINGS = frozenset((0x2, 0x3, 0x4, 0x5))

MAX_STREAM_ID = 2**62 - 4  # the largest client-initiated bidirectional stream id (GOAWAY)


class ErrorCode(enum.IntEnum):
    """HTTP/3 and QPACK error codes (RFC 9114 §8.1, RFC 9204 §6)."""

    NO_ERROR = 0x100
    GENERAL_PROTOCOL_ERROR = 0x101
    INTERNAL_ERROR = 0x102
    STREAM_CREATION_ERROR = 0x103
    CLOSED_CRITICAL_STREAM = 0x104
    FRAME_UNEXPECTED = 0x105
    FRAME_ERROR = 0x106
    EXCESSIVE_LOAD = 0x107
    ID_ERROR = 0x108
    SETTINGS_ERROR = 0x109
    MISSING_SETTINGS = 0x10A
    REQUEST_REJECTED = 0x10B
    REQUEST_CANCELLED = 0x10C
    REQUEST_INCOMPLETE = 0x10D
    MESSAGE_ERROR = 0x10E
    QPACK_DECOMPRESSION_FAILED = 0x200
    QPACK_ENCODER_STREAM_ERROR = 0x201
    QPACK_DECODER_STREAM_ERROR = 0x202


class ConnectionFailure(Exception):
    """A connection error (§8): the QUIC connection closes with `code`."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def varint(data: bytes, pos: int) -> tuple[int, int]:
    """The variable-length integer at `pos` and the position after it; (-1, pos) when `data`
    ends before it does."""
    end = len(data)
    if pos >= end:
        return -1, pos
    first = data[pos]
    size = 1 << (first >> 6)
    if pos + size > end:
        return -1, pos
    value = first & 0x3F
    for index in range(pos + 1, pos + size):
        value = (value << 8) | data[index]
    return value, pos + size


def uint_var(value: int) -> bytes:
    """A variable-length integer (RFC 9000 §16), in its shortest form."""
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x40000000:
        return (value | 0x80000000).to_bytes(4, "big")
    return (value | 0xC000000000000000).to_bytes(8, "big")


def frame(frame_type: int, payload: bytes) -> bytes:
    return uint_var(frame_type) + uint_var(len(payload)) + payload


def data_head(size: int) -> bytes:
    """The type and length of a DATA frame of `size` bytes, sent before its payload."""
    return b"\x00" + uint_var(size)


def encode_settings(settings: Iterable[tuple[int, int]]) -> bytes:
    return frame(SETTINGS, b"".join(uint_var(k) + uint_var(v) for k, v in settings))


def parse_settings(payload: bytes) -> dict[int, int]:
    """A SETTINGS payload: identifiers must be unique and not HTTP/2's (§7.2.4)."""
    settings: dict[int, int] = {}
    pos = 0
    while pos < len(payload):
        key, pos = varint(payload, pos)
        value, after = varint(payload, pos)
        if key < 0 or value < 0:
            raise ConnectionFailure(ErrorCode.FRAME_ERROR, "truncated SETTINGS")
        if key in settings or key in RESERVED_H2_SETTINGS:
            raise ConnectionFailure(ErrorCode.SETTINGS_ERROR, f"setting {key:#x}")
        settings[key] = value
        pos = after
    return settings


class FrameReader:
    """Cuts one stream's bytes into frames. `feed` returns the complete frames, as (type,
    payload) pairs, and DATA payloads as they arrive, in pieces of the type DATA."""

    __slots__ = ("buffer", "data_left", "limit")

    def __init__(self, limit: int) -> None:
        self.buffer = b""
        self.data_left = 0  # bytes of the current DATA frame's payload still to come
        self.limit = limit  # the largest payload of any other frame

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        frames: list[tuple[int, bytes]] = []
        if self.buffer:
            data = self.buffer + data
            self.buffer = b""
        pos = 0
        end = len(data)
        while pos < end:
            left = self.data_left
            if left:
                piece = data[pos : pos + left] if pos or end - pos > left else data
                self.data_left = left - len(piece)
                pos += len(piece)
                frames.append((DATA, piece))
                continue
            frame_type, after = varint(data, pos)
            length, after = varint(data, after)
            if length < 0:
                self._keep(data[pos:])
                break
            if frame_type == DATA:
                self.data_left = length
                pos = after
                if not length:
                    frames.append((DATA, b""))
                continue
            if length > self.limit:
                raise ConnectionFailure(ErrorCode.EXCESSIVE_LOAD, f"frame of {length} bytes")
            if after + length > end:
                self._keep(data[pos:])
                break
            frames.append((frame_type, data[after : after + length]))
            pos = after + length
        return frames

    def _keep(self, rest: bytes) -> None:
        """An incomplete frame head or payload, held for the next bytes."""
        if len(rest) > self.limit + 16:
            raise ConnectionFailure(ErrorCode.EXCESSIVE_LOAD, "frame too large")
        self.buffer = rest

    @property
    def mid_frame(self) -> bool:
        """Whether the stream stopped inside a frame (an end there is malformed, §7.1)."""
        return bool(self.buffer or self.data_left)
