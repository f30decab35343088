"""Bytes helpers for HTTP/1.1: status lines, header lines, body framing, canned responses."""

from __future__ import annotations

import enum
import http
import re
from email.utils import formatdate

from fulmen.protocols import fields

# RFC 9112 §3.2 / RFC 3986 §3.2.2: host = IP-literal / IPv4address / reg-name, then [":" port].
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")

REASONS: dict[int, str] = {status.value: status.phrase for status in http.HTTPStatus}
# `200 OK`: each known status with its reason phrase, as access lines show it.
STATUS_TEXTS: dict[int, str] = {status: f"{status} {reason}" for status, reason in REASONS.items()}
STATUS_LINES: dict[int, bytes] = {
    status: b"HTTP/1.1 %b\r\n" % text.encode("ascii") for status, text in STATUS_TEXTS.items()
}
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CHUNK_END = b"\r\n"
CHUNK_END_LAST = CHUNK_END + LAST_CHUNK
# RFC 9110 §6.4.1: these never carry content.
NO_BODY_STATUSES = frozenset({204, 304})


def status_text(status: int) -> str:
    """The status and its reason phrase for a log line (the code alone if unknown)."""
    return STATUS_TEXTS.get(status) or str(status)


def status_line(status: int) -> bytes:
    """`HTTP/1.1 <status> <reason>\\r\\n`, precomputed for every known status."""
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"invalid HTTP status {status!r}")
        line = b"HTTP/1.1 %d \r\n" % status
    return line


# (name, value) -> (validated header line, kind, lower-case name). Applications send the same
# headers again and again; a hit skips validation and formatting. Cleared when full, so
# one-off values cannot pin memory.
HEADER_LINES: dict[object, tuple[bytes, fields.Kind, bytes]] = {}
_HEADER_LINES_MAX = 1024


def header_line(header: tuple[bytes, bytes]) -> tuple[bytes, fields.Kind, bytes]:
    """Check one response header (`fields.check`) and format its line, cached."""
    lname, kind = fields.check(header)
    name, value = header  # a two-item iterable: a list is allowed, and never cached
    entry = (b"%b: %b\r\n" % (name, value), kind, lname)
    if isinstance(header, tuple):
        if len(HEADER_LINES) >= _HEADER_LINES_MAX:
            HEADER_LINES.clear()
        HEADER_LINES[header] = entry
    return entry


_valid_hosts: set[bytes] = set()


def valid_host(value: bytes) -> bool:
    """RFC 9112 §3.2 Host syntax; valid values are remembered (a server sees few)."""
    if value in _valid_hosts:
        return True
    if _HOST.fullmatch(value) is None:
        return False
    if len(_valid_hosts) >= 256:
        _valid_hosts.clear()
    _valid_hosts.add(value)
    return True


class Framing(enum.Enum):
    """How a response body is delimited on the wire (RFC 9112 §6)."""

    NONE = enum.auto()  # no body at all: HEAD, 1xx, 204, 304
    LENGTH = enum.auto()  # Content-Length
    CHUNKED = enum.auto()  # Transfer-Encoding: chunked
    UNTIL_CLOSE = enum.auto()  # HTTP/1.0 without a length: the close ends the body


NONE = Framing.NONE
LENGTH = Framing.LENGTH
CHUNKED = Framing.CHUNKED
UNTIL_CLOSE = Framing.UNTIL_CLOSE


def body_framing(
    status: int, head: bool, length: int | None, app_coding: bool, whole: bool, http10: bool
) -> Framing:
    """The framing of a response, chosen once from its head (RFC 9112 §6.3): `length` is the
    app's Content-Length, `app_coding` whether it set Transfer-Encoding itself, `whole` whether
    the first body message is the last one (then the server adds Content-Length)."""
    if head or status in NO_BODY_STATUSES or status < 200:
        return NONE
    if length is not None:
        return LENGTH
    if app_coding:  # the app frames its body itself (RFC 9112 §6.1: chunked, last)
        return CHUNKED
    if whole:
        return LENGTH
    return UNTIL_CLOSE if http10 else CHUNKED


def chunk(data: bytes) -> bytes:
    """Frame `data` as one chunk (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def http_date() -> bytes:
    return formatdate(usegmt=True).encode("ascii")


def default_header_lines(
    server_header: bool, date_header: bool, extra: list[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    """The (lower-case name, header line) pairs added to every response; rebuilt each second."""
    lines: list[tuple[bytes, bytes]] = []
    if server_header:
        lines.append((b"server", b"server: fulmen\r\n"))
    if date_header:
        lines.append((b"date", b"date: " + http_date() + CRLF))
    for name, value in extra:
        line, _, lname = header_line((name.encode("latin-1"), value.encode("latin-1")))
        lines.append((lname, line))
    return lines


PLAIN = b"content-type: text/plain; charset=utf-8\r\n"


def simple_response(status: int, body: bytes, lines: bytes, close: bool = True) -> bytes:
    """A complete response with `body`, e.g. for a rejected request or an app error: `lines`
    are its header lines but for Content-Length and Connection."""
    connection = b"connection: close\r\n" if close else b""
    return b"".join(
        (
            status_line(status),
            b"content-length: %d\r\n" % len(body),
            connection,
            lines,
            CRLF,
            body,
        )
    )


def escape(text: str) -> str:
    """Make untrusted text safe for a log line: control characters become escapes."""
    return text.translate(_CONTROL_ESCAPES)


# C0 and C1 controls and DEL, plus the Unicode line and paragraph separators: a percent-decoded
# path can hold any of them, and log readers (str.splitlines among them) break lines at some.
_CONTROL_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160))},
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
