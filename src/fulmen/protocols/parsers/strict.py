"""A request head checked as its bytes arrive, line by line, as strictly as llhttp (strict)
checks it: for the h11 adapter, since h11 judges a head only once all of it has come, so a
malformed head would wait for the header timeout, and reads some of it more loosely.

Each line is checked when its LF comes, and the line still arriving as far as it goes, so a
head is rejected at the first bytes that show it malformed, with the status llhttp gives:
- the request line: `method SP request-target SP HTTP/d.d CRLF` (RFC 9112 §3), one space
  between the parts; a version llhttp does not know (it knows 0.9, 1.0, 1.1 and 2.0) is 505,
  the others are for `fulmen.protocols.http1` to refuse; `method SP target CRLF` is an
  HTTP/0.9 request, which the adapter answers 505;
- field lines: `name ":" OWS value OWS CRLF` (RFC 9112 §5), the name a token, the value
  visible characters, spaces and tabs only (RFC 9110 §5.5: no other controls, no CR); a line
  starting with a space or a tab is obs-fold, or a space after the start line (RFC 9112 §5.2,
  §2.2): 400;
- every line ends with CRLF (RFC 9112 §2.2: no bare LF, no CR without LF);
- Content-Length (RFC 9112 §6.3): digits, below 2**64 (llhttp's bound), only one.
"""

from __future__ import annotations

import re

from fulmen.protocols.parsers.base import ParseError
from fulmen.protocols.parsers.bodies import FIELD_LINE, MAX_LENGTH, TOKEN

_TOKEN_CHAR = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]"
_TARGET_CHAR = rb"[\x21-\x7e]"  # h11's request-target: visible ASCII
_REQUEST_LINE = re.compile(rb"%b %b+(?: HTTP/([0-9])\.([0-9]))?" % (TOKEN, _TARGET_CHAR))
# What a request line may be so far (the parts in order, each perhaps cut short), then a CR.
_REQUEST_START = re.compile(
    rb"%b*(?: %b*(?: (?:H(?:T(?:T(?:P(?:/(?:[0-9](?:\.[0-9]?)?)?)?)?)?)?)?)?)?\r?"
    % (_TOKEN_CHAR, _TARGET_CHAR)
)
_FIELD_START = re.compile(rb"(?:%b+(?::[\t \x21-\x7e\x80-\xff]*)?)?\r?" % _TOKEN_CHAR)
_DIGITS = re.compile(rb"[0-9]+")
_VERSIONED = re.compile(rb"%b %b+ HTTP/([0-9])\.([0-9])" % (TOKEN, _TARGET_CHAR))
KNOWN_VERSIONS = frozenset(((b"0", b"9"), (b"1", b"0"), (b"1", b"1"), (b"2", b"0")))


class HeadCheck:
    """The checks of one request head at a time, over the bytes received of it so far."""

    __slots__ = ("done", "length_seen", "lines", "start")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new head begins."""
        self.start = 0  # where the first line not yet checked whole begins
        self.lines = 0  # lines checked whole
        self.length_seen = False
        self.done = False  # the empty line that ends the head has come

    def feed(self, head: bytes | bytearray) -> None:
        """Check what of `head` (all the bytes of the head received so far, and perhaps more
        after it) was not checked yet; raise the `ParseError` of the first fault."""
        if self.done:
            return
        start = self.start
        while True:
            end = head.find(b"\n", start)
            if end < 0:
                break
            if end == start or head[end - 1] != 13:  # 13: CR
                raise ParseError(400, "Invalid line ending in request head")
            line = bytes(head[start : end - 1])
            start = end + 1
            if not line and self.lines:  # the empty line: the head is whole
                self.done = True
                self.start = start
                return
            self._line(line)
            self.lines += 1
        self.start = start
        self._start_of_line(bytes(head[start:]))

    def _line(self, line: bytes) -> None:
        if not self.lines:
            match = _REQUEST_LINE.fullmatch(line)
            if match is None:
                raise ParseError(400, "Invalid request line")
            _check_version(line)
            return
        if FIELD_LINE.fullmatch(line) is None:
            raise ParseError(400, "Invalid header line")
        if line[:15].lower() == b"content-length:":
            if self.length_seen:
                raise ParseError(400, "Duplicate Content-Length")
            self.length_seen = True
            value = line[15:].strip(b" \t")
            if _DIGITS.fullmatch(value) is None or int(value) >= MAX_LENGTH:
                raise ParseError(400, "Invalid Content-Length")

    def _start_of_line(self, part: bytes) -> None:
        """The line still arriving: whether it can still become a valid one."""
        if not part:
            return
        if not self.lines:
            if _REQUEST_START.fullmatch(part) is None:
                raise ParseError(400, "Invalid request line")
            _check_version(part)
        elif _FIELD_START.fullmatch(part) is None:
            raise ParseError(400, "Invalid header line")


def _check_version(line: bytes) -> None:
    match = _VERSIONED.match(line)
    if match is not None and (match[1], match[2]) not in KNOWN_VERSIONS:
        raise ParseError(505, "Invalid HTTP version")
