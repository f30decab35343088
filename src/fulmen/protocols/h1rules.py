"""HTTP/1.1 request rules (RFC 9112) that need no connection state: keep-alive, the WebSocket
upgrade request, the body size limit and absolute-form targets."""

from __future__ import annotations

from fulmen.protocols.parsers import ParseError


def keep_alive(version: str, connection: bytes) -> bool:
    """RFC 9112 §9.3: HTTP/1.1 persists unless `close`; HTTP/1.0 only with `keep-alive`.
    An upgrade request is served as plain HTTP, then the connection ends."""
    if not connection:
        return version == "1.1"
    tokens = {token.strip() for token in connection.split(b",")}
    if b"upgrade" in tokens:
        return False
    if version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def websocket_upgrade(upgrade: bytes, connection: bytes) -> bool:
    """RFC 6455 §4.2.1: `Upgrade: websocket` with `Connection: upgrade` (tokens, any case)."""
    tokens = {token.strip() for token in connection.split(b",")}
    return b"upgrade" in tokens and b"websocket" in {t.strip() for t in upgrade.split(b",")}


def check_length(length: int, limit: int) -> None:
    if length > limit:
        raise ParseError(413, "Request body too large")


def origin_path(target: bytes) -> bytes:
    """The path of an absolute-form target (RFC 9112 §3.2.2), e.g. from a proxy."""
    scheme_end = target.find(b"://")
    if scheme_end < 0:
        raise ParseError(400, "Invalid request target")
    slash = target.find(b"/", scheme_end + 3)
    return target[slash:] if slash >= 0 else b"/"
