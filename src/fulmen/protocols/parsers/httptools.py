"""httptools (llhttp) adapter: the fast path."""

from __future__ import annotations

import contextlib

import httptools

from fulmen.protocols.parsers.base import Limits, ParseError, ParserCallbacks
from fulmen.protocols.parsers.bodies import ChunkedBody, LengthBody

# llhttp's messages for errors that mean something more precise than 400.
_ERROR_STATUS = {"Invalid HTTP version": 505}
# The end of a request line, by the version llhttp read (it knows these four).
_LINE_ENDS = {v: b" HTTP/%b\r\n" % v.encode() for v in ("1.1", "1.0", "2.0", "0.9")}
# Field names as received -> lowercased, the first `_NAMES_MAX` distinct ones: the usual names
# are looked up instead of lowered, and every request shares one bytes object per name.
_NAMES: dict[bytes, bytes] = {}
_NAMES_MAX = 512


def _request_lines(method: bytes, url: bytes, version: str) -> tuple[bytes, ...]:
    """The request line llhttp read, as RFC 9112 §3 writes it: one space between the parts.
    HTTP/0.9's has no version (it is answered 505)."""
    line = method + b" " + url + (_LINE_ENDS.get(version) or b" HTTP/%b\r\n" % version.encode())
    return (line, method + b" " + url + b"\r\n") if version == "0.9" else (line,)


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
        "_held",
        "_in_body",
        "_limits",
        "_line_from",
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
        # Where in it (after `_held`) the next request line is looked for (`_check_line`),
        # and the bytes of earlier data it may begin in, kept while a head is incomplete.
        self._line_from = 0
        self._held = b""
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
        self._line_from = 0
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
        if self._begun and not self._in_body:  # a head goes on in the next data
            self._mid_head(data)

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
        method = parser.get_method()
        # The usual case, at once: the request line starts where the last one ended (or the
        # data: llhttp read the method there), and its version is where one space on each
        # side of the target puts it. Else `_check_line` looks for the line.
        start = self._line_from
        end = start + len(method) + 1 + len(url)
        suffix = _LINE_ENDS.get(version, b"")
        if (
            suffix
            and self._chunk.startswith(suffix, end)
            and not self._held
            and (not start or self._chunk.startswith(method, start))
        ):
            self._line_from = end + len(suffix)
        else:
            self._check_line(method, url, version)
        self._callbacks.on_request(method, url, version, headers)

    def _mid_head(self, data: bytes) -> None:
        """The data ends inside a head: keep what its request line may begin in, and check
        that line already if it is whole, so that a bad one is answered now."""
        held = (self._held + data)[self._line_from :]
        # Not before the end of the last whole head: the head going on starts after it. (The
        # body of a request before it may still be there: a line in it that reads as this
        # head's request line would pass for it.)
        self._held = held = held[held.rfind(b"\r\n\r\n") + 4 :] if b"\r\n\r\n" in held else held
        self._line_from = 0
        url = self._url
        if not url:  # (the request line has not come to its target yet)
            return
        parser = self._parser
        method = parser.get_method()
        # The head's request line is the last line to start with its method and a space.
        start = held.rfind(b"\n" + method + b" ") + 1
        if b"\n" not in held[start:]:
            return  # not whole yet
        # (HTTP/0.9's line has no version: llhttp tells its version only once the head ends)
        lines = _request_lines(method, url, parser.get_http_version())
        lines += (method + b" " + url + b"\r\n",)
        if not any(held.startswith(line, start) for line in lines):
            raise ParseError(400, "Invalid request line")

    def _check_line(self, method: bytes, url: bytes, version: str) -> None:
        """llhttp lets more than one space separate the parts of a request line: refuse
        that, as RFC 9112 §3 (one SP) and h11 do. The line must be in the data as it is
        rebuilt, after the previous request's (`_line_from`)."""
        data = self._chunk
        held = self._held
        if held:
            data = held + data
            self._held = b""
        for line in _request_lines(method, url, version):
            found = data.find(line, self._line_from)
            if found >= 0:
                self._line_from = max(found + len(line) - len(held), 0)
                return
        raise ParseError(400, "Invalid request line")

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
