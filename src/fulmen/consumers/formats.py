"""The legacy message formats, translated to and from ASGI 3.

Incoming: the fields of the request and WebSocket messages a consumer is called with, taken
from the ASGI scope. Outgoing: the reply dicts of the channels era, turned into ASGI messages by
`HTTPReply` and `WebSocketReply`, which also keep the state that decides what a reply means.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fulmen.types import Message, Scope

Reply = dict[str, Any]


def scope_fields(scope: Scope) -> dict[str, Any]:
    """What HTTP and WebSocket messages share: the request line, headers and addresses."""
    return {
        "scheme": scope.get("scheme", "http"),
        "path": scope["path"],
        "root_path": scope.get("root_path", ""),
        "query_string": scope["query_string"],
        "headers": [[name, value] for name, value in scope["headers"]],
        "client": scope.get("client"),
        "server": scope.get("server"),
    }


def request_message(scope: Scope, content: bytes, more: bool) -> dict[str, Any]:
    """The `http.request` message for an ASGI HTTP scope (without its reply channel).

    The body bytes it carries are both `content` and `body` (ASGI 1's name for them)."""
    return {
        "channel": "http.request",
        "http_version": scope["http_version"],
        "method": scope["method"],
        **scope_fields(scope),
        "content": content,
        "body": content,
        "more_content": more,
    }


def has_body(scope: Scope) -> bool:
    """Whether the request has a body to read: a non-zero `content-length`, or chunked."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


def _header_bytes(value: Any) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else bytes(value)


class HTTPReply:
    """`{'status', 'headers', 'content', 'more_content'}` -> `http.response.start` / `.body`."""

    __slots__ = ("complete", "started")

    def __init__(self) -> None:
        self.started = False
        self.complete = False

    def messages(self, reply: Reply) -> list[Message]:
        if self.complete:
            raise RuntimeError("Reply sent after the response was complete")
        out: list[Message] = []
        if not self.started:
            self.started = True
            headers = [
                (_header_bytes(name).lower(), _header_bytes(value))
                for name, value in reply.get("headers", ())
            ]
            out.append(
                {
                    "type": "http.response.start",
                    "status": int(reply.get("status", 200)),
                    "headers": headers,
                }
            )
        more = bool(reply.get("more_content", False))
        self.complete = not more
        content = reply.get("content", b"")
        if isinstance(content, str):
            content = content.encode("utf-8")
        out.append({"type": "http.response.body", "body": bytes(content), "more_body": more})
        return out


class WebSocketReply:
    """`{'accept', 'text', 'bytes', 'close'}` (ASGI 1) -> `websocket.accept` / `.send` / `.close`.

    While the handshake is pending, `accept: False`, or `close` without data or `accept: True`,
    refuses it (a `websocket.close` before accepting: 403); data or `accept: True` accepts it.
    Once open, `accept` means nothing; `close: True` closes with 1000, an int with that code,
    after any `text` or `bytes` of the same reply. Replies after the close are dropped, as the
    era's channel layers dropped messages to a closed reply channel. `answered` is done once
    the handshake is accepted or refused.
    """

    __slots__ = ("accepted", "answered", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.accepted = False
        self.closed = False
        self.answered: asyncio.Future[None] = loop.create_future()

    @property
    def refused(self) -> bool:
        return self.closed and not self.accepted

    def messages(self, reply: Reply) -> list[Message]:
        if self.closed:
            return []
        out = _data(reply)
        close = reply.get("close", False)
        if not self.accepted:
            accept = reply.get("accept")
            if (accept is not None and not accept) or (close and not out and not accept):
                self.closed = True
                self.answered.set_result(None)
                return [{"type": "websocket.close"}]
            if not (accept or out):
                return []  # nothing that answers the handshake yet
            self.accepted = True
            self.answered.set_result(None)
            out.insert(0, {"type": "websocket.accept"})
        if close:
            self.closed = True
            out.append({"type": "websocket.close", "code": 1000 if close is True else int(close)})
        return out


def _data(reply: Reply) -> list[Message]:
    out: list[Message] = []
    text = reply.get("text")
    if text is not None:
        out.append({"type": "websocket.send", "text": text})
    data = reply.get("bytes")
    if data is not None:
        out.append({"type": "websocket.send", "bytes": bytes(data)})
    return out


def connect_fields(scope: Scope) -> dict[str, Any]:
    """The fields of `websocket.connect` beyond the ones every WebSocket message has."""
    return {**scope_fields(scope), "scheme": scope.get("scheme", "ws")}


def receive_fields(event: Message) -> dict[str, Any]:
    """`text` or `bytes` of a `websocket.receive` (the other one None, as in ASGI 1)."""
    return {"text": event.get("text"), "bytes": event.get("bytes")}
