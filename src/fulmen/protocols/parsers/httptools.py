"""httptools (llhttp) adapter: the fast path."""

from __future__ import annotations

import contextlib

import httptools

from fulmen.protocols.parsers.base import Limits, ParseError, ParserCallbacks
from fulmen.protocols.parsers.bodies import ChunkedBody, LengthBody

# llhttp's messages for errors that mean something more precise than 400.
_ERROR_STATUS = {"Invalid HTTP version": 505}
# Field names as received -> lowercased, the first `_NAMES_MAX` distinct ones: the usual names
# are looked up instead of lowered, and every request shares one bytes object per name.
_NAMES: dict[bytes, bytes] = {}
_NAMES_MAX = 512


def _lowered(name: bytes) -> bytes:
    lowered = name.lower()
    if len(_NAMES) < _NAMES_MAX:
        lowered = _NAMES.setdefault(lowered, lowered)  # one object for every spelling
        _NAMES[name] = lowered
    return lowered


class HttptoolsParser:
    __slots__ = (
        "_begun",
        "_callbacks",
        "_chunk",
        "_head_bytes",
        "_head_size",
        "_headers",
        "_in_body",
        "_limits",
        "_parser",
        "_request_headers",
        "_upgrade_body",
        "_url",
        "trailing",
        "upgraded",
    )

    def __init__(self, callbacks: ParserCallbacks, limits: Limits) -> None:
        self._callbacks = callbacks
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0  # bytes of the current head's complete lines
        self._head_bytes = 0  # bytes received since the last complete head
        self._in_body = False
        self._begun = False  # a message has begun and not completed
        self._chunk = b""  # the data being fed, to tell HTTP/1.0 from RTSP/ICE
        self._request_headers = self._headers  # the last request's
        self._upgrade_body: ChunkedBody | LengthBody | None = None
        self.upgraded = False
        self.trailing = b""

    def feed(self, data: bytes) -> None:
        if self._upgrade_body is not None:
            self._read_upgrade_body(data)
            return
        if self.upgraded:  # HTTP has ended here: keep the bytes for the next protocol
            self.trailing += data
            return
        self._chunk = data
        if not self._in_body:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # Our callbacks raised: llhttp wraps the exception; hand on the original.
            raise exc.__context__ or exc from None
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if self._upgrade_body is not None:
                self._read_upgrade_body(rest)
            else:
                self.upgraded = True
                self.trailing = rest
            return
        except httptools.HttpParserError as exc:
            reason = str(exc)
            raise ParseError(_ERROR_STATUS.get(reason, 400), reason) from None
        if self._head_bytes > self._limits.head:
            # httptools buffers a header line until it is complete: bound what it may hold.
            raise ParseError(431, "Request header fields too large")

    def release(self) -> bool:
        if self._begun or self._upgrade_body is not None or self.upgraded:
            return False
        del self._callbacks
        self._chunk = b""
        self._request_headers = self._headers
        return True

    def attach(self, callbacks: ParserCallbacks) -> None:
        self._callbacks = callbacks

    def close(self) -> None:
        del self._parser  # it holds our bound methods: a cycle, left to the collector else
        with contextlib.suppress(AttributeError):  # (a released parser holds no connection)
            del self._callbacks

    # llhttp callbacks (state is reset when a head completes)

    def on_message_begin(self) -> None:
        self._begun = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if len(self._url) > self._limits.request_line:
            raise ParseError(414, "Request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:
            return  # a trailer field: RFC 9110 §6.5 lets us discard it
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._limits.head:
            raise ParseError(431, "Request header fields too large")
        self._headers.append((_NAMES.get(name) or _lowered(name), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        url, headers = self._url, self._headers
        self._url = b""
        self._request_headers = headers
        self._headers = []
        self._head_size = self._head_bytes = 0
        self._in_body = True
        parser = self._parser
        version = parser.get_http_version()
        if version == "1.0" and self._other_protocol(url):
            raise ParseError(400, "Not an HTTP request")
        self._callbacks.on_request(parser.get_method(), url, version, headers)

    def _other_protocol(self, url: bytes) -> bool:
        """llhttp also parses RTSP/1.0 and ICE/1.0 and reports them as version 1.0."""
        chunk = self._chunk
        return url + b" RTSP/" in chunk or url + b" ICE/" in chunk

    def on_body(self, body: bytes) -> None:
        self._callbacks.on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = self._begun = False
        if self._parser.should_upgrade():
            body = self._skipped_body()
            if body is not None:
                self._upgrade_body = body  # the message completes once it is read
                return
        self._callbacks.on_message_complete()

    def _skipped_body(self) -> ChunkedBody | LengthBody | None:
        """llhttp passes the body of an upgrade request on as upgraded bytes, unread (h11 reads
        it): a reader for it, so that both parsers deliver it. http1.py has already checked the
        framing headers."""
        for name, value in self._request_headers:
            if name == b"transfer-encoding":
                return ChunkedBody(self._limits.head)
            if name == b"content-length" and int(value) > 0:
                return LengthBody(int(value))
        return None

    def _read_upgrade_body(self, data: bytes) -> None:
        assert self._upgrade_body is not None
        rest = self._upgrade_body.feed(data, self._callbacks.on_body)
        if rest is None:
            return
        self._upgrade_body = None
        self._callbacks.on_message_complete()
        self.upgraded = True
        self.trailing = rest
