"""h11 adapter: the pure-Python parser.

h11 is used for parsing only (responses are framed by `fulmen.protocols.wire` for both parsers),
with a fresh `h11.Connection` per request fed the previous one's unparsed bytes.

h11 is more lenient than llhttp in three places that matter for request smuggling: it folds
obs-fold lines, accepts bare LF line endings and merges identical duplicate Content-Length
fields. The adapter keeps the raw head until h11 emits the request and rejects those, so both
parsers accept and reject the same requests.
"""

from __future__ import annotations

import re

import h11
from h11._state import MIGHT_SWITCH_PROTOCOL

from fulmen.protocols.parsers import Limits, ParseError, ParserCallbacks

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_OBS_FOLD = re.compile(rb"\n[ \t]")  # RFC 9112 §5.2: reject obs-fold in requests
_BARE_LF = re.compile(rb"(?<!\r)\n")  # RFC 9112 §2.2: bare LF is not a line ending here
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)


class H11Parser:
    __slots__ = ("_callbacks", "_conn", "_head", "_limits", "upgraded")

    def __init__(self, callbacks: ParserCallbacks, limits: Limits) -> None:
        self._callbacks = callbacks
        self._limits = limits
        self._conn = self._new_connection()
        self._head: bytearray | None = bytearray()
        self.upgraded = False

    def _new_connection(self) -> h11.Connection:
        # h11 only bounds heads that arrive in pieces; the complete head is checked below.
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.head)

    def feed(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
        self._conn.receive_data(data)
        self._drain()

    def _drain(self) -> None:
        conn = self._conn
        callbacks = self._callbacks
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ParseError(exc.error_status_hint, str(exc)) from None
            if isinstance(event, h11.Data):
                callbacks.on_body(bytes(event.data))
            elif isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.EndOfMessage):
                callbacks.on_message_complete()
                # MUST_CLOSE (e.g. HTTP/1.0) is not an upgrade: http1.py decides keep-alive.
                if conn.their_state is MIGHT_SWITCH_PROTOCOL:
                    self.upgraded = True
                    return
                conn = self._next_cycle()
            else:  # NEED_DATA, PAUSED or ConnectionClosed
                self._check_incomplete()
                return

    def _next_cycle(self) -> h11.Connection:
        pending, _ = self._conn.trailing_data
        self._conn = self._new_connection()
        self._head = bytearray(pending)
        if pending:  # receive_data(b"") would mean the client closed
            self._conn.receive_data(bytes(pending))
        return self._conn

    def _check_incomplete(self) -> None:
        head = self._head
        limit = self._limits.request_line
        if head is not None and len(head) > limit and b"\n" not in head.lstrip(b"\r\n")[:limit]:
            raise ParseError(414, "Request line too long")

    def _on_request(self, event: h11.Request) -> None:
        head = (self._head or b"").lstrip(b"\r\n")
        self._head = None
        match = _HEAD_END.search(head)
        raw = bytes(head[: match.start() + 1]) if match else bytes(head)
        request_line_end = raw.find(b"\n")
        if request_line_end > self._limits.request_line:
            raise ParseError(414, "Request line too long")
        if len(raw) > self._limits.head:
            raise ParseError(431, "Request header fields too large")
        if _BARE_LF.search(raw) or _OBS_FOLD.search(raw):
            raise ParseError(400, "Invalid line ending or obs-fold in request head")
        lengths = _CONTENT_LENGTH.findall(raw)
        if len(lengths) > 1 or (lengths and b"," in lengths[0]):
            raise ParseError(400, "Duplicate Content-Length")
        self._callbacks.on_request(
            event.method,
            event.target,
            event.http_version.decode("ascii"),
            list(event.headers),
        )
