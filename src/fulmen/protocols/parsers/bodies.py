"""Request bodies read by fulmen itself, strictly: chunked (RFC 9112 §7.1) and by length.

The h11 adapter reads every chunked body here (h11 reads chunk syntax loosely); the httptools
adapter reads here the body of an upgrade request, which llhttp skips.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

from fulmen.protocols.parsers.base import ParseError

MAX_LENGTH = 1 << 64  # llhttp's bound on Content-Length and chunk sizes
TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"

# RFC 9112 §7.1: chunk-size [ chunk-ext ] CRLF, chunk-ext = *( ";" name [ "=" value ] ), without
# the optional whitespace, as llhttp (strict) reads it; a trailer field is a field line (§7.1.2).
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:;%b(?:=(?:%b|%b)?)?)*" % (TOKEN, TOKEN, _QUOTED))
_VCHAR = rb"[\x21-\x7e\x80-\xff]"
FIELD_LINE = re.compile(rb"%b:[ \t]*(?:%b+(?:[ \t]+%b+)*)?[ \t]*" % (TOKEN, _VCHAR, _VCHAR))

_FRAMING_FIELD = re.compile(rb"(?:content-length|transfer-encoding):", re.IGNORECASE)


class Part(enum.Enum):
    """Where a chunked body reader stands."""

    SIZE = enum.auto()  # a chunk-size line
    DATA = enum.auto()  # chunk data
    DATA_END = enum.auto()  # the CRLF after chunk data
    TRAILERS = enum.auto()  # the trailer section, up to its empty line


SIZE = Part.SIZE
DATA = Part.DATA
DATA_END = Part.DATA_END
TRAILERS = Part.TRAILERS


class ChunkedBody:
    """Reads one chunked body (RFC 9112 §7.1) strictly, returning what follows it."""

    __slots__ = ("_buffer", "_limit", "_remaining", "_state", "_trailer_size")

    def __init__(self, limit: int) -> None:
        self._buffer = b""
        self._limit = limit  # bound on a chunk header line and on the trailer section
        self._remaining = 0  # data bytes left in the current chunk
        self._state = SIZE
        self._trailer_size = 0

    def feed(self, data: bytes, on_body: Callable[[bytes], None]) -> bytes | None:
        """Hand chunk data to `on_body`; at the end of the body return the bytes after it."""
        buffer = self._buffer + data if self._buffer else data
        pos = 0
        while True:
            state = self._state
            if state is DATA:
                size = min(self._remaining, len(buffer) - pos)
                if size:
                    on_body(buffer[pos : pos + size])
                    pos += size
                    self._remaining -= size
                if self._remaining:
                    break
                self._state = DATA_END
            elif state is DATA_END:
                if len(buffer) - pos < 2:
                    break
                if buffer[pos : pos + 2] != b"\r\n":
                    raise ParseError(400, "Chunk data not followed by CRLF")
                pos += 2
                self._state = SIZE
            else:
                end = buffer.find(b"\r\n", pos)
                if end < 0:
                    # Without a CRLF, an LF here is a bare one: reject now rather than wait.
                    if b"\n" in buffer[pos:] or len(buffer) - pos > self._limit:
                        raise ParseError(400, "Invalid chunk header or trailer line")
                    break
                line = buffer[pos:end]
                pos = end + 2
                if state is SIZE:
                    self._chunk_header(line)
                elif line:
                    self._trailer_size += len(line) + 2
                    if self._trailer_size > self._limit:
                        raise ParseError(431, "Trailer section too large")
                    if FIELD_LINE.fullmatch(line) is None:
                        raise ParseError(400, "Invalid trailer field")
                    if _FRAMING_FIELD.match(line):
                        # RFC 9110 §6.5.1: framing fields never go in trailers. Refused, as
                        # llhttp refuses them, so that both parsers answer alike.
                        raise ParseError(400, "Framing field in trailer section")
                else:
                    self._buffer = b""
                    return buffer[pos:]
        self._buffer = buffer[pos:]
        return None

    def _chunk_header(self, line: bytes) -> None:
        match = _CHUNK_LINE.fullmatch(line)
        if match is None or len(line) > self._limit:
            raise ParseError(400, "Invalid chunk header")
        size = int(match[1], 16)
        if size >= MAX_LENGTH:
            raise ParseError(400, "Chunk size too large")
        self._remaining = size
        self._state = DATA if size else TRAILERS


class LengthBody:
    """Reads a body of Content-Length bytes, returning what follows it."""

    __slots__ = ("_remaining",)

    def __init__(self, length: int) -> None:
        self._remaining = length

    def feed(self, data: bytes, on_body: Callable[[bytes], None]) -> bytes | None:
        size = min(self._remaining, len(data))
        if size:
            on_body(data[:size])
            self._remaining -= size
        return None if self._remaining else data[size:]
