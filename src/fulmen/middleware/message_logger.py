"""`--log-level trace`: every ASGI scope and message, on the `fulmen.asgi` logger.

`log_messages(app)` decides once per server: it wraps the application only when `fulmen.asgi`
(a child of `fulmen`, so `--log-level trace` enables it) is enabled for TRACE, and otherwise
returns the application itself, so the normal path pays nothing. Each application call is
numbered per server; its lines read:

    TRACE:    10.0.0.1:5123 - ASGI [3] Started scope={'type': 'http', ...}
    TRACE:    10.0.0.1:5123 - ASGI [3] Receive {'type': 'http.request', 'body': <5 bytes: b'hello'>}
    TRACE:    10.0.0.1:5123 - ASGI [3] Send {'type': 'http.response.start', ...}
    TRACE:    10.0.0.1:5123 - ASGI [3] Completed

Bodies and WebSocket payloads are shown as their size and first bytes, the scope's `state` and
`extensions` are elided, and each line is escaped (`wire.escape` over the `repr`), so a path or
a body holding CR, LF or ESC cannot forge a log line or reach a terminal raw.
"""

from __future__ import annotations

import logging
from typing import Any

from fulmen.logging import TRACE_LEVEL
from fulmen.protocols.wire import escape
from fulmen.types import ASGIApp

logger = logging.getLogger("fulmen.asgi")

PREVIEW = 100  # bytes (or characters) of a payload shown in a line
_PAYLOADS = ("body", "bytes", "text")  # http.request/http.response.body; websocket.*
_ELIDED = ("state", "extensions")


class _Placeholder:
    """Stands in a dict for a value; its `repr` is the text given."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _payload(value: Any) -> Any:
    if not isinstance(value, (bytes, bytearray, memoryview, str)):
        return value
    if isinstance(value, str):
        unit = "chars"
    else:
        unit = "bytes"
        value = bytes(value)
    more = "..." if len(value) > PREVIEW else ""
    return _Placeholder(f"<{len(value)} {unit}: {value[:PREVIEW]!r}{more}>")


def message_repr(message: Any) -> str:
    """The message with each payload replaced by its size and first bytes, escaped."""
    if not isinstance(message, dict):
        return escape(repr(message))
    shown = {k: _payload(v) if k in _PAYLOADS else v for k, v in message.items()}
    return escape(repr(shown))


def scope_repr(scope: Any) -> str:
    """The scope with `state` and `extensions` elided, escaped."""
    shown = {k: _Placeholder("<...>") if k in _ELIDED else v for k, v in scope.items()}
    return escape(repr(shown))


def _prefix(scope: Any) -> str:
    client = scope.get("client")
    if not client:
        return ""
    return escape(f"{client[0]}:{client[1]} - ")


class MessageLogger:
    """Logs, at TRACE, the scope, each message received and sent, and how the call ended."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.count = 0  # application calls so far, on this server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.count += 1
        head = f"{_prefix(scope)}ASGI [{self.count}]"

        async def logged_receive() -> Any:
            message = await receive()
            logger.log(TRACE_LEVEL, "%s Receive %s", head, message_repr(message))
            return message

        async def logged_send(message: Any) -> None:
            logger.log(TRACE_LEVEL, "%s Send %s", head, message_repr(message))
            await send(message)

        logger.log(TRACE_LEVEL, "%s Started scope=%s", head, scope_repr(scope))
        try:
            await self.app(scope, logged_receive, logged_send)
        except BaseException as exc:
            logger.log(TRACE_LEVEL, "%s Raised exception %s", head, escape(repr(exc)))
            raise
        logger.log(TRACE_LEVEL, "%s Completed", head)


def log_messages(app: ASGIApp) -> ASGIApp:
    """`app` wrapped in a `MessageLogger` if `fulmen.asgi` logs TRACE, else `app` itself."""
    if logger.isEnabledFor(TRACE_LEVEL):
        return MessageLogger(app)
    return app
