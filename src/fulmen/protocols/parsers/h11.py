"""h11 adapter: the pure-Python parser.

h11 is used for parsing only (responses are framed by `fulmen.protocols.wire` for both parsers),
with a fresh `h11.Connection` per request fed the previous one's unparsed bytes.

h11 is more lenient than llhttp (strict) in places that matter for request smuggling: it
folds obs-fold lines, accepts bare LF line endings, merges identical duplicate Content-Length
fields, keeps control characters in field values and accepts any bytes after `;` in a chunk
header (even a bare CR) and bare LF in the trailer section; and it judges a head only once all
of it has come. The adapter checks the head as its bytes arrive (`strict.HeadCheck`), as llhttp
does, and reads chunked bodies itself, strictly, so both parsers accept and reject the same
requests, as soon as the bytes show it (checked against llhttp's own test vectors in
tests/protocols/test_llhttp_corpus.py).
"""

from __future__ import annotations

import contextlib
import re

import h11

from fulmen.protocols.parsers.base import Limits, ParseError, ParserCallbacks, check_transfer_coding
from fulmen.protocols.parsers.bodies import TOKEN, ChunkedBody
from fulmen.protocols.parsers.strict import HeadCheck

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)
_TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding[ \t]*:([^\r\n]*)", re.IGNORECASE)
_TRANSFER_ENCODING_LINE = re.compile(
    rb"^transfer-encoding[ \t]*:[^\r\n]*\r\n", re.IGNORECASE | re.MULTILINE
)
_CHUNKED = b"transfer-encoding: chunked\r\n"
_UPGRADE = re.compile(rb"\nupgrade[ \t]*:", re.IGNORECASE)
_CONNECTION_UPGRADE = re.compile(
    rb"\nconnection[ \t]*:(?:[^\r\n]*,)?[ \t]*upgrade[ \t]*(?:,|\r?$)", re.IGNORECASE | re.MULTILINE
)
_SIMPLE_REQUEST = re.compile(rb"%b /[!-~]*\r?\n" % TOKEN)  # HTTP/0.9 (no version), as llhttp


