"""What fulmen's WebSocket cycle and the engines share: the events an engine reports, the
`Engine` and `EngineFactory` interfaces, close codes, and the plain frame writer.

A leaf: the engines (`websockets`, `wsproto`) import it, and so does the package, which picks an
engine (`engine_factory`) and re-exports these names.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Protocol

# Events, as tuples:
#   (DATA, payload, text, fin): part of a message; `text` is True/False on its first part and
#       None on later ones; payload is bytes, or str for text an engine decodes itself.
#   (PONG, payload)
#   (CLOSE, code, reason): the peer closed (the engine has queued the echo), or the engine
#       failed the connection with `code` (it has queued that close frame) and reads no more.


class EventKind(enum.Enum):
    DATA = enum.auto()
    PONG = enum.auto()
    CLOSE = enum.auto()


DATA = EventKind.DATA
PONG = EventKind.PONG
CLOSE = EventKind.CLOSE
Event = tuple[Any, ...]

NO_STATUS = 1005  # RFC 6455 §7.1.5: a close frame without a code
ABNORMAL = 1006  # RFC 6455 §7.1.5: the connection ended without a close frame


def plain_frame(data: bytes | str) -> bytes:
    """One unfragmented, unmasked, uncompressed data frame (RFC 6455 §5.2), as a server sends
    a message when no extension was agreed. Engines use it instead of their general frame
    writer: for this case their only work is this header, and it is the common case."""
    if isinstance(data, str):
        data = data.encode()
        first = 0x81  # FIN + text
    else:
        first = 0x82  # FIN + binary
    size = len(data)
    if size < 126:
        return bytes((first, size)) + data
    if size < 65536:
        return struct.pack("!BBH", first, 126, size) + data
    return struct.pack("!BBQ", first, 127, size) + data


class Engine(Protocol):
    """One WebSocket connection's framing, after the opening handshake."""

    def receive(self, data: bytes) -> list[Event]:
        """Parse `data`; what must be written in reply is then in `output()`."""
        ...

    def output(self) -> bytes:
        """Bytes queued by `receive` (pongs, the close echo, a failure's close frame)."""
        ...

    def message(self, data: bytes | str) -> bytes:
        """One whole message as frames: text for str, binary for bytes."""
        ...

    def close(self, code: int, reason: str) -> bytes: ...

    def ping(self, payload: bytes) -> bytes: ...


class EngineFactory(Protocol):
    """Creates engines for one server's settings."""

    def __call__(self, offer: bytes | None) -> tuple[Engine, bytes | None]:
        """An engine for a handshake whose Sec-WebSocket-Extensions was `offer`, and the
        Sec-WebSocket-Extensions value to answer (None: no extension)."""
        ...
