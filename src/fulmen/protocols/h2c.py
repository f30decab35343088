"""HTTP/2 over cleartext, as an HTTP/1.1 connection notices it: the connection preface of a
client with prior knowledge (RFC 9113 §3.3), and the `Upgrade: h2c` request (RFC 7540 §3.2).

Pure functions, nothing of the HTTP/2 connection imported (only its frame layer's rules for
SETTINGS): `H1Connection` asks them, then hands the connection over through `state.http2`
(`fulmen.protocols.dispatch.take_over`).
"""

from __future__ import annotations

import base64
import binascii

from fulmen.protocols.h2frames import ConnectionFailure, parse_settings

PREFACE_START = b"PRI "  # no HTTP/1.1 method is PRI: these bytes can only be the h2c preface
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: h2c\r\n\r\n"
MAX_UPGRADE_BODY = 65536  # larger bodies are served over HTTP/1.1, ignoring the upgrade


def maybe_preface(data: bytes) -> bool | None:
    """True if `data`, the first bytes of a connection, begin the h2c preface; None if there
    are too few bytes to tell; False for HTTP/1.1."""
    if len(data) < len(PREFACE_START):
        return None if PREFACE_START.startswith(data) else False
    return data.startswith(PREFACE_START)


def _tokens(value: bytes) -> set[bytes]:
    return {token.strip() for token in value.split(b",")}


def upgrade_settings(
    headers: list[tuple[bytes, bytes]],
    upgrade: bytes,
    connection: bytes,
    length: bytes | None,
    chunked: bool,
) -> list[tuple[int, int]] | None:
    """The settings of the HTTP2-Settings field if this HTTP/1.1 request asks to upgrade to
    h2c in a way we follow, else None (the request is then served over HTTP/1.1).

    RFC 7540 §3.2: `Upgrade: h2c`, `Connection: Upgrade, HTTP2-Settings` and exactly one
    HTTP2-Settings field holding a SETTINGS payload. The request body, if any, is read over
    HTTP/1.1 first, so it must be small and of known length."""
    if b"h2c" not in _tokens(upgrade) or not {b"upgrade", b"http2-settings"} <= _tokens(connection):
        return None
    if chunked or (length is not None and (not length.isdigit() or int(length) > MAX_UPGRADE_BODY)):
        return None
    values = [value for name, value in headers if name == b"http2-settings"]
    if len(values) != 1:
        return None
    value = values[0].strip()
    value += b"=" * (-len(value) % 4)  # sent without padding (token68)
    try:
        # Settings of 6 bytes each, with values in range (RFC 9113 §6.5.1, §6.5.2).
        return parse_settings(base64.urlsafe_b64decode(value))
    except (binascii.Error, ValueError, ConnectionFailure):
        return None


class Upgrade:
    """An HTTP/1.1 request that asked for h2c (RFC 7540 §3.2): it is answered on stream 1."""

    __slots__ = ("body", "headers", "method", "settings", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        settings: list[tuple[int, int]],
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.settings = settings  # of the HTTP2-Settings field: the client's first SETTINGS
        self.body = b""