class H11Parser:
    __slots__ = (
        "_callbacks",
        "_check",
        "_chunked",
        "_conn",
        "_head",
        "_limits",
        "_switch",
        "trailing",
        "upgraded",
    )

    def __init__(self, callbacks: ParserCallbacks, limits: Limits) -> None:
        self._callbacks = callbacks
        self._limits = limits
        self._conn = self._new_connection()
        self._head: bytearray | None = bytearray()
        self._check = HeadCheck()
        self._chunked: ChunkedBody | None = None  # the chunked body being read, if any
        self._switch = False  # the request asks for a protocol switch (llhttp's rule)
        self.upgraded = False
        self.trailing = b""

    def release(self) -> bool:
        head = self._head
        if head is None or head or self._chunked is not None or self.upgraded:
            return False
        del self._callbacks
        return True

    def attach(self, callbacks: ParserCallbacks) -> None:
        self._callbacks = callbacks

    def close(self) -> None:
        with contextlib.suppress(AttributeError):  # (a released parser holds no connection)
            del self._callbacks

    def _new_connection(self) -> h11.Connection:
        # h11 only bounds heads that arrive in pieces; the complete head is checked below.
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.head)

    def feed(self, data: bytes) -> None:
        if self.upgraded:  # HTTP has ended here: keep the bytes for the next protocol
            self.trailing += data
            return
        if self._chunked is not None:
            self._feed_chunked(data)
            return
        head = self._head
        if head is not None:
            if not head:
                # RFC 9112 §2.2: ignore empty lines before a request line (llhttp does too).
                data = data.lstrip(b"\r\n")
                if not data:
                    return  # receive_data(b"") would mean the client closed
            head += data
            self._check.feed(head)
        self._conn.receive_data(data)
        self._drain()

    def _drain(self) -> None:
        conn = self._conn
        callbacks = self._callbacks
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint != 501:
                    raise self._error(exc) from None
                conn = self._as_chunked()
                continue
            if isinstance(event, h11.Data):
                callbacks.on_body(bytes(event.data))
            elif isinstance(event, h11.Request):
                self._on_request(event)
                if any(name == b"transfer-encoding" for name, _ in event.headers):
                    # h11 let only `chunked` through, but reads its syntax loosely: take over.
                    self._chunked = ChunkedBody(self._limits.head)
                    self._feed_chunked(conn.trailing_data[0])
                    return
            elif isinstance(event, h11.EndOfMessage):
                callbacks.on_message_complete()
                if self._switch:
                    self._upgrade(conn.trailing_data[0])
                    return
                conn = self._next_cycle()
            else:  # NEED_DATA, PAUSED or ConnectionClosed
                self._check_incomplete()
                return

    def _next_cycle(self) -> h11.Connection:
        pending = self._conn.trailing_data[0].lstrip(b"\r\n")  # RFC 9112 §2.2, as in feed()
        self._conn = self._new_connection()
        self._head = bytearray(pending)
        self._check.reset()
        if pending:  # receive_data(b"") would mean the client closed
            self._check.feed(pending)
            self._conn.receive_data(pending)
        return self._conn

    def _feed_chunked(self, data: bytes) -> None:
        chunked = self._chunked
        assert chunked is not None
        rest = chunked.feed(data, self._callbacks.on_body)
        if rest is None:
            return
        self._chunked = None
        self._callbacks.on_message_complete()
        if self._switch:
            self._upgrade(rest)
            return
        self._conn = self._new_connection()
        self._head = bytearray()
        self._check.reset()
        self.feed(rest)

    def _upgrade(self, rest: bytes) -> None:
        self.upgraded = True
        self.trailing = bytes(rest)

    def _as_chunked(self) -> h11.Connection:
        """h11 refused the head's Transfer-Encoding (501: it takes one field, `chunked`, only):
        fulmen's rule (`check_transfer_coding`) decides instead, as for llhttp's requests. What
        it accepts, `chunked` with empty list elements (RFC 9110 §5.6.1: ignored), is read again
        with that one field as `chunked`. An empty field is refused, as llhttp refuses it."""
        raw = bytes(self._head or b"")
        end = _HEAD_END.search(raw)
        assert end is not None  # h11 checks the fields of a whole head only
        head, rest = raw[: end.end()], raw[end.end() :]
        codings = _TRANSFER_ENCODING.findall(head)
        if not all(coding.strip(b" \t") for coding in codings):
            raise ParseError(400, "Empty Transfer-Encoding")
        check_transfer_coding(b",".join(codings), _CONTENT_LENGTH.search(head) is not None)
        line_end = head.index(b"\n") + 1
        head = head[:line_end] + _CHUNKED + _TRANSFER_ENCODING_LINE.sub(b"", head[line_end:])
        self._conn = self._new_connection()
        self._head = bytearray(head + rest)
        self._conn.receive_data(bytes(self._head))
        return self._conn

    def _error(self, exc: h11.RemoteProtocolError) -> ParseError:
        """The ParseError for h11's error, with the status llhttp and http1.py would give."""
        status, head = exc.error_status_hint, bytes(self._head or b"")
        if status == 431:  # h11 counts the whole head; a request line too long is 414
            self._check_incomplete()
        elif _SIMPLE_REQUEST.match(head):
            return ParseError(505, "HTTP version 0.9 not supported")
        return ParseError(status, str(exc))

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
        if event.method == b"PRI":
            # RFC 9113 §3.4, §11.6: the method of HTTP/2's connection preface, never a request.
            raise ParseError(400, "HTTP/2 connection preface")
        # As llhttp: a CONNECT, or an Upgrade header with `Connection: upgrade`, ends HTTP on this
        # connection (h11 alone would stop at any Upgrade header).
        self._switch = event.method == b"CONNECT" or (
            _UPGRADE.search(raw) is not None and _CONNECTION_UPGRADE.search(raw) is not None
        )
        self._callbacks.on_request(
            event.method,
            event.target,
            event.http_version.decode("ascii"),
            list(event.headers),
        )
